"""The paper's evaluator: Dice/IoU per case (and optionally HD95/ASSD), single step or DDIM.

Used during training (EMA UNet on the validation split, `config.evals` type "dice") and by
`python -m sdseg_jax.evaluate`. Per example, the jitted step returns only the pixel counts
|P∩G|, |P|, |G| (and the probability maps, for the PNG panels or the distances), so what crosses
hosts is tiny. Counts are summed per case on the host (`common.CaseCounts`): a case is one image
for 2D sets and one volume (all its slices) for 3D sets, exactly the official per-volume scoring.

Noise (`noise`): "per_image" (default), one z_T per image drawn from
fold_in(key(noise_seed), batch index), so a score depends on the seed and the batch size but not
on the device count; or "shared", ONE z_T from key(noise_seed) reused for every image of every
batch, as the official `log_dice` (and `predict`), for the `official` reproduction protocol.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import numpy as np

from sdseg_jax import diffusion
from sdseg_jax import errors
from sdseg_jax import inference
from sdseg_jax import metrics as metrics_lib
from sdseg_jax import sharding as sharding_lib
from sdseg_jax.evaluators import common
from sdseg_jax.models import sdseg

NOISES = ("per_image", "shared")


def _predict_counts(params, vae_params, image, label, scale_factor, noise_key, *,
                    model: sdseg.SDSeg, ddim_steps: int, ddim_eta: float, shared_noise: bool):
  """(counts (B, 3), foreground probability (B, R, R)) of one batch."""
  if shared_noise:  # the run's single z_T (inference.run_noise), broadcast over the batch
    one = inference.draw_noise(model, noise_key, 1)
    z_T = jnp.broadcast_to(one, (image.shape[0],) + one.shape[1:])
  else:
    z_T = inference.draw_noise(model, noise_key, image.shape[0])
  ddim_rng = jax.random.fold_in(noise_key, 1)
  if model.unet.num_classes is not None:
    # Class-embedding model: score the foreground (any class) of its label map.
    out = inference.predict_labels(model, params, vae_params, image, z_T, scale_factor,
                                   ddim_steps=ddim_steps, ddim_eta=ddim_eta, rng=ddim_rng)
    return common.binary_counts(out["labels"] > 0, label), 1.0 - out["probs"][..., 0]
  cond = model.encode_image(params, image)
  if ddim_steps > 0:
    eps_fn = lambda z, t: model.denoise(params["unet"], z, cond, t)
    z0 = diffusion.ddim_sample(model.schedule, eps_fn, z_T, ddim_steps, ddim_eta, ddim_rng)
  else:
    z0 = model.predict_latent(params["unet"], cond, z_T)
  prob = sdseg.mask_probability(model.decode(vae_params, z0, scale_factor))
  return common.binary_counts(prob > 0.5, label), prob


class Evaluator(common.Evaluator):
  """Scores eval-loader batches with given weights; compiled once per (mesh, batch shape)."""

  SCALARS = ("dice", "iou")

  def __init__(self, model: sdseg.SDSeg, mesh: jax.sharding.Mesh, loader: Any, *,
               noise_seed: int = 0, empty_convention: str = "official", ddim_steps: int = 0,
               ddim_eta: float = 1.0, distances: bool = False, num_panels: int = 0,
               noise: str = "per_image"):
    """`distances`: also HD95/ASSD per case (in pixels), which needs every predicted mask on
    the host (slices of a volume are stacked in slice order), so it is off during training.
    `num_panels`: image|truth|prediction|probability strips returned for the first rows.
    `noise`: "per_image" or "shared" (module docstring)."""
    if noise not in NOISES:
      raise errors.ConfigError(f"noise must be one of {NOISES}, got {noise!r}")
    self.shared_noise = noise == "shared"
    self.model, self.mesh, self.loader = model, mesh, loader
    self.noise_seed, self.empty_convention = noise_seed, empty_convention
    self.distances, self.num_panels = distances, num_panels
    batch_sh = sharding_lib.batch_sharding(mesh)
    self._step = jax.jit(
        functools.partial(_predict_counts, model=model, ddim_steps=ddim_steps,
                          ddim_eta=ddim_eta, shared_noise=self.shared_noise),
        out_shardings=(batch_sh, batch_sh))

  def run(self, params: Any, vae_params: Any, scale_factor: Any) -> Dict[str, Any]:
    """Returns {"dice", "iou", "dice_std", "num_cases", "cases": {case: {...}}, "panels"}.

    Also "dimension" ("2d": a case is an image, "3d": a volume of slices) and, with
    `distances`, "hd95"/"assd" (NaN-aware means) and per-case "hd95"/"assd" (NaN if a mask
    is empty).
    """
    ledger = common.CaseCounts(keep_masks=self.distances)
    panels: List[np.ndarray] = []
    key = jax.random.key(self.noise_seed)
    for index, batch in enumerate(self.loader):
      arrays = sharding_lib.host_batch_to_global(
          {"image": batch["image"], "label": batch["label"]}, self.mesh)
      counts, prob = self._step(params, vae_params, arrays["image"], arrays["label"],
                                scale_factor,
                                key if self.shared_noise else jax.random.fold_in(key, index))
      rows = common.BatchRows.of(batch)
      pred = gt = None
      if self.distances:
        pred, gt = common.gather(prob) > 0.5, common.gather(batch["label"]) > 0
      ledger.add(rows, common.gather(counts), pred, gt)
      if len(panels) < self.num_panels:
        panels += self._panels(batch, prob, self.num_panels - len(panels))
    cases = {}
    for case in ledger.cases():
      cases[case] = common.dice_iou(ledger.totals[case], self.empty_convention)
      if self.distances:
        cases[case]["hd95"], cases[case]["assd"] = metrics_lib.hd95_assd(*ledger.masks(case))
    dice = np.array([c["dice"] for c in cases.values()])
    iou = np.array([c["iou"] for c in cases.values()])
    result = {"dice": float(dice.mean()) if len(dice) else float("nan"),
              "iou": float(iou.mean()) if len(iou) else float("nan"),
              "dice_std": float(dice.std()) if len(dice) else float("nan"),
              "num_cases": len(cases), "cases": cases, "panels": panels,
              "dimension": ledger.dimension}
    if self.distances:
      for name in ("hd95", "assd"):
        result[name] = common.mean_or_nan([c[name] for c in cases.values()])
    return result

  @staticmethod
  def _panels(batch: Dict[str, np.ndarray], prob: jax.Array, limit: int) -> List[np.ndarray]:
    """image | truth | prediction | probability strips (uint8 RGB) for this host's rows."""
    local = np.concatenate([np.asarray(s.data) for s in prob.addressable_shards], axis=0)
    out = []
    for row in range(min(limit, local.shape[0])):
      if not batch["valid"][row]:
        continue
      image = ((np.asarray(batch["image"][row]) + 1) * 127.5).clip(0, 255).astype(np.uint8)
      truth = np.repeat((batch["label"][row] > 0)[..., None] * 255, 3, -1).astype(np.uint8)
      pred = np.repeat((local[row] > 0.5)[..., None] * 255, 3, -1).astype(np.uint8)
      probability = np.repeat((local[row] * 255).round()[..., None], 3, -1).astype(np.uint8)
      out.append(np.concatenate([image, truth, pred, probability], axis=1))
    return out
