"""Attention: `models/attention.attend` and the Pallas kernel that sdseg_jax.bench.tpu_attention
compares it with both compute softmax(q k^T / sqrt(d)) v.

The Pallas TPU kernel runs here in Pallas' TPU interpret mode (on the CPU), so the comparison is
known to be between two correct attentions without a TPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdseg_jax import errors
from sdseg_jax.bench import tpu_attention
from sdseg_jax.models import attention


def _reference(q, k, v):
  """float64 numpy transcription of the definition, (batch, tokens, heads, head_dim)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", weights, v)


def _qkv(tokens, heads=2, head_dim=16, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(key, (2, tokens, heads, head_dim)) for key in keys)


@pytest.mark.parametrize("implementation", [None, "xla"])
def test_attend_matches_the_definition(implementation):
  q, k, v = _qkv(24)
  out = attention.attend(q, k, v, implementation=implementation)
  np.testing.assert_allclose(out, _reference(q, k, v), rtol=1e-5, atol=1e-6)


def test_compared_pallas_kernel_matches_values_and_gradients():
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  q, k, v = _qkv(2 * tpu_attention.PALLAS_BLOCK)
  loss = lambda fn: lambda *qkv: jnp.sum(fn(*qkv) ** 3)
  with pltpu.force_tpu_interpret_mode():
    out = tpu_attention.pallas_flash(q, k, v)
    grads = jax.grad(loss(tpu_attention.pallas_flash), argnums=(0, 1, 2))(q, k, v)
    assert "pallas_call" in str(jax.make_jaxpr(tpu_attention.pallas_flash)(q, k, v))
  np.testing.assert_allclose(out, _reference(q, k, v), rtol=1e-5, atol=1e-5)
  for got, want in zip(grads, jax.grad(loss(attention.attend), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_unknown_implementation_is_a_config_error():
  q, k, v = _qkv(4)
  with pytest.raises(errors.ConfigError, match="unknown attention implementation 'flash'"):
    attention.attend(q, k, v, implementation="flash")
