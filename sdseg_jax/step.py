"""The jitted train step and prediction step.

ONE compiled train step does everything per batch: frozen-VAE encoding of the masks (no
gradient), the vision-encoder condition, timesteps and noise, q_sample, the [z_t, c] concat, the
UNet, the L1 noise + L1 latent loss, gradients for the UNet and vision encoder only, the AdamW
update, the EMA update and the metrics. It is compiled ahead of time with explicit shardings and
donates the old state, so parameters are updated in place on every device.
"""

import functools
import time
from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from sdseg_jax import diffusion
from sdseg_jax import inference
from sdseg_jax import optim
from sdseg_jax import sharding as sharding_lib
from sdseg_jax import state as state_lib
from sdseg_jax.models import sdseg

Batch = Dict[str, jax.Array]


def train_step(state: state_lib.TrainState, batch: Batch, vae_params: Any, *,
               model: sdseg.SDSeg, tx: optax.GradientTransformation,
               config: ml_collections.ConfigDict) -> Tuple[state_lib.TrainState, Dict]:
  """One SDSeg optimisation step on a global batch {"image", "mask"} (B, R, R, 3) in [-1, 1]."""
  key = jax.random.fold_in(state.key, state.step)
  k_post, k_t, k_noise, k_enc, k_unet = jax.random.split(key, 5)
  z0 = model.encode_mask(vae_params, batch["mask"], state.scale_factor,
                         k_post if config.train.sample_posterior else None)
  z0 = jax.lax.stop_gradient(z0)
  b = z0.shape[0]
  t = jax.random.randint(k_t, (b,), 0, model.schedule.num_timesteps)
  noise = jax.random.normal(k_noise, z0.shape, jnp.float32)
  z_t = diffusion.q_sample(model.schedule, z0, t, noise)

  def loss_fn(params):
    cond = model.encode_image(params, batch["image"], train=True, rng=k_enc)
    # Class-embedding (multi-class) runs carry the class of each element's binary target.
    eps = model.denoise(params["unet"], z_t, cond, t, batch.get("class_id"), train=True,
                        rng=k_unet)
    return diffusion.sdseg_loss(model.schedule, z0, z_t, t, noise, eps,
                                config.train.latent_loss_weight)

  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = optim.ema_decay(state.step + 1, config.ema.decay, config.ema.use_num_updates)
  ema_unet = optim.ema_update(state.ema_unet, params["unet"], decay)
  metrics = dict(metrics,
                 grad_norm=optax.tree.norm(grads),
                 param_norm=optax.tree.norm(params),
                 learning_rate=optim.learning_rate_schedule(config)(state.step),
                 ema_decay=decay)
  new_state = state.replace(step=state.step + 1, params=params, ema_unet=ema_unet,
                            opt_state=opt_state)
  return new_state, metrics


def compile_train_step(model: sdseg.SDSeg, tx: optax.GradientTransformation,
                       config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                       abstract_state: Any, state_shardings: Any, abstract_vae: Any,
                       vae_shardings: Any, image_size: int, num_seeds: int = 0,
                       per_lane_vae: bool = False) -> Tuple[Callable, Dict[str, Any]]:
  """AOT-compiles the train step for the mesh: returns (compiled step, compile statistics).

  Lowering on ShapeDtypeStructs fails fast on shape or sharding errors and separates compile
  time from step time. With `num_seeds` = K > 0 (seed lanes, on a seed mesh) the step maps over
  a leading K axis of the state, the batch, the metrics and, if `per_lane_vae`, the VAE: K
  independent runs in one program, each on its own lane of devices (sharding.map_lanes).
  """
  step_fn = functools.partial(train_step, model=model, tx=tx, config=config)
  metrics_sh = sharding_lib.replicated(mesh)
  lead: Tuple[int, ...] = ()
  if num_seeds:
    step_fn = sharding_lib.map_lanes(step_fn, mesh, (True, True, per_lane_vae))
    metrics_sh, lead = sharding_lib.per_lane(mesh), (num_seeds,)
  batch_sh = sharding_lib.batch_sharding(mesh)
  jitted = jax.jit(step_fn, in_shardings=(state_shardings, batch_sh, vae_shardings),
                   out_shardings=(state_shardings, metrics_sh), donate_argnums=(0,))
  gb = config.train.global_batch_size
  batch_spec = {k: jax.ShapeDtypeStruct((*lead, gb, image_size, image_size, 3), jnp.float32,
                                        sharding=batch_sh) for k in ("image", "mask")}
  if model.unet.num_classes is not None:
    batch_spec["class_id"] = jax.ShapeDtypeStruct((*lead, gb), jnp.int32, sharding=batch_sh)
  start = time.perf_counter()
  compiled = jitted.lower(abstract_state, batch_spec, abstract_vae).compile()
  stats = {"compile_seconds": time.perf_counter() - start}
  try:
    mem = compiled.memory_analysis()
    if mem is not None:
      stats["temp_bytes"] = int(mem.temp_size_in_bytes)
      stats["argument_bytes"] = int(mem.argument_size_in_bytes)
  except (AttributeError, NotImplementedError):  # not every backend reports it
    pass
  return compiled, stats


def predict_step(params: Any, vae_params: Any, image: jax.Array, scale_factor: jax.Array,
                 noise_key: jax.Array, *, model: sdseg.SDSeg) -> Dict[str, jax.Array]:
  """Single-step prediction for a batch: probabilities (B, R, R) and binary masks.

  The noise z_T is drawn inside the step from `noise_key` (one draw per image), so it is the
  same however the batch is sharded.
  """
  z_T = inference.draw_noise(model, noise_key, image.shape[0])
  return model.predict(params, vae_params, image, z_T, scale_factor)
