"""bf16 compute vs float32: output tolerances and the parts that must stay float32.

The precision policy (docs/design.md#precision): parameters float32; convolutions and matmuls in the
compute dtype; GroupNorm statistics, attention logits/softmax, the x0 recovery and the loss in
float32. bf16 is the default on GPU/TPU ("auto"), so these tests pin down how far its outputs
may drift from float32 on the same weights, and catch a change that silently moves a
precision-sensitive op to bf16.

Stated tolerances (tiny seeded model, random PyTorch-scale weights with a non-zero UNet output
layer, 32x32 images, conftest's "highest" float32 matmuls as the reference). Observed values at
the time of writing are in brackets; the bounds leave roughly 3-4x headroom:
  * probability map:      max |p_bf16 - p_f32| <= 0.02            [~0.005]
  * binary mask (p > .5): agreement >= 98% of pixels              [~99.7%]
  * recovered latent z0:  ||z_bf16 - z_f32|| / ||z_f32|| <= 0.03  [~0.007]
  * UNet eps at t=999:    relative L2 error <= 0.08               [~0.024]
  * training loss:        |L_bf16 - L_f32| / L_f32 <= 0.01        [~0.0004]
"""

import collections
import functools
from typing import Any, Callable, Counter, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from sdseg_jax import benchmark
from sdseg_jax import config_lib
from sdseg_jax import diffusion
from sdseg_jax import optim
from sdseg_jax import state as state_lib
from sdseg_jax import step as step_lib
from sdseg_jax.models import model_config
from sdseg_jax.models import sdseg

SIZE = 32
PROB_MAX_ABS = 0.02
MASK_AGREEMENT = 0.98
LATENT_REL = 0.03
EPS_REL = 0.08
LOSS_REL = 0.01


def _model_config(dtype: str):
  cfg = model_config.model_config(
      ddconfig=dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, resolution=SIZE),
      unet_config=dict(image_size=SIZE // 2, model_channels=32, channel_mult=[1, 2],
                       attention_resolutions=[1, 2], num_res_blocks=1, num_heads=2,
                       dropout=0.0))
  cfg.compute_dtype = dtype
  return cfg


@pytest.fixture(scope="module")
def models():
  return sdseg.build(_model_config("float32")), sdseg.build(_model_config("bfloat16"))


@pytest.fixture(scope="module")
def weights(models):
  # Random values at PyTorch-default scales; unlike init, the UNet's zero-initialised output
  # conv becomes non-zero, so eps (and hence the latent) actually depends on the compute dtype.
  return benchmark.random_params(models[0], seed=0)


