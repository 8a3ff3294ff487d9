"""The paper's stability protocol: how much does a single-step prediction depend on the noise?

  python -m sdseg_jax.stability --workdir DIR [--split test] [--runs 10] [--seeds 0,1,...]
      [--checkpoint best|last|STEP|export] [--json FILE] [--uncertainty-dir DIR]
      [--batch-size B]

Protocol (docs/method.md#stability-protocol; the official `scripts/stability_evaluation.ipynb`): M
single-step inference runs over the split with noise seeds 0..M-1; each run draws ONE z_T and
re-uses it for every image, as the official `log_dice`. The probability maps are taken on the 0-255
scale as the saved uint8 `*-logits.png` files (p*255 rounded), and for every image SSIM, MS-SSIM and
PSNR are computed between each run and the reference run 0 (torchmetrics-0.7 rules of
`image_similarity`: inferred data range, all-zero maps skipped, identical pairs skipped for PSNR),
averaged over runs, then over images. For 3D sets only slices with a non-empty ground truth enter
these image metrics, as the official script saved only those.

Added here (not in the paper): the pairwise Dice between the M binary masks of each image
(mean / std / min over the M(M-1)/2 pairs, symmetric convention: two empty masks agree), the
ground-truth Dice of every run (the official per-case Dice, volumes summed over slices) and its
spread across runs, and optional per-pixel uncertainty maps (std over runs) as PNGs.

MS-SSIM with 5 scales needs images of at least 176 px (the coarsest scale, 1/16 of the size,
must hold the 11-tap window). Smaller maps (e.g. the 64 px demo) are NOT upsampled, which would
change what is measured: MS-SSIM is skipped and the JSON says why ("ms_ssim_skipped").

Cost: the M runs of a batch of B images are ONE jitted call (the M noise tensors are vmapped,
the condition is computed once), i.e. M*B decoder passes per call; --batch-size sets B.
"""

from __future__ import annotations

import argparse
import functools
import io
import math
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
from PIL import Image

from sdseg_jax import evaluate as evaluate_lib
from sdseg_jax import evaluator as evaluator_lib
from sdseg_jax import image_similarity
from sdseg_jax import inference
from sdseg_jax import mask_io
from sdseg_jax import metrics as metrics_lib
from sdseg_jax import restore
from sdseg_jax import sharding as sharding_lib
from sdseg_jax import storage

MS_SSIM_SCALES = len(image_similarity.MS_SSIM_BETAS)
# Smallest side for 5-scale MS-SSIM: the coarsest scale (size / 16) must hold the 11-tap window.
MS_SSIM_MIN_SIZE = image_similarity.gaussian_kernel_1d().size * 2 ** (MS_SSIM_SCALES - 1)


def ms_ssim_skip_reason(size: int) -> Optional[str]:
  """None when MS-SSIM is computable on size x size maps, else the reason it is skipped."""
  if size >= MS_SSIM_MIN_SIZE:
    return None
  return (f"maps of {size}x{size} px are too small for {MS_SSIM_SCALES}-scale MS-SSIM (needs >= "
          f"{MS_SSIM_MIN_SIZE} px: the coarsest scale, 1/{2 ** (MS_SSIM_SCALES - 1)} of the "
          f"size, must hold the 11-tap window); skipped rather than upsampled, which would "
          f"change the metric")


def _runs_probabilities(params, vae_params, scale_factor, image, z_runs, *, model):
  """(M, 1, r, r, c) noises x (B, R, R, 3) images -> (M, B, R, R) foreground probabilities."""
  def one(z):
    return inference.foreground(
        inference.class_probabilities(model, params, vae_params, scale_factor, image, z))
  return jax.vmap(one)(z_runs)


def image_stability(maps: np.ndarray, reference: int = 0,
                    with_ms_ssim: bool = True) -> Dict[str, Optional[float]]:
  """Per-image SSIM / MS-SSIM / PSNR of M maps (M, H, W) on 0-255 against run `reference`.

  The rules of `image_similarity.instance_stability` for one image: None everywhere when the
  reference map is all zero, all-zero runs skipped, identical pairs skipped for PSNR.
  """
  maps = np.asarray(maps, np.float64)
  out: Dict[str, Optional[float]] = {"ssim": None, "ms_ssim": None, "psnr": None}
  ref = maps[reference]
  if not ref.any():
    return out
  others = [maps[i] for i in range(len(maps)) if i != reference and maps[i].any()]
  scores = {"ssim": [image_similarity.ssim(o, ref, None) for o in others],
            "psnr": [image_similarity.psnr(o, ref, None) for o in others
                     if not np.array_equal(o, ref)]}
  if with_ms_ssim:
    scores["ms_ssim"] = [image_similarity.ms_ssim(o, ref, None) for o in others]
  for name, values in scores.items():
    if values:
      out[name] = float(np.mean(values))
  return out


def _mean(values: List[Optional[float]]) -> Dict[str, Any]:
  finite = [v for v in values if v is not None and math.isfinite(v)]
  return {"mean": float(np.mean(finite)) if finite else float("nan"),
          "std": float(np.std(finite)) if finite else float("nan"), "n_images": len(finite)}


