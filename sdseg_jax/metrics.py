"""Segmentation metrics: Dice/IoU with SDSeg's official conventions, HD95/ASSD, aggregation.

Why the conventions matter: SDSeg's `scripts/slice2seg.py` scores a prediction on an empty ground
truth as Dice 1 when the prediction is *non-empty* and as Dice 0 when both are empty (a TransUNet
heritage), and its IoU has no special case at all (both empty -> 0/(0+1e-10) = 0). Reported numbers
are only comparable if we do the same, so that is the default (`empty_convention="official"`).
The widespread alternative (both empty = perfect agreement = 1, exactly one empty = 0) is available
as `empty_convention="both_empty_is_one"` for analyses where the official quirk is unwanted.

Everything binarises with `> 0` first (as the official code does), and works on arrays of any
dimension (2D images, 3D volumes).
"""

from __future__ import annotations

from typing import Callable, Literal, Mapping, Optional, Sequence

import numpy as np

from sdseg_jax import surface_distance

# Re-exported so callers need a single import for all case-level metrics.
from sdseg_jax.surface_distance import ASSD_MODES  # noqa: F401
from sdseg_jax.surface_distance import AssdMode  # noqa: F401
from sdseg_jax.surface_distance import asd  # noqa: F401
from sdseg_jax.surface_distance import assd  # noqa: F401
from sdseg_jax.surface_distance import empty_status  # noqa: F401
from sdseg_jax.surface_distance import hausdorff  # noqa: F401
from sdseg_jax.surface_distance import hd95  # noqa: F401
from sdseg_jax.surface_distance import hd95_assd  # noqa: F401

EmptyConvention = Literal["official", "both_empty_is_one"]
EMPTY_CONVENTIONS = ("official", "both_empty_is_one")
EPS = 1e-10  # the official code's smoothing term in both Dice and IoU denominators
METRIC_NAMES = ("dice", "iou", "hd95", "assd")


def _check_convention(empty_convention: str) -> None:
  if empty_convention not in EMPTY_CONVENTIONS:
    raise ValueError(f"empty_convention must be one of {EMPTY_CONVENTIONS}, "
                     f"got {empty_convention!r}")


def _binary_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  pred, gt = np.asarray(pred) > 0, np.asarray(gt) > 0
  if pred.shape != gt.shape:
    raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
  return pred, gt


def dice_from_counts(inter: int, p: int, g: int,
                     empty_convention: EmptyConvention = "official") -> float:
  """Dice from |P∩G|, |P|, |G|: what per-volume scoring accumulates slice by slice.

  official: pred non-empty & gt empty -> 1; both non-empty -> 2|P∩G|/(|P|+|G|+1e-10);
    pred empty -> 0 (also when gt is empty).
  both_empty_is_one: both empty -> 1; exactly one empty -> 0; else 2|P∩G|/(|P|+|G|).
  """
  _check_convention(empty_convention)
  if empty_convention == "official":
    if p > 0 and g == 0:
      return 1.0
    if p > 0 and g > 0:
      return 2.0 * inter / (p + g + EPS)
    return 0.0
  if p == 0 and g == 0:
    return 1.0
  return 2.0 * inter / (p + g)


def iou_from_counts(inter: int, p: int, g: int,
                    empty_convention: EmptyConvention = "official") -> float:
  """IoU from |P∩G|, |P|, |G|.

  official: |P∩G| / (|P∪G| + 1e-10), no special case (both empty -> 0).
  both_empty_is_one: both empty -> 1, else |P∩G| / |P∪G|.
  """
  _check_convention(empty_convention)
  union = p + g - inter
  if empty_convention == "official":
    return inter / (union + EPS)
  if union == 0:
    return 1.0
  return inter / union


def _counts(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int, int]:
  pred, gt = _binary_pair(pred, gt)
  return int(np.logical_and(pred, gt).sum()), int(pred.sum()), int(gt.sum())


def dice(pred: np.ndarray, gt: np.ndarray,
         empty_convention: EmptyConvention = "official") -> float:
  """Dice coefficient of two masks (values > 0 are foreground); see `dice_from_counts`."""
  return dice_from_counts(*_counts(pred, gt), empty_convention)


def iou(pred: np.ndarray, gt: np.ndarray,
        empty_convention: EmptyConvention = "official") -> float:
  """Intersection over union of two masks (values > 0 are foreground); see `iou_from_counts`."""
  return iou_from_counts(*_counts(pred, gt), empty_convention)


def case_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Optional[Sequence[float]] = None,
                 empty_convention: EmptyConvention = "official",
                 assd_mode: AssdMode = "pooled") -> dict[str, float]:
  """Dice, IoU, HD95 and ASSD of one case; distances are NaN when either mask is empty.

  Distances are in pixels/voxels, or in the units of `spacing` when it is given. The empty
  convention only concerns Dice/IoU; see `surface_distance` for why distances become NaN.
  """
  pred, gt = _binary_pair(pred, gt)
  hd, sd = hd95_assd(pred, gt, spacing, assd_mode)
  return {"dice": dice(pred, gt, empty_convention), "iou": iou(pred, gt, empty_convention),
          "hd95": hd, "assd": sd}


