"""layers: GroupNorm against independent references; the folded upsample+conv vs its definition."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdseg_jax.models import layers


def numpy_group_norm(x, scale, bias, groups, eps):
  """float64 reference: per (sample, group) mean and biased variance over H, W and the group."""
  b, h, w, c = x.shape
  g = x.astype(np.float64).reshape(b, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


@pytest.mark.parametrize("channels, groups", [(64, 32), (32, 32), (96, 8)])
def test_group_norm_matches_reference(channels, groups):
  rng = np.random.default_rng(0)
  # A large common offset per channel: a one-pass E[x^2] - E[x]^2 variance would lose digits.
  x = (rng.normal(size=(2, 9, 7, channels)) * 0.5 + 30.0).astype(np.float32)
  scale = rng.normal(size=channels).astype(np.float32)
  bias = rng.normal(size=channels).astype(np.float32)
  module = layers.GroupNorm(num_groups=groups, epsilon=1e-6)
  params = module.init(jax.random.key(0), x)["params"]
  assert {k: v.shape for k, v in params.items()} == {"scale": (channels,), "bias": (channels,)}
  out = module.apply({"params": {"scale": scale, "bias": bias}}, x)
  want = numpy_group_norm(x, scale, bias, groups, 1e-6)
  np.testing.assert_allclose(np.asarray(out), want, atol=2e-4, rtol=1e-4)

  # Same parameter tree and outputs as Flax's two-pass GroupNorm (checkpoint compatibility).
  flax_out = nn.GroupNorm(num_groups=groups, epsilon=1e-6, use_fast_variance=False).apply(
      {"params": {"scale": scale, "bias": bias}}, x)
  np.testing.assert_allclose(np.asarray(out), np.asarray(flax_out), atol=2e-4)


def test_group_norm_gradient_matches_flax():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 64)), jnp.float32)
  params = {"scale": jnp.asarray(rng.normal(size=64), jnp.float32),
            "bias": jnp.zeros(64, jnp.float32)}
  ours = layers.GroupNorm(num_groups=32, epsilon=1e-6)
  flax_gn = nn.GroupNorm(num_groups=32, epsilon=1e-6, use_fast_variance=False)
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply({"params": p}, x)))
  g_ours = jax.grad(loss(ours), argnums=(0, 1))(params, x)
  g_flax = jax.grad(loss(flax_gn), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree_util.tree_leaves(g_ours), jax.tree_util.tree_leaves(g_flax)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


def test_group_norm_bf16_input_keeps_float32_statistics():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 4, 4, 32)) + 100.0, jnp.bfloat16)
  out = layers.GroupNorm(num_groups=32).apply(
      {"params": {"scale": jnp.ones(32), "bias": jnp.zeros(32)}}, x)
  assert out.dtype == jnp.float32
  want = numpy_group_norm(np.asarray(x, np.float32), 1.0, 0.0, 32, 1e-6)
  np.testing.assert_allclose(np.asarray(out), want, atol=1e-3)


def test_group_norm_rejects_indivisible_channels():
  with pytest.raises(ValueError, match="48 channels do not split into 32 groups"):
    layers.GroupNorm(num_groups=32).init(jax.random.key(0), jnp.zeros((1, 2, 2, 48)))


class _UpsampleThenConv(nn.Module):
  """The literal definition: nearest x2 upsampling, then a 3x3 'same' conv."""
  features: int

  @nn.compact
  def __call__(self, x):
    return layers.conv2d(layers.upsample_nearest_2x(x), self.features, "conv")


class _Folded(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    return layers.NearestUpsampleConv(self.features, name="conv")(x)


@pytest.mark.parametrize("shape, features", [((2, 7, 9, 32), 48), ((1, 1, 1, 3), 5),
                                             ((1, 4, 4, 16), 16)])
def test_nearest_upsample_conv_equals_upsample_then_conv(shape, features):
  x = jnp.asarray(np.random.default_rng(3).normal(size=shape), jnp.float32)
  params = _UpsampleThenConv(features).init(jax.random.key(0), x)
  # Same parameter tree and the same initial values: checkpoints and seeds are unaffected.
  folded_params = _Folded(features).init(jax.random.key(0), x)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, folded_params)
  with jax.default_matmul_precision("highest"):
    want = _UpsampleThenConv(features).apply(params, x)
    got = _Folded(features).apply(params, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    loss = lambda m: lambda p, x: jnp.sum(jnp.cos(m.apply(p, x)))
    g_want = jax.grad(loss(_UpsampleThenConv(features)), argnums=(0, 1))(params, x)
    g_got = jax.grad(loss(_Folded(features)), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree_util.tree_leaves(g_got), jax.tree_util.tree_leaves(g_want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)
