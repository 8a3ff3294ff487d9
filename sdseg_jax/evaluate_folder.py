"""Scores a folder of predicted masks against ground truths, like nnU-Net's evaluate-folder.

  python -m sdseg_jax.evaluate_folder --pred DIR --gt DIR [--json FILE]
      [--empty-convention official|both_empty_is_one] [--assd-mode pooled|mean_of_directed]
      [--ignore-spacing]

Why a folder tool: it lets any method's saved outputs (ours, the official SDSeg's, a baseline's) be
scored by exactly the same code and conventions. Files are paired by name with the extension
ignored (case1.png <-> case1.jpg, vol.nii.gz <-> vol.nii); every ground truth needs a prediction
(missing ones are an error, listed), extra predictions only warn. Masks are read by
`sdseg_jax.mask_io` (images thresholded at half range, NIfTI > 0).

Reported per case: Dice and IoU as fractions in [0, 1] with the chosen empty-mask convention, HD95
and ASSD in pixels for images or in the NIfTI header's units (usually mm) for volumes (from the
ground truth's voxel spacing). Distances are undefined when either mask is empty: they are NaN
internally, `null` in the JSON, and left out of the means ("count" says how many cases entered).

The JSON:
  {"mean": {"dice", "iou", "hd95", "assd"}, "std": {...}, "count": {...}, "n_cases": N,
   "cases": {name: {"dice", "iou", "hd95", "assd"}}, "empty_masks": {name: "pred"|"gt"|"both"},
   "convention": ..., "assd_mode": ..., "distance_units": ..., "extra_predictions": [...],
   "notes": ...}
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
from typing import Any, Iterable, Optional, Sequence, Union
import warnings

import numpy as np

from sdseg_jax import errors
from sdseg_jax import mask_io
from sdseg_jax import metrics

MaskSource = Union[np.ndarray, mask_io.LoadedMask, str, pathlib.Path]
Pair = Union[tuple[str, MaskSource, MaskSource], tuple[str, MaskSource, MaskSource, Any]]
NOTES = ("dice/iou are fractions in [0, 1]; hd95/assd are null when the prediction or the ground "
         "truth is empty (undefined) and are left out of mean/std; count = cases that entered each "
         "mean. Dice under the 'official' convention: empty GT & non-empty prediction = 1, empty "
         "prediction = 0 (also when GT is empty); IoU both empty = 0.")


class EvaluationError(errors.UserFacingError, ValueError):
  """The folders cannot be scored (missing predictions, size mismatch, duplicate names...)."""


# ----------------------------------------------------------------------------------------------
# Pairing files.


def _index_folder(folder: pathlib.Path) -> dict[str, pathlib.Path]:
  """Maps case name (file name without mask suffix) -> file, refusing ambiguous duplicates."""
  if not folder.is_dir():
    raise EvaluationError(f"{folder}: not a directory")
  index: dict[str, pathlib.Path] = {}
  duplicates: dict[str, list[str]] = {}
  for path in sorted(folder.iterdir()):
    if not mask_io.is_mask_file(path):
      continue
    name = mask_io.split_suffix(path)[0]
    if name in index:
      duplicates.setdefault(name, [index[name].name]).append(path.name)
    index[name] = path
  if duplicates:
    listing = "; ".join(", ".join(files) for files in duplicates.values())
    raise EvaluationError(f"{folder}: several files share a case name (only the extension "
                          f"differs): {listing}")
  return index


def match_folders(pred_dir: Union[str, pathlib.Path], gt_dir: Union[str, pathlib.Path]
                  ) -> tuple[list[tuple[str, pathlib.Path, pathlib.Path]], list[str]]:
  """Pairs prediction and ground-truth files by case name.

  Returns:
    (pairs sorted by name, names of extra predictions without ground truth).
  Raises:
    EvaluationError: no ground truth files, or ground truths without a prediction (all listed).
  """
  preds = _index_folder(pathlib.Path(pred_dir))
  gts = _index_folder(pathlib.Path(gt_dir))
  if not gts:
    raise EvaluationError(f"{gt_dir}: no mask files found (supported: "
                          f"{', '.join(mask_io.MASK_SUFFIXES)})")
  missing = sorted(set(gts) - set(preds))
  if missing:
    shown = ", ".join(gts[n].name for n in missing[:50]) + (" ..." if len(missing) > 50 else "")
    raise EvaluationError(f"{len(missing)} of {len(gts)} ground-truth cases have no prediction in "
                          f"{pred_dir}: {shown}")
  extra = sorted(set(preds) - set(gts))
  return [(name, preds[name], gts[name]) for name in sorted(gts)], extra


# ----------------------------------------------------------------------------------------------
# Scoring.


def _load(source: MaskSource) -> tuple[np.ndarray, Optional[mask_io.LoadedMask]]:
  if isinstance(source, mask_io.LoadedMask):
    return source.array, source
  if isinstance(source, (str, pathlib.Path)):
    loaded = mask_io.read_mask(source)
    return loaded.array, loaded
  return np.asarray(source) > 0, None


def _describe(source: MaskSource, loaded: Optional[mask_io.LoadedMask]) -> str:
  return str(loaded.path) if loaded is not None else f"<array {np.shape(source)}>"


def _score_one(name: str, pred_src: MaskSource, gt_src: MaskSource, spacing: Any,
               empty_convention: str, assd_mode: str, use_spacing: bool
               ) -> tuple[dict[str, float], Optional[str], str]:
  """Scores one case; returns (metrics, empty status, distance units)."""
  pred, pred_loaded = _load(pred_src)
  gt, gt_loaded = _load(gt_src)
  if pred.shape != gt.shape:
    raise EvaluationError(
        f"case {name!r}: prediction {_describe(pred_src, pred_loaded)} has shape {pred.shape} but "
        f"ground truth {_describe(gt_src, gt_loaded)} has shape {gt.shape}")
  units = "pixels"
  if spacing is not None:
    units = "spacing units"
  elif use_spacing and gt_loaded is not None and gt_loaded.spacing is not None:
    spacing, units = gt_loaded.spacing, gt_loaded.units
  if not use_spacing:
    spacing, units = None, "pixels"
  values = metrics.case_metrics(pred, gt, spacing, empty_convention, assd_mode)
  return values, metrics.empty_status(pred, gt), units


def _units_label(units: set[str]) -> str:
  if len(units) == 1:
    return next(iter(units))
  return "mixed: " + ", ".join(sorted(units))


def evaluate_pairs(pairs: Iterable[Pair], empty_convention: metrics.EmptyConvention = "official",
                   assd_mode: metrics.AssdMode = "pooled", use_spacing: bool = True
                   ) -> dict[str, Any]:
  """Scores (name, prediction, ground truth[, spacing]) pairs; reused by `sdseg_jax.evaluate`.

  Args:
    pairs: items (name, pred, gt) or (name, pred, gt, spacing); pred/gt are arrays (> 0 is
      foreground), `mask_io.LoadedMask`s or file paths. Without an explicit spacing, a NIfTI ground
      truth's header spacing is used; otherwise distances are in pixels.
    empty_convention: Dice/IoU convention for empty masks (see `metrics.dice`).
    assd_mode: "pooled" (medpy 0.5) or "mean_of_directed" (medpy 0.4).
    use_spacing: False measures distances in voxels even for NIfTI files.

  Returns:
    The result dictionary described in the module docstring (NaN where undefined).
  """
  metrics._check_convention(empty_convention)  # fail before any file is read
  cases: dict[str, dict[str, float]] = {}
  empty: dict[str, str] = {}
  units: set[str] = set()
  for item in pairs:
    name, pred_src, gt_src = item[:3]
    spacing = item[3] if len(item) > 3 else None
    if name in cases:
      raise EvaluationError(f"duplicate case name {name!r}")
    values, status, case_units = _score_one(name, pred_src, gt_src, spacing, empty_convention,
                                            assd_mode, use_spacing)
    cases[name] = values
    units.add(case_units)
    if status is not None:
      empty[name] = status
  if not cases:
    raise EvaluationError("no cases to evaluate")
  summary = metrics.summarize(cases)
  return {
      "mean": {k: summary["mean"][k] for k in metrics.METRIC_NAMES},
      "std": {k: summary["std"][k] for k in metrics.METRIC_NAMES},
      "count": {k: summary["count"][k] for k in metrics.METRIC_NAMES},
      "n_cases": len(cases),
      "cases": cases,
      "empty_masks": empty,
      "convention": empty_convention,
      "assd_mode": assd_mode,
      "distance_units": _units_label(units),
      "notes": NOTES,
  }


def evaluate_folder(pred_dir: Union[str, pathlib.Path], gt_dir: Union[str, pathlib.Path],
                    empty_convention: metrics.EmptyConvention = "official",
                    assd_mode: metrics.AssdMode = "pooled", use_spacing: bool = True
                    ) -> dict[str, Any]:
  """Pairs the two folders by case name and scores them (see `evaluate_pairs`)."""
  pairs, extra = match_folders(pred_dir, gt_dir)
  if extra:
    warnings.warn(f"{len(extra)} predictions in {pred_dir} have no ground truth and are ignored: "
                  f"{', '.join(extra[:20])}{' ...' if len(extra) > 20 else ''}", stacklevel=2)
  result = evaluate_pairs(pairs, empty_convention, assd_mode, use_spacing)
  result["extra_predictions"] = extra
  result["pred_dir"], result["gt_dir"] = str(pred_dir), str(gt_dir)
  return result


# ----------------------------------------------------------------------------------------------
# Output.


def _nan_to_none(obj: Any) -> Any:
  """JSON has no NaN: undefined values become null so strict parsers accept the file."""
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  if isinstance(obj, dict):
    return {k: _nan_to_none(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_nan_to_none(v) for v in obj]
  return obj


def write_json(result: dict[str, Any], path: Union[str, pathlib.Path]) -> None:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(_nan_to_none(result), indent=2, allow_nan=False) + "\n")


def _fmt(value: float) -> str:
  return "n/a" if not math.isfinite(value) else f"{value:.4f}"


def format_table(result: dict[str, Any]) -> str:
  """Per-case rows plus mean/std rows, fixed-width for terminals and logs."""
  names = list(result["cases"])
  width = max([len("case"), len("mean"), *(len(n) for n in names)])
  header = f"{'case':<{width}}  " + "  ".join(f"{m:>8}" for m in metrics.METRIC_NAMES)
  lines = [header, "-" * len(header)]
  for name in names:
    row = result["cases"][name]
    note = f"  (empty: {result['empty_masks'][name]})" if name in result["empty_masks"] else ""
    cells = "  ".join(f"{_fmt(row[m]):>8}" for m in metrics.METRIC_NAMES)
    lines.append(f"{name:<{width}}  {cells}{note}")
  lines.append("-" * len(header))
  for label in ("mean", "std"):
    lines.append(f"{label:<{width}}  "
                 + "  ".join(f"{_fmt(result[label][m]):>8}" for m in metrics.METRIC_NAMES))
  lines.append(f"{result['n_cases']} cases; convention={result['convention']}; "
               f"distances in {result['distance_units']} (n/a: a mask is empty; "
               f"hd95 over {result['count']['hd95']} cases)")
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m sdseg_jax.evaluate_folder",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--pred", required=True, help="folder of predicted masks")
  parser.add_argument("--gt", required=True, help="folder of ground-truth masks")
  parser.add_argument("--json", help="write the result JSON here")
  parser.add_argument("--empty-convention", default="official", choices=metrics.EMPTY_CONVENTIONS)
  parser.add_argument("--assd-mode", default="pooled", choices=metrics.ASSD_MODES)
  parser.add_argument("--ignore-spacing", action="store_true",
                      help="measure NIfTI distances in voxels instead of header units")
  args = parser.parse_args(argv)
  try:
    result = evaluate_folder(args.pred, args.gt, args.empty_convention, args.assd_mode,
                             use_spacing=not args.ignore_spacing)
  except (EvaluationError, mask_io.MaskReadError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(format_table(result))
  if args.json:
    write_json(result, args.json)
    print(f"wrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
