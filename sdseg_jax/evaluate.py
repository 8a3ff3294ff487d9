"""Scores a trained run on a data split: the paper's Dice/IoU protocol, single step or DDIM.

  python -m sdseg_jax.evaluate --workdir DIR [--split test] [--checkpoint best|last|STEP|export]
      [--ddim-steps 0[,2,10,50]] [--ddim-eta 1.0] [--seed 0] [--noise per_image|shared]
      [--json FILE] [--hd95] [--batch-size N] [--empty-convention official|both_empty_is_one]
      [--per-case]

What it does, and why this way:
  * Weights: EMA UNet + live vision encoder + the run's frozen VAE and scale factor
    (`restore.load_run`), exactly the official evaluation state. The run's own config.json
    defines the model, the data and its split files (WORKDIR/splits), so a run is always scored
    on the split it was trained against.
  * Sampler: one reverse step at t = T-1 (the paper's) by default; `--ddim-steps S` runs LDM's
    DDIM with S steps (eta 1 as the official sampler) for the steps comparison
    (docs/method.md#ddim-sampling). Several comma-separated values reuse the loaded weights and
    write one JSON each.
  * Cases: a 2D image, or a 3D volume whose slices are stacked in slice order (BTCV, STS-3D):
    Dice/IoU from the volume's summed pixel counts, as the official per-volume scoring. The
    Dice convention (empty prediction = 0, empty truth + non-empty prediction = 1) is the
    official one unless the run's config or --empty-convention says otherwise.
  * --hd95 adds HD95 and ASSD per case, in pixels of the model's grid (slice index as the third
    axis for volumes; the in-plane resize and the slice spacing are NOT undone), NaN (null in the
    JSON) when either mask is empty, and left out of the means.
  * Class-embedding runs (model.unet.num_classes) report per-class Dice/IoU (classes 1..K-1, per
    case, then averaged over cases and classes) next to the foreground Dice.

Output: WORKDIR/eval/<split>_<checkpoint>[_ddim<S>].json (or --json FILE) with "mean", "std",
"count", "cases", "convention", "sampler" and the run identity; a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any, Dict, Optional, Sequence

from etils import epath
import jax
import numpy as np

from sdseg_jax import errors
from sdseg_jax import evaluators
from sdseg_jax import metrics as metrics_lib
from sdseg_jax import restore
from sdseg_jax import storage
from sdseg_jax.data import pipeline

SPLITS = ("train", "val", "test")


def output_name(split: str, checkpoint: str, ddim_steps: int) -> str:
  """<split>_<checkpoint>[_ddim<S>].json: one file per (split, weights, sampler)."""
  return f"{split}_{checkpoint}" + (f"_ddim{ddim_steps}" if ddim_steps > 0 else "") + ".json"


def _batch_size(requested: Optional[int], default: int) -> int:
  """Per-process batch, rounded up to a multiple of the local devices (the batch is split)."""
  size = int(requested or default)
  if size <= 0:
    raise errors.ConfigError(f"--batch-size must be positive, got {size}")
  devices = jax.local_device_count()
  return int(math.ceil(size / devices) * devices)


def make_loader(run: restore.Run, split: str, batch_size: Optional[int] = None):
  if split not in SPLITS:
    raise errors.ConfigError(f"--split must be one of {SPLITS}, got {split!r}")
  return pipeline.make_eval_loader(
      run.config.data, split, split_dir=run.workdir / "splits",
      batch_size=_batch_size(batch_size, run.config.eval.batch_size),
      process_index=jax.process_index(), process_count=jax.process_count())


NOISE_TEXT = {"per_image": "one z_T per image from fold_in(key(seed), batch index)",
              "shared": "one z_T from key(seed) shared by every image (the official log_dice)"}


def _sampler(ddim_steps: int, ddim_eta: float, seed: int, noise: str) -> Dict[str, Any]:
  if ddim_steps > 0:
    return {"kind": "ddim", "steps": int(ddim_steps), "eta": float(ddim_eta), "noise_seed": seed,
            "noise": NOISE_TEXT[noise]}
  return {"kind": "single_step", "steps": 1, "t": "T-1", "noise_seed": seed,
          "noise": NOISE_TEXT[noise]}


def evaluate(run: restore.Run, split: str = "test", *, ddim_steps: int = 0,
             ddim_eta: float = 1.0, seed: int = 0, distances: bool = False,
             batch_size: Optional[int] = None,
             empty_convention: Optional[str] = None, noise: str = "per_image") -> Dict[str, Any]:
  """Scores `run` on `split`; returns the JSON summary (see module docstring)."""
  if ddim_steps < 0:
    raise errors.ConfigError(f"--ddim-steps must be >= 0 (0 = single step), got {ddim_steps}")
  convention = empty_convention or run.config.eval.get("empty_convention", "official")
  if convention not in metrics_lib.EMPTY_CONVENTIONS:
    raise errors.ConfigError(f"--empty-convention must be one of {metrics_lib.EMPTY_CONVENTIONS}")
  loader = make_loader(run, split, batch_size)
  start = time.perf_counter()
  evaluator = evaluators.get("dice")(run.model, run.mesh, loader, noise_seed=seed,
                                     empty_convention=convention, ddim_steps=ddim_steps,
                                     ddim_eta=ddim_eta, distances=distances, noise=noise)
  result = evaluator.run(run.params, run.vae_params, run.scale_factor)
  seconds = time.perf_counter() - start
  names = ["dice", "iou"] + (["hd95", "assd"] if distances else [])
  cases = {case: {m: values[m] for m in names} for case, values in result["cases"].items()}
  summary = metrics_lib.summarize(cases)
  out: Dict[str, Any] = {
      "workdir": str(run.workdir), "split": split,
      "checkpoint": {"requested": run.checkpoint, "step": run.step, "source": run.source},
      "dataset": run.config.data.name, "sampler": _sampler(ddim_steps, ddim_eta, seed, noise),
      "convention": convention, "dimension": result["dimension"],
      "case_unit": "volume" if result["dimension"] == "3d" else "image",
      "n_cases": result["num_cases"], "mean": summary["mean"], "std": summary["std"],
      "count": summary["count"], "cases": cases, "seconds": seconds,
      "weights": "EMA UNet + live vision encoder",
  }
  if distances:
    out["distance_units"] = ("pixels of the model grid (volumes: slice index as the third axis, "
                             "unit spacing)")
  if run.num_classes is not None and run.config.data.get("target") == "multiclass":
    out["multiclass"] = evaluators.get("multiclass")(
        run.model, run.mesh, loader, noise_seed=seed, empty_convention=convention,
        ddim_steps=ddim_steps, ddim_eta=ddim_eta).run(run.params, run.vae_params,
                                                      run.scale_factor)
  return out


# ---- presentation ------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "    -  "
  return f"{value:7.4f}" if abs(value) < 100 else f"{value:7.2f}"


def format_table(result: Dict[str, Any], per_case: bool = False) -> str:
  """A plain-text table of the summary (and per-case rows when asked or when there are few)."""
  names = [m for m in ("dice", "iou", "hd95", "assd") if m in result["mean"]]
  sampler = result["sampler"]
  how = ("single step (t = T-1)" if sampler["kind"] == "single_step"
         else f"DDIM {sampler['steps']} steps, eta {sampler['eta']}")
  ck = result["checkpoint"]
  lines = [f"{result['workdir']}  split={result['split']}  checkpoint={ck['requested']}"
           f"{'' if ck['step'] is None else ' (step %d)' % ck['step']}  {how}  "
           f"seed={sampler['noise_seed']}  convention={result['convention']}",
           f"{result['case_unit'] + ':':<28}" + "".join(f"{m:>9}" for m in names)]
  if per_case or result["n_cases"] <= 12:
    for case, values in result["cases"].items():
      lines.append(f"{case[:28]:<28}" + "".join(f"  {_fmt(values[m])}" for m in names))
  lines.append(f"{'mean (%d cases)' % result['n_cases']:<28}"
               + "".join(f"  {_fmt(result['mean'][m])}" for m in names))
  lines.append(f"{'std':<28}" + "".join(f"  {_fmt(result['std'][m])}" for m in names))
  if "multiclass" in result:
    mc = result["multiclass"]
    for c, values in mc["per_class"].items():
      lines.append(f"{'class %s' % c:<28}  {_fmt(values['dice'])}  {_fmt(values['iou'])}")
    lines.append(f"{'mean over classes':<28}  {_fmt(mc['dice'])}  {_fmt(mc['iou'])}")
  lines.append(f"({result['seconds']:.1f} s)")
  return "\n".join(lines)


def json_safe(value: Any) -> Any:
  """NaN/inf -> null (strict JSON), numpy scalars -> Python, int dict keys -> strings."""
  if isinstance(value, dict):
    return {str(k): json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, (np.generic,)):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def write_json(result: Dict[str, Any], path: storage.PathLike) -> epath.Path:
  path = storage.path(path)
  if jax.process_index() == 0:
    storage.write_text_atomic(path, json.dumps(json_safe(result), indent=1, allow_nan=False))
  return path


# ---- command line ------------------------------------------------------------------------------


def _steps_list(text: str) -> list[int]:
  try:
    return [int(v) for v in str(text).split(",") if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"--ddim-steps takes integers like 0 or 2,10,50, "
                                     f"got {text!r}") from None


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m sdseg_jax.evaluate", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="run directory of sdseg_jax.main")
  parser.add_argument("--split", default="test", choices=SPLITS)
  parser.add_argument("--checkpoint", default="best", help=restore.CHECKPOINT_CHOICES)
  parser.add_argument("--ddim-steps", type=_steps_list, default=[0],
                      help="0 = single step (default); S > 0 = DDIM with S steps; a comma list "
                           "evaluates each")
  parser.add_argument("--ddim-eta", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0, help="noise seed")
  parser.add_argument("--noise", default=None, choices=("per_image", "shared"),
                      help="one z_T per image, or one shared by every image (the official "
                           "protocol); default: the run's config.eval.noise (per_image)")
  parser.add_argument("--json", default=None, help="output file (one --ddim-steps value only)")
  parser.add_argument("--hd95", action="store_true", help="also HD95 and ASSD (pixels)")
  parser.add_argument("--batch-size", type=int, default=None,
                      help="per-process batch (default: the run's config.eval.batch_size)")
  parser.add_argument("--empty-convention", default=None, choices=metrics_lib.EMPTY_CONVENTIONS)
  parser.add_argument("--per-case", action="store_true", help="print every case")
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  if args.json and len(args.ddim_steps) > 1:
    print("error: --json names one file; give a single --ddim-steps value", file=sys.stderr)
    return 2
  try:
    if args.json:  # fail before restoring weights when the output bucket is unusable
      storage.check_bucket(storage.path(args.json).parent, write=True)
    run = restore.load_run(args.workdir, args.checkpoint)
    for steps in args.ddim_steps:
      result = evaluate(run, args.split, ddim_steps=steps, ddim_eta=args.ddim_eta,
                        seed=args.seed, distances=args.hd95, batch_size=args.batch_size,
                        empty_convention=args.empty_convention,
                        noise=args.noise or run.config.eval.get("noise", "per_image"))
      path = storage.path(args.json) if args.json else (
          run.workdir / "eval" / output_name(args.split, run.checkpoint, steps))
      write_json(result, path)
      if jax.process_index() == 0:
        print(format_table(result, args.per_case))
        print(f"wrote {path}")
  except errors.UserFacingError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
