"""Jittable label-free inference: the noise draw, binary and class-embedding predictions.

Noise: `draw_noise` is the one place z_T is drawn (evaluators, evaluate, stability, predict,
the step and the benchmark call it). `predict` and `stability` follow the official `log_dice`:
one z_T per run (`run_noise`, from the run's seed) re-used for every image of that run
(docs/method.md#noise-draws), so a prediction depends on the seed but not on the batch
size, the batch an image falls into or the number of devices. (The Dice evaluator draws one
per image instead; both are valid single-step protocols, the shared draw is the official one.)

Class-embedding models (the official multi-class extension,
docs/method.md#multi-class-extension; experimental, not in the paper) add `label_emb(y)` to the
UNet's time embedding and are asked once per class with the SAME noise and condition; the
decoded maps are compared:

  m_k = channel mean of VAE_dec(z0_hat(y = k))   (raw decoder output: no clamp, no rescale)
  m_0 <- -m_0                                     (class 0 was trained on "any organ", so its
                                                   negation is a background score)
  p = softmax_k(m) ;  label = argmax_k p

Here the K passes are ONE batched UNet call and ONE batched decode (the K class queries are
stacked along the batch axis), so a K-class prediction costs one compiled call.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp

from sdseg_jax import diffusion
from sdseg_jax.models import sdseg


def draw_noise(model: sdseg.SDSeg, key: jax.Array, batch: int) -> jax.Array:
  """z_T of shape (batch, r, r, c): standard normal float32 latents drawn from `key`."""
  s = model.latent_size
  return jax.random.normal(key, (batch, s, s, model.latent_channels), jnp.float32)


def run_noise(model: sdseg.SDSeg, seed: int) -> jax.Array:
  """The run's z_T (1, r, r, c), drawn once from `seed` and broadcast over every image."""
  return draw_noise(model, jax.random.key(seed), 1)


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


def class_probabilities(model: sdseg.SDSeg, params: Any, vae_params: Any,
                        scale_factor: jax.Array, image: jax.Array, z_T: jax.Array) -> jax.Array:
  """Single-step per-class probabilities (B, R, R, C) for images (B, R, R, 3).

  Binary models: C = 1, the official foreground probability (clamped channel mean).
  Class-embedding models: C = K, the softmax of `predict_labels` (argmax = labels).
  """
  z_T = jnp.broadcast_to(z_T, (image.shape[0],) + z_T.shape[1:])
  if model.unet.num_classes is not None:
    return predict_labels(model, params, vae_params, image, z_T, scale_factor)["probs"]
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