def write_uncertainty(path: storage.PathLike, probs: np.ndarray) -> None:
  """Per-pixel std over runs as an 8-bit PNG scaled by the largest possible std (0.5 -> 255)."""
  std = image_similarity.uncertainty_map(probs)
  png = io.BytesIO()
  Image.fromarray(np.round(np.clip(std / 0.5, 0, 1) * 255).astype(np.uint8)).save(png, "PNG")
  storage.write_bytes_atomic(path, png.getvalue())


def stability(run: restore.Run, split: str = "test", seeds: Sequence[int] = tuple(range(10)),
              *, batch_size: Optional[int] = None,
              uncertainty_dir: Optional[storage.PathLike] = None,
              empty_convention: Optional[str] = None) -> Dict[str, Any]:
  """Runs the protocol; returns the JSON summary (see module docstring)."""
  seeds = [int(s) for s in seeds]
  if len(seeds) < 2:
    raise ValueError(f"the stability protocol needs at least 2 runs, got seeds {seeds}")
  convention = empty_convention or run.config.eval.get("empty_convention", "official")
  m = len(seeds)
  default_b = max(1, run.config.eval.batch_size // m)
  loader = evaluate_lib.make_loader(run, split, batch_size or default_b)
  fn = run.jit("stability", lambda: functools.partial(_runs_probabilities, model=run.model))
  z_runs = jnp.stack([inference.run_noise(run.model, s) for s in seeds])
  batch_sh = sharding_lib.batch_sharding(run.mesh)
  size = run.model.image_size
  skip_reason = ms_ssim_skip_reason(size)

  start = time.perf_counter()
  images: Dict[str, Dict[str, Any]] = {}
  counts: Dict[str, np.ndarray] = {}  # case -> (M, 3) |P∩G|, |P|, |G| per run
  volumetric = False
  for batch in loader:
    image = jax.make_array_from_process_local_data(batch_sh, np.asarray(batch["image"]))
    probs = fn(run.params, run.vae_params, run.scale_factor, image, z_runs)
    probs = np.asarray(multihost_utils.process_allgather(probs, tiled=True))  # (M, B, R, R)
    gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
    gt_all, valid, slices = gather(batch["label"]) > 0, gather(batch["valid"]), gather(
        batch["slice"])
    names = evaluator_lib._allgather_strings(batch["name"])  # pylint: disable=protected-access
    cases = evaluator_lib._allgather_strings(batch["case"])  # pylint: disable=protected-access
    for row in np.flatnonzero(valid):
      p, gt = probs[:, row], gt_all[row]
      masks = p > 0.5
      inter = np.sum(masks & gt, axis=(1, 2))
      row_counts = np.stack([inter, masks.sum(axis=(1, 2)), np.full(m, gt.sum())], axis=-1)
      counts[cases[row]] = counts.get(cases[row], 0) + row_counts.astype(np.int64)
      is_slice = int(slices[row]) >= 0
      volumetric = volumetric or is_slice
      if is_slice and not gt.any():
        continue  # official: only slices with a non-empty ground truth are compared
      maps = mask_io.probability_to_uint8(p).astype(np.float64)
      entry = image_stability(maps, 0, skip_reason is None)
      spread = image_similarity.pairwise_dice_spread(masks)
      entry.update({"dice_pair_mean": spread["mean"], "dice_pair_std": spread["std"],
                    "dice_pair_min": spread["min"]})
      images[names[row]] = entry
      if uncertainty_dir is not None and jax.process_index() == 0:
        write_uncertainty(storage.path(uncertainty_dir) / f"{names[row]}.png", p)
  seconds = time.perf_counter() - start

  per_run = []
  for r in range(m):
    dice = [metrics_lib.dice_from_counts(*(int(v) for v in c[r]), convention)
            for c in counts.values()]
    per_run.append(float(np.mean(dice)) if dice else float("nan"))
  instance = {name: _mean([e[name] for e in images.values()])
              for name in ("ssim", "ms_ssim", "psnr")}
  pairwise = {name: _mean([e[f"dice_pair_{name}"] for e in images.values()])["mean"]
              for name in ("mean", "std", "min")}
  return {
      "workdir": str(run.workdir), "split": split,
      "checkpoint": {"requested": run.checkpoint, "step": run.step, "source": run.source},
      "dataset": run.config.data.name, "seeds": seeds, "reference_seed": seeds[0],
      "runs": m, "map_size": size, "n_images": len(images),
      "n_cases": len(counts), "dimension": "3d" if volumetric else "2d",
      "instance": instance, "ms_ssim_skipped": skip_reason,
      "pairwise_dice": pairwise,
      "dice_per_run": per_run,
      "dice_across_runs": {"mean": float(np.mean(per_run)), "std": float(np.std(per_run)),
                           "min": float(np.min(per_run)), "max": float(np.max(per_run))},
      "convention": convention, "images": images, "seconds": seconds,
      "protocol": ("single step, one z_T per run shared by all images; maps p*255 rounded; "
                   "SSIM/MS-SSIM/PSNR of each run vs the reference run (torchmetrics-0.7 "
                   "defaults, inferred data range), mean over runs then images; pairwise Dice "
                   "over all run pairs per image (both empty = 1)"),
      "uncertainty_dir": None if uncertainty_dir is None else str(uncertainty_dir),
  }


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
  except (restore.RestoreError, ValueError) as e:
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