@pytest.fixture(scope="module")
def inputs():
  key = jax.random.key(10)
  image = jax.random.uniform(key, (2, SIZE, SIZE, 3), minval=-1.0, maxval=1.0)
  z_T = jax.random.normal(jax.random.fold_in(key, 1), (2, SIZE // 2, SIZE // 2, 4))
  return image, z_T


def _rel(a: jax.Array, b: jax.Array) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _eqns(jaxpr) -> Iterator[Any]:
  """Every equation of a jaxpr, including those of nested jaxprs (pjit, custom_vjp, remat...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
          yield from _eqns(sub.jaxpr)
        elif hasattr(sub, "eqns"):
          yield from _eqns(sub)


def _op_dtypes(fn: Callable, *args) -> Counter:
  """(primitive, input dtypes) -> count over the traced computation."""
  counts: Counter = collections.Counter()
  for eqn in _eqns(jax.make_jaxpr(fn)(*args).jaxpr):
    dtypes = tuple(str(v.aval.dtype) for v in eqn.invars if hasattr(v.aval, "dtype"))
    counts[(eqn.primitive.name, dtypes)] += 1
  return counts


def test_auto_dtype_resolves_by_backend():
  assert sdseg.resolve_compute_dtype("auto", "cpu") == "float32"
  for backend in ("gpu", "cuda", "rocm", "tpu"):
    assert sdseg.resolve_compute_dtype("auto", backend) == "bfloat16"
  assert sdseg.resolve_compute_dtype("float32", "tpu") == "float32"
  assert sdseg.resolve_compute_dtype("bfloat16", "cpu") == "bfloat16"
  with pytest.raises(ValueError, match="compute_dtype"):
    sdseg.resolve_compute_dtype("fp8")


def test_default_config_is_auto_and_float32_on_cpu():
  cfg = model_config.model_config()
  assert cfg.compute_dtype == "auto"
  config = base.get_config()
  config.init.pretrain_vae_steps = 1
  config_lib.validate(config)  # "auto" is a valid value
  small = sdseg.build(_model_config("auto"))
  assert jax.default_backend() == "cpu"
  assert small.unet.dtype == jnp.float32 and small.vae.dtype == jnp.float32


def test_bf16_inference_matches_float32_within_tolerance(models, weights, inputs):
  m32, m16 = models
  params, vae = weights
  image, z_T = inputs
  scale = jnp.float32(1.0)
  out32 = jax.jit(m32.predict)(params, vae, image, z_T, scale)
  out16 = jax.jit(m16.predict)(params, vae, image, z_T, scale)
  # Outputs leave the model in float32 whatever the compute dtype.
  assert out16["prob"].dtype == jnp.float32 and out16["latent"].dtype == jnp.float32
  assert float(jnp.max(jnp.abs(out16["prob"] - out32["prob"]))) <= PROB_MAX_ABS
  assert float(jnp.mean(out16["mask"] == out32["mask"])) >= MASK_AGREEMENT
  assert _rel(out16["latent"], out32["latent"]) <= LATENT_REL
  # ...and the bf16 model really computes differently (the test would be vacuous otherwise).
  assert _rel(out16["latent"], out32["latent"]) > 1e-5

  t = jnp.full((image.shape[0],), 999, jnp.int32)
  eps = lambda m: m.denoise(params["unet"], z_T, m.encode_image(params, image), t)
  eps32, eps16 = eps(m32), eps(m16)
  assert eps16.dtype == jnp.float32  # the x0 recovery consumes float32
  assert _rel(eps16, eps32) <= EPS_REL


def test_bf16_loss_matches_float32_and_is_float32(models, weights, inputs):
  params, vae = weights
  image, _ = inputs
  mask = jnp.where(image[..., :1] > 0, 1.0, -1.0).repeat(3, axis=-1)
  key = jax.random.key(3)

  def loss(m):
    z0 = m.encode_mask(vae, mask, jnp.float32(1.0))
    t = jax.random.randint(key, (image.shape[0],), 0, m.schedule.num_timesteps)
    noise = jax.random.normal(jax.random.fold_in(key, 1), z0.shape)
    z_t = diffusion.q_sample(m.schedule, z0, t, noise)
    eps = m.denoise(params["unet"], z_t, m.encode_image(params, image), t)
    return diffusion.sdseg_loss(m.schedule, z0, z_t, t, noise, eps)[0]

  l32, l16 = jax.jit(lambda: loss(models[0]))(), jax.jit(lambda: loss(models[1]))()
  assert l16.dtype == jnp.float32
  assert abs(float(l16) - float(l32)) / float(l32) <= LOSS_REL


def test_bf16_graph_keeps_norms_softmax_in_float32(models, weights, inputs):
  """Traced ops of bf16 inference: convs/matmuls bf16; every reduction and exp float32.

  GroupNorm statistics are reduce_sum (mean, variance) and rsqrt; the attention softmax is
  reduce_max, exp and reduce_sum. None of them may see a bf16 operand.
  """
  _, m16 = models
  params, vae = weights
  image, z_T = inputs
  ops = _op_dtypes(m16.predict, params, vae, image, z_T, jnp.float32(1.0))
  convs = {k: v for k, v in ops.items() if k[0] == "conv_general_dilated"}
  assert convs and all(k[1] == ("bfloat16", "bfloat16") for k in convs), convs
  dots = {k: v for k, v in ops.items() if k[0] == "dot_general"}
  assert dots and all(k[1] == ("bfloat16", "bfloat16") for k in dots), dots
  for name in ("reduce_sum", "reduce_max", "exp", "rsqrt"):
    found = {k: v for k, v in ops.items() if k[0] == name}
    assert found, f"no {name} traced"
    assert all(set(k[1]) == {"float32"} for k in found), (name, found)


def test_bf16_train_step_keeps_state_and_metrics_float32(models, weights):
  """Params, gradients' consumers (AdamW moments, EMA) and every metric stay float32."""
  _, m16 = models
  params, vae = weights
  config = base.get_config()
  config.model = _model_config("bfloat16")
  config.data.image_size = SIZE
  tx = optim.make_optimizer(config)
  state = jax.eval_shape(lambda p: state_lib.create(p, tx, jax.random.key(0), 1.0), params)
  batch = {k: jax.ShapeDtypeStruct((2, SIZE, SIZE, 3), jnp.float32) for k in ("image", "mask")}
  step = functools.partial(step_lib.train_step, model=m16, tx=tx, config=config)
  new_state, metrics = jax.eval_shape(step, state, batch, vae)
  float_leaves = [x for x in jax.tree_util.tree_leaves((new_state.params, new_state.ema_unet,
                                                        new_state.opt_state, metrics))
                  if jnp.issubdtype(x.dtype, jnp.floating)]
  assert float_leaves and all(x.dtype == jnp.float32 for x in float_leaves)
  assert metrics["loss"].dtype == jnp.float32
