"""Single-step (or DDIM) evaluation of a model over an eval loader: Dice/IoU per case.

Used during training (EMA UNet on the validation split) and by `python -m sdseg_jax.evaluate`.
Per example, the jitted step returns only the pixel counts |P∩G|, |P|, |G| (and, for the first
batch, the probability maps for the PNG panels), so what crosses hosts is tiny. Counts are then
summed per case on the host: a case is one image for 2D sets and one volume (all its slices)
for 3D sets, which is exactly the official per-volume scoring.
"""

import functools
import io
from typing import Any, Dict, List, Optional, Tuple

from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
from PIL import Image

from sdseg_jax import diffusion
from sdseg_jax import metrics as metrics_lib
from sdseg_jax import multiclass
from sdseg_jax import sharding as sharding_lib
from sdseg_jax import storage
from sdseg_jax.models import sdseg


def _predict_counts(params, vae_params, image, label, scale_factor, noise_key, *,
                    model: sdseg.SDSeg, ddim_steps: int, ddim_eta: float):
  s = model.latent_size
  z_T = jax.random.normal(noise_key, (image.shape[0], s, s, model.latent_channels), jnp.float32)
  if model.unet.num_classes is not None:
    # Class-embedding model: score the foreground (any class) of its label map.
    out = multiclass.predict_labels(model, params, vae_params, image, z_T, scale_factor,
                                    ddim_steps=ddim_steps, ddim_eta=ddim_eta,
                                    rng=jax.random.fold_in(noise_key, 1))
    return _counts(out["labels"] > 0, label), 1.0 - out["probs"][..., 0]
  cond = model.encode_image(params, image)
  if ddim_steps > 0:
    eps_fn = lambda z, t: model.denoise(params["unet"], z, cond, t)
    z0 = diffusion.ddim_sample(model.schedule, eps_fn, z_T, ddim_steps, ddim_eta,
                               jax.random.fold_in(noise_key, 1))
  else:
    z0 = model.predict_latent(params["unet"], cond, z_T)
  prob = sdseg.mask_probability(model.decode(vae_params, z0, scale_factor))
  return _counts(prob > 0.5, label), prob


def _counts(pred: jax.Array, label: jax.Array) -> jax.Array:
  """(B, 3) |P∩G|, |P|, |G| per example."""
  gt = label > 0
  return jnp.stack([jnp.sum(pred & gt, axis=(1, 2)), jnp.sum(pred, axis=(1, 2)),
                    jnp.sum(gt, axis=(1, 2))], axis=-1)


