"""Multi-class SDSeg (class-embedding conditioning): inference, scoring and training helpers.

The official multi-class extension (docs/method.md#multi-class-extension; experimental, not in
the paper) keeps
the binary model and adds a class embedding `label_emb(y)` to the UNet's time embedding. It is
trained on binary targets chosen per slice: a class k drawn uniformly among the classes present,
target (label == k) for k > 0 and the organ union (label != 0) for k = 0. At inference the model
is asked once per class with the SAME noise and condition; the decoded maps are compared:

  m_k = channel mean of VAE_dec(z0_hat(y = k))   (raw decoder output: no clamp, no rescale)
  m_0 <- -m_0                                     (class 0 was trained on "any organ", so its
                                                   negation is a background score)
  p = softmax_k(m) ;  label = argmax_k p

Here the K passes are ONE batched UNet call and ONE batched decode (the K class queries are
stacked along the batch axis), so a K-class prediction costs one compiled call.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sdseg_jax import diffusion
from sdseg_jax import metrics as metrics_lib
from sdseg_jax import optim
from sdseg_jax import storage
from sdseg_jax.models import sdseg

# The official fine-tune configs (synapse-cls{9,14}-...-finetune.yaml) train label_emb at 100x
# the base learning rate; `config.optim.label_emb_lr_scale` overrides it where the field exists.
LABEL_EMB_LR_SCALE = 100.0
LABEL_EMB = "label_emb"


def num_classes(model_config: ml_collections.ConfigDict) -> Optional[int]:
  """config.model.unet.num_classes, or None for the binary (paper) model."""
  value = model_config.unet.get("num_classes", None)
  return None if value is None else int(value)


# ---- inference --------------------------------------------------------------------------------


def scores_to_probabilities(class_maps: jax.Array) -> jax.Array:
  """(K, B, H, W) raw per-class maps -> (B, H, W, K) class probabilities.

  Class 0's map is negated before the softmax: its training target was the union of all
  foreground classes, so a high value means "some organ", i.e. NOT background.
  """
  class_maps = class_maps.astype(jnp.float32)
  signs = jnp.ones((class_maps.shape[0],), jnp.float32).at[0].set(-1.0)
  scores = class_maps * signs[:, None, None, None]
  return jax.nn.softmax(jnp.moveaxis(scores, 0, -1), axis=-1)


def predict_labels(model: sdseg.SDSeg, params: Any, vae_params: Any, image: jax.Array,
                   z_T: jax.Array, scale_factor: jax.Array, *, ddim_steps: int = 0,
                   ddim_eta: float = 1.0, rng: Optional[jax.Array] = None
                   ) -> Dict[str, jax.Array]:
  """Image batch (B, R, R, 3) -> {"labels" (B, R, R) int32, "probs" (B, R, R, K), "maps"}.

  One UNet pass per class k = 0..K-1, all K stacked into one batch of K*B (same z_T and
  condition for every class, y = k), then one batched decode. `maps` are the raw channel means
  (K, B, R, R) before the class-0 negation.
  """
  k = model.unet.num_classes
  if k is None:
    raise ValueError("predict_labels needs a class-embedding model (model.unet.num_classes)")
  b = image.shape[0]
  cond = model.encode_image(params, image)
  tile = lambda x: jnp.broadcast_to(x[None], (k,) + x.shape).reshape((k * b,) + x.shape[1:])
  cond_k, z_k = tile(cond), tile(z_T.astype(jnp.float32))
  y = jnp.repeat(jnp.arange(k, dtype=jnp.int32), b)
  if ddim_steps > 0:
    if rng is None:
      raise ValueError("DDIM sampling needs an rng")
    eps_fn = lambda z, t: model.denoise(params["unet"], z, cond_k, t, y)
    z0 = diffusion.ddim_sample(model.schedule, eps_fn, z_k, ddim_steps, ddim_eta, rng)
  else:
    z0 = model.predict_latent(params["unet"], cond_k, z_k, y)
  decoded = model.decode(vae_params, z0, scale_factor)
  maps = jnp.mean(decoded.astype(jnp.float32), axis=-1).reshape((k, b) + decoded.shape[1:3])
  probs = scores_to_probabilities(maps)
  return {"labels": jnp.argmax(probs, axis=-1).astype(jnp.int32), "probs": probs, "maps": maps}


# ---- scoring ------------------------------------------------------------------------------------


def _dice_iou(pred: np.ndarray, gt: np.ndarray, spacing=None,
              empty_convention: metrics_lib.EmptyConvention = "official") -> Dict[str, float]:
  del spacing  # overlap metrics only
  return {"dice": metrics_lib.dice(pred, gt, empty_convention),
          "iou": metrics_lib.iou(pred, gt, empty_convention)}


def per_class_dice(pred_labels: np.ndarray, gt_labels: np.ndarray, num_classes: int,
                   empty_convention: metrics_lib.EmptyConvention = "official"
                   ) -> Dict[int, Dict[str, float]]:
  """Dice/IoU per foreground class 1..K-1 of one case (an image or a stacked volume)."""
  return metrics_lib.per_class(pred_labels, gt_labels, num_classes,
                               empty_convention=empty_convention, metric_fn=_dice_iou)


def class_counts(pred_labels: np.ndarray, gt_labels: np.ndarray, num_classes: int) -> np.ndarray:
  """(K, 3) int64 |P∩G|, |P|, |G| per class: what per-volume scoring sums over slices."""
  pred_labels, gt_labels = np.asarray(pred_labels), np.asarray(gt_labels)
  out = np.zeros((num_classes, 3), np.int64)
  for c in range(num_classes):
    p, g = pred_labels == c, gt_labels == c
    out[c] = (np.sum(p & g), np.sum(p), np.sum(g))
  return out


def summarize_counts(case_counts: Mapping[str, np.ndarray],
                     empty_convention: metrics_lib.EmptyConvention = "official"
                     ) -> Dict[str, Any]:
  """Official multi-class aggregation: per-class Dice per case, mean over cases, then classes.

  Args:
    case_counts: {case: (K, 3) counts} (slices of a volume already summed).

  Returns:
    {"dice", "iou" (means over classes 1..K-1), "per_class": {c: {"dice", "iou"}},
     "cases": {case: {"dice_<c>", "iou_<c>"}}}
  """
  cases: Dict[str, Dict[str, float]] = {}
  num = None
  for case, counts in sorted(case_counts.items()):
    num = counts.shape[0]
    row = {}
    for c in range(1, num):
      inter, p, g = (int(v) for v in counts[c])
      row[f"dice_{c}"] = metrics_lib.dice_from_counts(inter, p, g, empty_convention)
      row[f"iou_{c}"] = metrics_lib.iou_from_counts(inter, p, g, empty_convention)
    cases[case] = row
  per_class: Dict[int, Dict[str, float]] = {}
  for c in range(1, num or 0):
    per_class[c] = {m: float(np.mean([r[f"{m}_{c}"] for r in cases.values()]))
                    for m in ("dice", "iou")}
  mean = lambda m: (float(np.mean([v[m] for v in per_class.values()])) if per_class
                    else float("nan"))
  return {"dice": mean("dice"), "iou": mean("iou"), "per_class": per_class, "cases": cases}


# ---- training --------------------------------------------------------------------------------


def _param_labels(params: Any) -> Any:
  """'label_emb' for the class embedding's parameters, 'default' for every other leaf."""
  def label(path, _):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return LABEL_EMB if LABEL_EMB in names else "default"
  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The run's optimizer: optim.make_optimizer, with label_emb at a scaled learning rate.

  Binary runs get exactly `optim.make_optimizer(config)`. Class-embedding runs get the same
  AdamW for every parameter except the UNet's `label_emb`, whose learning rate (and, AdamW
  being decoupled, weight-decay step) is LABEL_EMB_LR_SCALE times larger, as the official
  multi-class fine-tune recipe. Used by training AND by restore, so checkpoints round-trip.
  """
  if num_classes(config.model) is None:
    return optim.make_optimizer(config)
  scale = float(config.optim.get("label_emb_lr_scale", LABEL_EMB_LR_SCALE))
  scaled = config.copy_and_resolve_references()
  scaled.optim.base_lr = config.optim.base_lr * scale
  return optax.multi_transform(
      {"default": optim.make_optimizer(config), LABEL_EMB: optim.make_optimizer(scaled)},
      _param_labels)


def lacks_label_emb(path: str, abstract_unet: Mapping[str, Any]) -> bool:
  """True when the model has a class embedding but the SDSeg weights file at `path` has none.

  That is the official fine-tune start (a binary checkpoint; label_emb stays random). Reads
  only the npz directory. A missing or unreadable file returns False, so the loader reports it.
  """
  if LABEL_EMB not in abstract_unet:
    return False
  try:
    # Local or gs:// (ranged reads of the zip directory only).
    with storage.path(path).open("rb") as f, np.load(f, allow_pickle=False) as npz:
      return not any(k.startswith(f"unet/{LABEL_EMB}/") for k in npz.files)
  except (OSError, ValueError):
    return False


def sample_class(label_map: np.ndarray, num_classes: int, rng: np.random.Generator
                 ) -> tuple[int, np.ndarray]:
  """One training target of the official multi-class loader, drawn with `rng`.

  k is uniform among the classes present in the slice (0 included when there is background);
  the binary target is (label == k) for k > 0 and (label != 0) for k = 0. Labels >= num_classes
  are an error (they would index past the class embedding).
  """
  present = np.unique(label_map)
  if present.size and int(present[-1]) >= num_classes:
    raise ValueError(f"label value {int(present[-1])} >= model.unet.num_classes={num_classes}")
  k = int(rng.choice(present)) if present.size else 0
  target = (label_map != 0) if k == 0 else (label_map == k)
  return k, target.astype(np.uint8)
