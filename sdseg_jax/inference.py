"""Jittable label-free inference functions shared by `predict` and `stability`.

Noise convention: like the official `log_dice`, one noise tensor z_T is drawn per run (from the
run's seed) and re-used for every image of that run (sdseg-method.md §5.1 step 3, §10.11), so a
prediction depends on the seed but not on the batch size, the batch an image falls into or the
number of devices. (The training-time `Evaluator` draws per image instead; both are valid
single-step protocols, the shared draw is the official one.)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sdseg_jax import multiclass
from sdseg_jax.models import sdseg


def run_noise(model: sdseg.SDSeg, seed: int) -> jax.Array:
  """The run's z_T (1, r, r, c), drawn once from `seed` and broadcast over every image."""
  s = model.latent_size
  return jax.random.normal(jax.random.key(seed), (1, s, s, model.latent_channels), jnp.float32)


def probability(model: sdseg.SDSeg, params: Any, vae_params: Any, scale_factor: jax.Array,
                image: jax.Array, z_T: jax.Array) -> jax.Array:
  """Single-step foreground probability (B, R, R) in [0, 1] for images (B, R, R, 3).

  Binary models: the official clamped channel mean. Class-embedding models: 1 - p(background)
  of the K-class softmax (the label map itself comes from `multiclass.predict_labels`).
  """
  z_T = jnp.broadcast_to(z_T, (image.shape[0],) + z_T.shape[1:])
  if model.unet.num_classes is not None:
    out = multiclass.predict_labels(model, params, vae_params, image, z_T, scale_factor)
    return 1.0 - out["probs"][..., 0]
  return model.predict(params, vae_params, image, z_T, scale_factor)["prob"]


def probability_flip_tta(model: sdseg.SDSeg, params: Any, vae_params: Any,
                         scale_factor: jax.Array, image: jax.Array, z_T: jax.Array) -> jax.Array:
  """Flip test-time augmentation: mean of identity, h-flip and v-flip, flips undone.

  The three views go through the network as ONE batch of 3B (same z_T for all views).
  """
  b = image.shape[0]
  views = jnp.concatenate([image, image[:, :, ::-1], image[:, ::-1]], axis=0)
  prob = probability(model, params, vae_params, scale_factor, views, z_T)
  identity, hflip, vflip = prob[:b], prob[b:2 * b], prob[2 * b:]
  return (identity + hflip[:, :, ::-1] + vflip[:, ::-1]) / 3.0
