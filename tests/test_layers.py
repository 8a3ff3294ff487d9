"""layers.GroupNorm against an independent numpy GroupNorm (torch.nn.GroupNorm's definition)."""

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