class Evaluator:
  """Scores eval-loader batches with given weights; compiled once per (mesh, batch shape)."""

  def __init__(self, model: sdseg.SDSeg, mesh: jax.sharding.Mesh, loader: Any, *,
               noise_seed: int = 0, empty_convention: str = "official", ddim_steps: int = 0,
               ddim_eta: float = 1.0, distances: bool = False):
    """`distances`: also HD95/ASSD per case (in pixels), which needs every predicted mask on
    the host (slices of a volume are stacked in slice order), so it is off during training."""
    self.model, self.mesh, self.loader = model, mesh, loader
    self.noise_seed, self.empty_convention = noise_seed, empty_convention
    self.distances = distances
    batch_sh = sharding_lib.batch_sharding(mesh)
    self._step = jax.jit(
        functools.partial(_predict_counts, model=model, ddim_steps=ddim_steps,
                          ddim_eta=ddim_eta),
        out_shardings=(batch_sh, batch_sh))

  def run(self, params: Any, vae_params: Any, scale_factor: Any,
          num_panels: int = 0) -> Dict[str, Any]:
    """Returns {"dice", "iou", "num_cases", "cases": {case: {...}}, "panels": [...]}.

    Also "dimension" ("2d": a case is an image, "3d": a volume of slices) and, with
    `distances`, "hd95"/"assd" (NaN-aware means) and per-case "hd95"/"assd" (NaN if a mask
    is empty).
    """
    totals: Dict[str, np.ndarray] = {}
    masks: Dict[str, List[Tuple[int, np.ndarray, np.ndarray]]] = {}
    volumetric = False
    panels: List[np.ndarray] = []
    key = jax.random.key(self.noise_seed)
    for index, batch in enumerate(self.loader):
      arrays = sharding_lib.host_batch_to_global(
          {"image": batch["image"], "label": batch["label"]}, self.mesh)
      counts, prob = self._step(params, vae_params, arrays["image"], arrays["label"],
                                scale_factor, jax.random.fold_in(key, index))
      counts = np.asarray(multihost_utils.process_allgather(counts, tiled=True))
      meta = multihost_utils.process_allgather(
          {"valid": batch["valid"], "slice": batch["slice"]}, tiled=True)
      cases = _allgather_strings(batch["case"])
      valid_rows = np.flatnonzero(np.asarray(meta["valid"]))
      slices = np.asarray(meta["slice"])
      volumetric = volumetric or bool(np.any(slices[valid_rows] >= 0))
      for row in valid_rows:
        totals[cases[row]] = totals.get(cases[row], 0) + counts[row].astype(np.int64)
      if self.distances:
        pred = np.asarray(multihost_utils.process_allgather(prob, tiled=True)) > 0.5
        gt = np.asarray(multihost_utils.process_allgather(batch["label"], tiled=True)) > 0
        for row in valid_rows:
          masks.setdefault(cases[row], []).append((int(slices[row]), pred[row], gt[row]))
      if len(panels) < num_panels:
        panels += self._panels(batch, prob, num_panels - len(panels))
    cases = {}
    for case, (inter, p, g) in sorted(totals.items()):
      cases[case] = {
          "dice": metrics_lib.dice_from_counts(int(inter), int(p), int(g), self.empty_convention),
          "iou": metrics_lib.iou_from_counts(int(inter), int(p), int(g), self.empty_convention)}
      if self.distances:
        ordered = sorted(masks[case], key=lambda item: item[0])
        is_volume = ordered[0][0] >= 0  # 2D images carry slice -1
        pred = np.stack([m for _, m, _ in ordered]) if is_volume else ordered[0][1]
        gt = np.stack([m for _, _, m in ordered]) if is_volume else ordered[0][2]
        cases[case]["hd95"], cases[case]["assd"] = metrics_lib.hd95_assd(pred, gt)
    dice = np.array([c["dice"] for c in cases.values()])
    iou = np.array([c["iou"] for c in cases.values()])
    result = {"dice": float(dice.mean()) if len(dice) else float("nan"),
              "iou": float(iou.mean()) if len(iou) else float("nan"),
              "dice_std": float(dice.std()) if len(dice) else float("nan"),
              "num_cases": len(cases), "cases": cases, "panels": panels,
              "dimension": "3d" if volumetric else "2d"}
    if self.distances:
      for name in ("hd95", "assd"):
        values = np.array([c[name] for c in cases.values()], np.float64)
        finite = values[np.isfinite(values)]
        result[name] = float(finite.mean()) if finite.size else float("nan")
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


def _allgather_strings(values: np.ndarray) -> List[str]:
  """All hosts' case names in global batch order (fixed-width bytes cross the hosts)."""
  if jax.process_count() == 1:
    return [str(v) for v in values]
  encoded = np.array([str(v).encode()[:128].ljust(128, b"\0") for v in values])
  as_bytes = np.frombuffer(encoded.tobytes(), np.uint8).reshape(len(values), 128)
  gathered = np.asarray(multihost_utils.process_allgather(as_bytes, tiled=True))
  return [bytes(row).rstrip(b"\0").decode() for row in gathered]


def write_panels(panels: List[np.ndarray], path: epath.Path) -> Optional[epath.Path]:
  """Stacks the panel strips vertically into one PNG (process 0 only; local or gs://)."""
  if not panels or jax.process_index() != 0:
    return None
  png = io.BytesIO()
  Image.fromarray(np.concatenate(panels, axis=0)).save(png, format="PNG")
  storage.write_bytes_atomic(path, png.getvalue())
  return path
