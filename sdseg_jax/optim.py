"""The optimiser and EMA of the official SDSeg recipe, expressed with optax.

Official: torch AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0.01 on every parameter), lr =
base_lr x global batch, `LambdaLinearScheduler` warm-up factor 1e-6 -> 1 over 10k steps then
constant, no gradient clipping; an EMA of the UNet only, with decay min(0.9999, (1+n)/(10+n)).
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
  """base_lr, multiplied by the global batch size when `optim.scale_lr` (official default)."""
  lr = config.optim.base_lr
  if config.optim.scale_lr:
    lr *= config.train.global_batch_size
  return lr


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up from start_factor x lr to lr over warmup_steps, then constant.

  Exactly the official factor 1e-6 + (1 - 1e-6) n / 10000 at optimizer step n.
  """
  peak = peak_learning_rate(config)
  if config.optim.warmup_steps <= 0:
    return optax.constant_schedule(peak)
  return optax.linear_schedule(init_value=peak * config.optim.warmup_start_factor,
                               end_value=peak, transition_steps=config.optim.warmup_steps)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW (decoupled decay on every parameter, as torch.optim.AdamW) + optional clipping."""
  mu_dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.optim.mu_dtype]
  adamw = optax.adamw(
      learning_rate_schedule(config), b1=config.optim.b1, b2=config.optim.b2,
      eps=config.optim.eps, weight_decay=config.optim.weight_decay, mu_dtype=mu_dtype)
  if config.optim.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(config.optim.grad_clip_norm), adamw)
  return adamw


def ema_decay(num_updates: jax.Array, decay: float, use_num_updates: bool = True) -> jax.Array:
  """LitEma's decay for its n-th update (n counted from 1): min(decay, (1 + n) / (10 + n))."""
  if not use_num_updates:
    return jnp.float32(decay)
  n = num_updates.astype(jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + n) / (10.0 + n))


def ema_update(ema: Any, params: Any, decay: jax.Array) -> Any:
  """shadow <- shadow - (1 - decay) (shadow - param), the LitEma update, in float32."""
  return jax.tree_util.tree_map(lambda e, p: e - (1.0 - decay) * (e - p), ema, params)
