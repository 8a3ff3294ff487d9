"""A stand-in for the kl-f8 download: train the configured VAE on the training masks (and images).

SDSeg needs a frozen autoencoder that can encode and decode masks, and its vision encoder starts
as a copy of that autoencoder's encoder. The paper uses the public kl-f8 weights, an IMAGE
autoencoder. Where kl-f8 cannot be had (the built-in demo on a laptop, offline tests,
`cpu_small`) this trains the configured AutoencoderKL on the training masks, or, with
`with_images` (config.init.pretrain_vae_images), as a general autoencoder on batches that are
half images, half masks (both 3-channel in [-1, 1]), so that the vision encoder starts from an
encoder that has seen images, as with kl-f8. Images are off by default: at the CPU budgets
measured (Kvasir-SEG `cpu_small`, the learning test) they did not help the small model and cost
mask reconstruction quality (BENCHMARKS.md, "Real Kvasir-SEG, CPU-sized model"). The objective
is the LDM first-stage one reduced to its pixel terms: L1 reconstruction of the posterior sample
plus a 1e-6-weighted KL term (LDM's kl_weight), per-sample sums as in LDM's
LPIPSWithDiscriminator, no perceptual or adversarial term. The result is saved as
WORKDIR/pretrained_vae.npz and reused when the run resumes.
"""

import functools
import logging
import time
from typing import Any, Iterator

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sdseg_jax import sharding as sharding_lib
from sdseg_jax import storage
from sdseg_jax.models import sdseg
from sdseg_jax.models import vae as vae_lib

KL_WEIGHT = 1e-6


def _loss(vae_params, x, rng, *, vae: vae_lib.AutoencoderKL):
  """LDM's pixel objective on a batch `x` (B, R, R, 3) in [-1, 1], per-sample sums."""
  posterior = vae.apply({"params": vae_params}, x, method=vae.encode)
  recon = vae.apply({"params": vae_params}, posterior.sample(rng), method=vae.decode)
  b = x.shape[0]
  rec = jnp.sum(jnp.abs(recon - x)) / b
  kl = 0.5 * jnp.sum(posterior.mean ** 2 + jnp.exp(posterior.logvar) - 1 - posterior.logvar) / b
  return rec + KL_WEIGHT * kl, {"rec_l1_mean": rec / np.prod(x.shape[1:]), "kl": kl}


def autoencoder_batch(batch: dict) -> np.ndarray:
  """The pre-training input of one loader batch of B records: the images of the first B // 2
  records, then the masks of the others (B examples, so a step costs what a masks-only one did)."""
  half = len(batch["mask"]) // 2
  return np.concatenate([np.asarray(batch["image"][:half]), np.asarray(batch["mask"][half:])])


def pretrain_vae(model: sdseg.SDSeg, vae_params: Any, batches: Iterator[dict], *, steps: int,
                 learning_rate: float, mesh: jax.sharding.Mesh, rng: jax.Array,
                 with_images: bool = False, log_every: int = 50) -> Any:
  """Trains `vae_params` for `steps` Adam steps on the "mask" entries of `batches`, or with
  `with_images` on `autoencoder_batch` of them (half images, half masks)."""
  tx = optax.adam(learning_rate)
  replicated = sharding_lib.replicated(mesh)

  @functools.partial(jax.jit, donate_argnums=(0, 1), out_shardings=(replicated,) * 3)
  def step(params, opt_state, x, key):
    (_, aux), grads = jax.value_and_grad(functools.partial(_loss, vae=model.vae),
                                         has_aux=True)(params, x, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, aux

  opt_state = jax.jit(tx.init, out_shardings=replicated)(vae_params)
  start = time.perf_counter()
  for i in range(steps):
    batch = next(batches)
    x = autoencoder_batch(batch) if with_images else batch["mask"]
    x = sharding_lib.host_batch_to_global({"x": x}, mesh)["x"]
    vae_params, opt_state, aux = step(vae_params, opt_state, x, jax.random.fold_in(rng, i))
    if (i + 1) % log_every == 0 or i + 1 == steps:
      logging.info("VAE pre-training step %d/%d: mean |x - x_rec| = %.4f (%.1f s)", i + 1,
                   steps, float(aux["rec_l1_mean"]), time.perf_counter() - start)
  return vae_params


def saved_path(workdir: epath.Path) -> epath.Path:
  return workdir / "pretrained_vae.npz"


def frozen_vae_source(config: Any, workdir: epath.Path) -> tuple[epath.Path, str]:
  """(file, description) of the run's frozen VAE: the one rule training, the inference export
  and restore follow. config.init.vae (converted kl-f8) first, then the VAE inside
  config.init.sdseg (a converted SDSeg checkpoint), else this pre-training's WORKDIR file."""
  if config.init.get("vae"):
    return storage.path(config.init.vae), "kl-f8 VAE"
  if config.init.get("sdseg"):
    return storage.path(config.init.sdseg), "VAE"
  return saved_path(workdir), "pretrained VAE"
