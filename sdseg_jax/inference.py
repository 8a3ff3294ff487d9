"""Jittable label-free inference functions shared by `predict` and `stability`.

Noise convention: like the official `log_dice`, one noise tensor z_T is drawn per run (from the
run's seed) and re-used for every image of that run (docs/method.md#noise-draws), so a
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


def class_probabilities(model: sdseg.SDSeg, params: Any, vae_params: Any,
                        scale_factor: jax.Array, image: jax.Array, z_T: jax.Array) -> jax.Array:
  """Single-step per-class probabilities (B, R, R, C) for images (B, R, R, 3).

  Binary models: C = 1, the official foreground probability (clamped channel mean).
  Class-embedding models: C = K, the softmax of `multiclass.predict_labels` (argmax = labels).
  """
  z_T = jnp.broadcast_to(z_T, (image.shape[0],) + z_T.shape[1:])
  if model.unet.num_classes is not None:
    return multiclass.predict_labels(model, params, vae_params, image, z_T, scale_factor)["probs"]
  return model.predict(params, vae_params, image, z_T, scale_factor)["prob"][..., None]


def class_probabilities_flip_tta(model: sdseg.SDSeg, params: Any, vae_params: Any,
                                 scale_factor: jax.Array, image: jax.Array,
                                 z_T: jax.Array) -> jax.Array:
  """Flip test-time augmentation: mean of identity, h-flip and v-flip, flips undone.

  The three views go through the network as ONE batch of 3B (same z_T for all views).
  """
  b = image.shape[0]
  views = jnp.concatenate([image, image[:, :, ::-1], image[:, ::-1]], axis=0)
  prob = class_probabilities(model, params, vae_params, scale_factor, views, z_T)
  identity, hflip, vflip = prob[:b], prob[b:2 * b], prob[2 * b:]
  return (identity + hflip[:, :, ::-1] + vflip[:, ::-1]) / 3.0


def foreground(class_probs: jax.Array) -> jax.Array:
  """(..., C) class probabilities -> foreground probability (...): p for C = 1, else 1 - p_0."""
  if class_probs.shape[-1] == 1:
    return class_probs[..., 0]
  return 1.0 - class_probs[..., 0]
