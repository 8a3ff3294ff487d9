"""models/attention.attend: every implementation is softmax(q k^T / sqrt(d)) v.

The Pallas TPU kernel runs here in Pallas' TPU interpret mode (on the CPU), so its numbers are
checked without a TPU; XLA:TPU's compile of it is checked by sdseg_jax.bench.tpu_attention.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdseg_jax import errors
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
def test_xla_path_matches_the_definition(implementation):
  q, k, v = _qkv(24)
  out = attention.attend(q, k, v, implementation=implementation)
  np.testing.assert_allclose(out, _reference(q, k, v), rtol=1e-5, atol=1e-6)


def test_pallas_flash_kernel_matches_xla_values_and_gradients():
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  q, k, v = _qkv(2 * attention.PALLAS_BLOCK)
  loss = lambda impl: lambda *qkv: jnp.sum(attention.attend(*qkv, implementation=impl) ** 3)
  with pltpu.force_tpu_interpret_mode():
    out = attention.attend(q, k, v, implementation="pallas")
    grads = jax.grad(loss("pallas"), argnums=(0, 1, 2))(q, k, v)
    # The kernel really ran: its interpret-mode jaxpr holds a pallas_call.
    assert "pallas_call" in str(jax.make_jaxpr(
        lambda *qkv: attention.attend(*qkv, implementation="pallas"))(q, k, v))
  np.testing.assert_allclose(out, _reference(q, k, v), rtol=1e-5, atol=1e-5)
  for got, want in zip(grads, jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_pallas_falls_back_to_xla_below_one_block():
  q, k, v = _qkv(64)  # 8x8 latent: fewer tokens than the kernel's 128-row block
  jaxpr = str(jax.make_jaxpr(lambda *qkv: attention.attend(*qkv, implementation="pallas"))(
      q, k, v))
  assert "pallas_call" not in jaxpr
  np.testing.assert_allclose(attention.attend(q, k, v, implementation="pallas"),
                             _reference(q, k, v), rtol=1e-5, atol=1e-6)


def test_unknown_implementation_is_a_config_error():
  q, k, v = _qkv(4)
  with pytest.raises(errors.ConfigError, match="unknown attention implementation 'flash'"):
    attention.attend(q, k, v, implementation="flash")
