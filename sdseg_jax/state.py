"""The training state: everything a checkpoint must hold to resume exactly.

The frozen VAE is deliberately NOT part of it (it is public and never changes): it is passed to
the train step as a separate, replicated argument and referenced by path in the config.
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  """step: optimizer steps taken; params: {"unet", "vision_encoder"}; ema_unet: EMA of the UNet;
  opt_state: optax state of params; rng: raw uint32 key data (checkpoint-friendly);
  scale_factor: the latent scale s, fixed after the first batch."""
  step: jax.Array
  params: Any
  ema_unet: Any
  opt_state: Any
  rng: jax.Array
  scale_factor: jax.Array

  @property
  def key(self) -> jax.Array:
    return jax.random.wrap_key_data(self.rng)


def create(params: Any, tx: Any, rng_key: jax.Array, scale_factor: float) -> TrainState:
  """A fresh state; the EMA starts from the (pretrained) UNet weights, not from random ones."""
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_unet=jax.tree_util.tree_map(jnp.copy, params["unet"]),
      opt_state=tx.init(params),
      rng=jax.random.key_data(rng_key),
      scale_factor=jnp.asarray(scale_factor, jnp.float32))
