"""The diffusion maths of SDSeg: schedule, forward noising, x0 recovery, loss and samplers.

Everything is pure jax.numpy over arrays, independent of the networks: the denoiser is passed
in as a function `eps_fn(z_t, t) -> eps_hat`. The schedule is LDM's "linear" one, which squares
a linspace of sqrt(beta) (the option literally called "sqrt_linear" in LDM is NOT used), built in
float64 and stored in float32 as the official buffers are.
"""

import dataclasses
from typing import Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from sdseg_jax import errors

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Per-timestep constants of the forward process, as float32 numpy arrays of length T."""
  betas: np.ndarray
  alphas_cumprod: np.ndarray

  @property
  def num_timesteps(self) -> int:
    return len(self.betas)

  @property
  def sqrt_alphas_cumprod(self) -> np.ndarray:
    return np.sqrt(self.alphas_cumprod.astype(np.float64)).astype(np.float32)

  @property
  def sqrt_one_minus_alphas_cumprod(self) -> np.ndarray:
    return np.sqrt(1.0 - self.alphas_cumprod.astype(np.float64)).astype(np.float32)

  @property
  def sqrt_recip_alphas_cumprod(self) -> np.ndarray:
    return np.sqrt(1.0 / self.alphas_cumprod.astype(np.float64)).astype(np.float32)

  @property
  def sqrt_recipm1_alphas_cumprod(self) -> np.ndarray:
    return np.sqrt(1.0 / self.alphas_cumprod.astype(np.float64) - 1).astype(np.float32)


def make_schedule(timesteps: int = 1000, linear_start: float = 0.0015,
                  linear_end: float = 0.0155) -> Schedule:
  """LDM `make_beta_schedule("linear")`: betas = linspace(sqrt(start), sqrt(end), T) ** 2.

  Like the official `register_schedule`, the cumulative product is taken in float64 and the
  buffers (and the coefficients derived from them) are then cast to float32.
  """
  betas = np.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=np.float64) ** 2
  alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
  return Schedule(betas.astype(np.float32), alphas_cumprod.astype(np.float32))


def _take(coefs: np.ndarray, t: jax.Array, ndim: int) -> jax.Array:
  """Gathers per-sample coefficients and broadcasts them over the latent's trailing axes."""
  values = jnp.asarray(coefs)[t]
  return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def q_sample(schedule: Schedule, z0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) noise."""
  return (_take(schedule.sqrt_alphas_cumprod, t, z0.ndim) * z0
          + _take(schedule.sqrt_one_minus_alphas_cumprod, t, z0.ndim) * noise)


def predict_x0_from_eps(schedule: Schedule, z_t: jax.Array, t: jax.Array,
                        eps: jax.Array) -> jax.Array:
  """z0_hat = sqrt(1/abar_t) z_t - sqrt(1/abar_t - 1) eps_hat, in float32.

  At t = 999 both coefficients are about 38.7, so the subtraction amplifies any error of eps_hat
  by that factor; it is always done in float32, whatever the network's compute dtype.
  """
  z_t, eps = z_t.astype(jnp.float32), eps.astype(jnp.float32)
  return (_take(schedule.sqrt_recip_alphas_cumprod, t, z_t.ndim) * z_t
          - _take(schedule.sqrt_recipm1_alphas_cumprod, t, z_t.ndim) * eps)


def sdseg_loss(schedule: Schedule, z0: jax.Array, z_t: jax.Array, t: jax.Array,
               noise: jax.Array, eps_hat: jax.Array,
               latent_weight: float = 1.0) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """The SDSeg objective: L1 on the noise plus `latent_weight` x L1 on the recovered latent.

  Means are over every element of the batch (the official per-sample means, then the batch
  mean, which is the same for equal-sized samples). Computed in float32.
  """
  eps_hat = eps_hat.astype(jnp.float32)
  loss_noise = jnp.mean(jnp.abs(noise.astype(jnp.float32) - eps_hat))
  z0_hat = predict_x0_from_eps(schedule, z_t, t, eps_hat)
  loss_latent = jnp.mean(jnp.abs(z0_hat - z0.astype(jnp.float32)))
  loss = loss_noise + latent_weight * loss_latent
  return loss, {"loss": loss, "loss_noise": loss_noise, "loss_latent": loss_latent}


def single_step(schedule: Schedule, eps_fn: EpsFn, z_T: jax.Array) -> jax.Array:
  """SDSeg inference: one denoiser call at t = T-1 from pure noise, x0 in closed form."""
  t = jnp.full((z_T.shape[0],), schedule.num_timesteps - 1, jnp.int32)
  return predict_x0_from_eps(schedule, z_T, t, eps_fn(z_T, t))


def ddim_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
  """LDM's "uniform" DDIM discretisation: {0, c, 2c, ...} + 1 with c = T // steps."""
  if not 1 <= steps <= num_timesteps:
    raise errors.ConfigError(f"DDIM steps must be in [1, {num_timesteps}], got {steps}")
  return np.arange(0, num_timesteps, num_timesteps // steps) + 1


def ddim_sample(schedule: Schedule, eps_fn: EpsFn, z_T: jax.Array, steps: int,
                eta: float, rng: jax.Array) -> jax.Array:
  """Multi-step DDIM (LDM `DDIMSampler`, eta=1 by default there) for the step-count comparison.

  Starts from z_T at the last discretised timestep and walks down to tau_0; alphabar_prev of the
  first index is alphabar[0], as the official sampler. No clipping of x0.
  """
  taus = ddim_timesteps(schedule.num_timesteps, steps)
  abar = schedule.alphas_cumprod.astype(np.float64)
  abar_t = abar[taus]
  abar_prev = np.concatenate([abar[:1], abar[taus[:-1]]])
  sigmas = eta * np.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
  consts = {k: jnp.asarray(v.astype(np.float32)) for k, v in dict(
      tau=taus.astype(np.float64), abar_t=abar_t, abar_prev=abar_prev, sigma=sigmas).items()}

  def body(i, carry):
    x, key = carry
    idx = len(taus) - 1 - i
    t = jnp.full((x.shape[0],), consts["tau"][idx].astype(jnp.int32))
    a_t, a_prev, sigma = consts["abar_t"][idx], consts["abar_prev"][idx], consts["sigma"][idx]
    eps = eps_fn(x, t).astype(jnp.float32)
    x0 = (x - jnp.sqrt(1 - a_t) * eps) / jnp.sqrt(a_t)
    key, sub = jax.random.split(key)
    noise = jax.random.normal(sub, x.shape, jnp.float32)
    x = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev - sigma ** 2) * eps + sigma * noise
    return x, key

  x, _ = jax.lax.fori_loop(0, len(taus), body, (z_T.astype(jnp.float32), rng))
  return x
