"""The paper's stability protocol: how much does a single-step prediction depend on the noise?

Protocol (docs/method.md#stability-protocol; the official `scripts/stability_evaluation.ipynb`):
M single-step inference runs over the split with noise seeds s_0..s_{M-1}; each run draws ONE
z_T (`inference.run_noise`) and re-uses it for every image, as the official `log_dice`. The
probability maps are taken on the 0-255 scale as the saved uint8 `*-logits.png` files (p*255
rounded), and for every image SSIM, MS-SSIM and PSNR are computed between each run and the
reference run 0 (torchmetrics-0.7 rules of `image_similarity`: inferred data range, all-zero
maps skipped, identical pairs skipped for PSNR), averaged over runs, then over images. For 3D
sets only slices with a non-empty ground truth enter these image metrics, as the official script
saved only those.

Added here (not in the paper): the pairwise Dice between the M binary masks of each image
(mean / std / min over the M(M-1)/2 pairs, symmetric convention: two empty masks agree), the
ground-truth Dice of every run (the official per-case Dice, volumes summed over slices) and its
spread across runs, and optional per-pixel uncertainty maps (std over runs) as PNGs.

MS-SSIM with 5 scales needs images of at least 176 px (the coarsest scale, 1/16 of the size,
must hold the 11-tap window). Smaller maps (e.g. the 64 px demo) are NOT upsampled, which would
change what is measured: MS-SSIM is skipped and the result says why ("ms_ssim_skipped").

Cost: the M runs of a batch of B images are ONE jitted call (the M noise tensors are vmapped,
the condition is computed once), i.e. M*B decoder passes per call.
"""

from __future__ import annotations

import functools
import io
import math
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from sdseg_jax import image_similarity
from sdseg_jax import inference
from sdseg_jax import mask_io
from sdseg_jax import metrics as metrics_lib
from sdseg_jax import sharding as sharding_lib
from sdseg_jax import storage
from sdseg_jax.evaluators import common
from sdseg_jax.models import sdseg

MS_SSIM_SCALES = len(image_similarity.MS_SSIM_BETAS)
# Smallest side for 5-scale MS-SSIM: the coarsest scale (size / 16) must hold the 11-tap window.
MS_SSIM_MIN_SIZE = image_similarity.gaussian_kernel_1d().size * 2 ** (MS_SSIM_SCALES - 1)
PROTOCOL = ("single step, one z_T per run shared by all images; maps p*255 rounded; "
            "SSIM/MS-SSIM/PSNR of each run vs the reference run (torchmetrics-0.7 "
            "defaults, inferred data range), mean over runs then images; pairwise Dice "
            "over all run pairs per image (both empty = 1)")


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


class Evaluator(common.Evaluator):
  """Runs the protocol over a loader (B images per batch, M runs per image in one call)."""

  def __init__(self, model: sdseg.SDSeg, mesh: jax.sharding.Mesh, loader: Any, *,
               seeds: Optional[Sequence[int]] = None, noise_seed: int = 0, runs: int = 10,
               empty_convention: str = "official",
               uncertainty_dir: Optional[storage.PathLike] = None,
               jit: Callable[[Callable], Callable] = jax.jit):
    """`seeds` (first = reference run), else `runs` seeds from `noise_seed` on. `jit` compiles
    the runs function (`restore.Run.jit`-style caches let repeated protocols compile once)."""
    seeds = list(range(noise_seed, noise_seed + runs)) if seeds is None else seeds
    self.seeds = [int(s) for s in seeds]
    if len(self.seeds) < 2:
      raise ValueError(f"the stability protocol needs at least 2 runs, got seeds {self.seeds}")
    self.model, self.mesh, self.loader = model, mesh, loader
    self.empty_convention, self.uncertainty_dir = empty_convention, uncertainty_dir
    self._fn = jit(functools.partial(_runs_probabilities, model=model))

  def run(self, params: Any, vae_params: Any, scale_factor: Any) -> Dict[str, Any]:
    """The protocol's numbers (every key of the stability JSON but the run identity)."""
    m = len(self.seeds)
    z_runs = jnp.stack([inference.run_noise(self.model, s) for s in self.seeds])
    batch_sh = sharding_lib.batch_sharding(self.mesh)
    size = self.model.image_size
    skip_reason = ms_ssim_skip_reason(size)
    start = time.perf_counter()
    images: Dict[str, Dict[str, Any]] = {}
    ledger = common.CaseCounts()  # case -> (M, 3) |P∩G|, |P|, |G| per run
    for batch in self.loader:
      image = jax.make_array_from_process_local_data(batch_sh, np.asarray(batch["image"]))
      probs = common.gather(self._fn(params, vae_params, scale_factor, image, z_runs))
      gt_all = common.gather(batch["label"]) > 0
      rows = common.BatchRows.of(batch, with_names=True)
      masks_all = probs > 0.5  # (M, B, R, R)
      inter = np.sum(masks_all & gt_all[None], axis=(2, 3))
      gt_sum = np.broadcast_to(gt_all.sum(axis=(1, 2))[None], inter.shape)
      counts = np.stack([inter, masks_all.sum(axis=(2, 3)), gt_sum], axis=-1)  # (M, B, 3)
      ledger.add(rows, np.swapaxes(counts, 0, 1))
      for row in rows.valid:
        p, gt = probs[:, row], gt_all[row]
        if int(rows.slice[row]) >= 0 and not gt.any():
          continue  # official: only slices with a non-empty ground truth are compared
        maps = mask_io.probability_to_uint8(p).astype(np.float64)
        entry = image_stability(maps, 0, skip_reason is None)
        spread = image_similarity.pairwise_dice_spread(masks_all[:, row])
        entry.update({"dice_pair_mean": spread["mean"], "dice_pair_std": spread["std"],
                      "dice_pair_min": spread["min"]})
        images[rows.name[row]] = entry
        if self.uncertainty_dir is not None and jax.process_index() == 0:
          write_uncertainty(storage.path(self.uncertainty_dir) / f"{rows.name[row]}.png", p)
    seconds = time.perf_counter() - start

    per_run = []
    for r in range(m):
      dice = [metrics_lib.dice_from_counts(*(int(v) for v in c[r]), self.empty_convention)
              for c in ledger.totals.values()]
      per_run.append(float(np.mean(dice)) if dice else float("nan"))
    instance = {name: _mean([e[name] for e in images.values()])
                for name in ("ssim", "ms_ssim", "psnr")}
    pairwise = {name: _mean([e[f"dice_pair_{name}"] for e in images.values()])["mean"]
                for name in ("mean", "std", "min")}
    return {
        "seeds": self.seeds, "reference_seed": self.seeds[0],
        "runs": m, "map_size": size, "n_images": len(images),
        "n_cases": len(ledger.totals), "dimension": ledger.dimension,
        "instance": instance, "ms_ssim_skipped": skip_reason,
        "pairwise_dice": pairwise,
        "dice_per_run": per_run,
        "dice_across_runs": {"mean": float(np.mean(per_run)), "std": float(np.std(per_run)),
                             "min": float(np.min(per_run)), "max": float(np.max(per_run))},
        "convention": self.empty_convention, "images": images, "seconds": seconds,
        "protocol": PROTOCOL,
        "uncertainty_dir": None if self.uncertainty_dir is None else str(self.uncertainty_dir),
    }

  def scalars(self, result: Dict[str, Any]) -> Dict[str, float]:
    """Mean pairwise Dice between runs and the std of the per-run ground-truth Dice."""
    return {"pairwise_dice": float(result["pairwise_dice"]["mean"]),
            "dice_across_runs_std": float(result["dice_across_runs"]["std"])}
