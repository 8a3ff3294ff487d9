"""The paper's stability protocol on a trained run: how much does the prediction depend on z_T?

  python -m sdseg_jax.stability --workdir DIR [--split test] [--runs 10] [--seeds 0,1,...]
      [--checkpoint best|last|STEP|export] [--json FILE] [--uncertainty-dir DIR]
      [--batch-size B]

M single-step inference runs over the split with noise seeds 0..M-1 (or --seeds; the first is
the reference run), each run with ONE z_T shared by all images, as the official `log_dice`.
Per image: SSIM, MS-SSIM and PSNR of each run against the reference on the 0-255 probability
maps (torchmetrics-0.7 rules), the pairwise Dice between the M masks; per run: the ground-truth
Dice. The protocol itself, its rules and their reasons are in `sdseg_jax.evaluators.stability`.

MS-SSIM needs maps of at least 176 px; smaller maps (e.g. the 64 px demo) are not upsampled:
MS-SSIM is skipped and the JSON says why ("ms_ssim_skipped").

Cost: the M runs of a batch of B images are ONE jitted call, i.e. M*B decoder passes per call;
--batch-size sets B (default config.eval.batch_size // M).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List, Optional, Sequence

import jax

from sdseg_jax import errors
from sdseg_jax import evaluate as evaluate_lib
from sdseg_jax import restore
from sdseg_jax import storage
from sdseg_jax.evaluators import stability as protocol

MS_SSIM_MIN_SIZE = protocol.MS_SSIM_MIN_SIZE


def stability(run: restore.Run, split: str = "test", seeds: Sequence[int] = tuple(range(10)),
              *, batch_size: Optional[int] = None,
              uncertainty_dir: Optional[storage.PathLike] = None,
              empty_convention: Optional[str] = None) -> Dict[str, Any]:
  """Runs the protocol on `run`; returns the JSON summary (run identity + protocol numbers)."""
  seeds = [int(s) for s in seeds]
  if len(seeds) < 2:
    raise errors.ConfigError(f"the stability protocol needs at least 2 runs, got seeds {seeds}")
  convention = empty_convention or run.config.eval.get("empty_convention", "official")
  default_b = max(1, run.config.eval.batch_size // len(seeds))
  loader = evaluate_lib.make_loader(run, split, batch_size or default_b)
  evaluator = protocol.Evaluator(run.model, run.mesh, loader, seeds=seeds,
                                 empty_convention=convention, uncertainty_dir=uncertainty_dir,
                                 jit=lambda fn: run.jit("stability", lambda: fn))
  result = evaluator.run(run.params, run.vae_params, run.scale_factor)
  return {"workdir": str(run.workdir), "split": split,
          "checkpoint": {"requested": run.checkpoint, "step": run.step, "source": run.source},
          "dataset": run.config.data.name, **result}


def format_table(result: Dict[str, Any]) -> str:
  ck = result["checkpoint"]
  inst = result["instance"]
  lines = [f"{result['workdir']}  split={result['split']}  checkpoint={ck['requested']}"
           f"{'' if ck['step'] is None else ' (step %d)' % ck['step']}  runs={result['runs']} "
           f"(seeds {result['seeds'][0]}..{result['seeds'][-1]})  images={result['n_images']}",
           f"{'metric':<34}{'mean':>9}{'std':>9}{'n':>6}"]
  for name, label in (("ssim", "SSIM vs run 0"), ("ms_ssim", "MS-SSIM vs run 0"),
                      ("psnr", "PSNR vs run 0 (dB)")):
    v = inst[name]
    if name == "ms_ssim" and result["ms_ssim_skipped"]:
      lines.append(f"{label:<34}{'skipped (maps < %d px)' % MS_SSIM_MIN_SIZE:>24}")
      continue
    lines.append(f"{label:<34}{v['mean']:9.4f}{v['std']:9.4f}{v['n_images']:6d}")
  pw = result["pairwise_dice"]
  lines.append(f"{'pairwise Dice between runs':<34}{pw['mean']:9.4f}  (per-image std "
               f"{pw['std']:.4f}, min {pw['min']:.4f})")
  dr = result["dice_across_runs"]
  lines.append(f"{'GT Dice per run':<34}{dr['mean']:9.4f}{dr['std']:9.4f}  "
               f"(min {dr['min']:.4f}, max {dr['max']:.4f})")
  lines.append(f"({result['seconds']:.1f} s)")
  return "\n".join(lines)


def _seeds(text: str) -> List[int]:
  try:
    return [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"--seeds takes integers like 0,1,2, got {text!r}") from None


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m sdseg_jax.stability", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--split", default="test", choices=evaluate_lib.SPLITS)
  parser.add_argument("--checkpoint", default="best", help=restore.CHECKPOINT_CHOICES)
  parser.add_argument("--runs", type=int, default=10, help="seeds 0..runs-1")
  parser.add_argument("--seeds", type=_seeds, default=None, help="explicit seeds (first = ref)")
  parser.add_argument("--json", default=None)
  parser.add_argument("--uncertainty-dir", default=None)
  parser.add_argument("--batch-size", type=int, default=None,
                      help="images per call (each call decodes runs x images maps)")
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  seeds = args.seeds if args.seeds is not None else list(range(args.runs))
  try:
    for out in (storage.path(args.json).parent if args.json else None, args.uncertainty_dir):
      if out is not None:  # fail before restoring weights when an output bucket is unusable
        storage.check_bucket(out, write=True)
    run = restore.load_run(args.workdir, args.checkpoint)
    result = stability(run, args.split, seeds, batch_size=args.batch_size,
                       uncertainty_dir=args.uncertainty_dir)
  except errors.UserFacingError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  path = storage.path(args.json) if args.json else (
      run.workdir / "eval" / f"stability_{args.split}_{run.checkpoint}.json")
  evaluate_lib.write_json(result, path)
  if jax.process_index() == 0:
    print(format_table(result))
    print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