def per_class(pred_labels: np.ndarray, gt_labels: np.ndarray, num_classes: int,
              spacing: Optional[Sequence[float]] = None,
              empty_convention: EmptyConvention = "official",
              metric_fn: Optional[Callable[..., dict[str, float]]] = None
              ) -> dict[int, dict[str, float]]:
  """Per-class metrics of two label maps for classes 1..num_classes-1 (0 is background).

  Mirrors the official multi-class protocol (one binary score per foreground class, e.g. per volume,
  later averaged over cases then classes). `metric_fn(pred, gt, spacing=..., empty_convention=...)`
  defaults to `case_metrics`.
  """
  pred_labels, gt_labels = np.asarray(pred_labels), np.asarray(gt_labels)
  if pred_labels.shape != gt_labels.shape:
    raise ValueError(f"label map shapes differ: {pred_labels.shape} vs {gt_labels.shape}")
  metric_fn = metric_fn or case_metrics
  return {c: metric_fn(pred_labels == c, gt_labels == c, spacing=spacing,
                       empty_convention=empty_convention)
          for c in range(1, int(num_classes))}


def _dice_iou(pred: np.ndarray, gt: np.ndarray, spacing=None,
              empty_convention: EmptyConvention = "official") -> dict[str, float]:
  del spacing  # overlap metrics only
  return {"dice": dice(pred, gt, empty_convention), "iou": iou(pred, gt, empty_convention)}


def per_class_dice(pred_labels: np.ndarray, gt_labels: np.ndarray, num_classes: int,
                   empty_convention: EmptyConvention = "official"
                   ) -> dict[int, dict[str, float]]:
  """Dice/IoU per foreground class 1..K-1 of one case (an image or a stacked volume)."""
  return per_class(pred_labels, gt_labels, num_classes, empty_convention=empty_convention,
                   metric_fn=_dice_iou)


def class_counts(pred_labels: np.ndarray, gt_labels: np.ndarray, num_classes: int) -> np.ndarray:
  """(K, 3) int64 |P∩G|, |P|, |G| per class: what per-volume scoring sums over slices."""
  pred_labels, gt_labels = np.asarray(pred_labels), np.asarray(gt_labels)
  out = np.zeros((num_classes, 3), np.int64)
  for c in range(num_classes):
    p, g = pred_labels == c, gt_labels == c
    out[c] = (np.sum(p & g), np.sum(p), np.sum(g))
  return out


def summarize_class_counts(case_counts: Mapping[str, np.ndarray],
                           empty_convention: EmptyConvention = "official") -> dict:
  """Official multi-class aggregation: per-class Dice per case, mean over cases, then classes.

  Args:
    case_counts: {case: (K, 3) counts} (slices of a volume already summed).

  Returns:
    {"dice", "iou" (means over classes 1..K-1), "per_class": {c: {"dice", "iou"}},
     "cases": {case: {"dice_<c>", "iou_<c>"}}}
  """
  cases: dict[str, dict[str, float]] = {}
  num = None
  for case, counts in sorted(case_counts.items()):
    num = counts.shape[0]
    row = {}
    for c in range(1, num):
      inter, p, g = (int(v) for v in counts[c])
      row[f"dice_{c}"] = dice_from_counts(inter, p, g, empty_convention)
      row[f"iou_{c}"] = iou_from_counts(inter, p, g, empty_convention)
    cases[case] = row
  classes: dict[int, dict[str, float]] = {}
  for c in range(1, num or 0):
    classes[c] = {m: float(np.mean([r[f"{m}_{c}"] for r in cases.values()]))
                  for m in ("dice", "iou")}
  mean = lambda m: (float(np.mean([v[m] for v in classes.values()])) if classes
                    else float("nan"))
  return {"dice": mean("dice"), "iou": mean("iou"), "per_class": classes, "cases": cases}


def summarize(cases: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
  """Mean/std per metric over cases, ignoring NaN (e.g. undefined distances), with counts.

  Returns {"mean": {m: ...}, "std": {m: ...}, "count": {m: n_finite}, "n_cases": {m: n_total}}.
  std is the population std (ddof=0), matching numpy's default. A metric with no finite value gets
  NaN mean/std and count 0, so the reader sees it was never defined rather than a fake 0.
  """
  names: list[str] = []
  for values in cases.values():
    names.extend(k for k in values if k not in names)
  out: dict[str, dict[str, float]] = {"mean": {}, "std": {}, "count": {}, "n_cases": {}}
  for name in names:
    column = np.array([float(v[name]) for v in cases.values() if name in v and v[name] is not None],
                      dtype=np.float64)
    finite = column[np.isfinite(column)]
    out["mean"][name] = float(finite.mean()) if finite.size else float("nan")
    out["std"][name] = float(finite.std()) if finite.size else float("nan")
    out["count"][name] = int(finite.size)
    out["n_cases"][name] = int(column.size)
  return out


# Kept importable under this name for callers that think of it as "the surface module".
surface = surface_distance.surface
