"""The one attention function of the models.

Every attention block (VAE single-head, UNet multi-head) calls `attend`, so a faster kernel
is swapped in here behind the `implementation` knob (`config.model.attention_impl`) without
touching the models:
  None / "xla"  `jax.nn.dot_product_attention`'s XLA path (softmax over materialised logits);
  "cudnn"       cuDNN's fused flash attention on NVIDIA GPUs (16-bit inputs only);
  "pallas"      the Pallas flash-attention kernel for TPU (jax.experimental.pallas.ops.tpu): the
                (tokens x tokens) logits never reach HBM. It runs on token counts its 128-row
                blocks divide (SDSeg: the 32x32 and 16x16 latents, and the VAE's 32x32
                mid-block); shorter sequences use the XLA path.
Logits and softmax are computed in float32 by all three.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from sdseg_jax import errors

IMPLEMENTATIONS = (None, "xla", "cudnn", "pallas")
# The Pallas TPU kernel's default block: q and kv rows per step.
PALLAS_BLOCK = 128


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *,
           implementation: Optional[str] = None) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v for (batch, tokens, heads, head_dim) inputs.

  Mathematically the same as the official code, which scales q and k by d^-1/4 each before the
  product; the difference is float32 round-off.
  """
  if implementation not in IMPLEMENTATIONS:
    raise errors.ConfigError(f"unknown attention implementation {implementation!r}; "
                             f"expected one of {IMPLEMENTATIONS}")
  if implementation == "pallas":
    if q.shape[1] % PALLAS_BLOCK == 0:
      return _pallas_flash(q, k, v)
    implementation = "xla"
  if implementation == "cudnn" and q.dtype == jnp.float32:
    implementation = "xla"  # cuDNN's fused kernel needs 16-bit inputs.
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


def _pallas_flash(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """The Pallas TPU flash-attention kernel (layout (batch, heads, tokens, head_dim))."""
  # Imported here: Pallas' TPU module is only needed when this implementation is chosen.
  from jax.experimental.pallas.ops.tpu import flash_attention  # pylint: disable=g-import-not-at-top
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)
  out = flash_attention.flash_attention(heads_first(q), heads_first(k), heads_first(v),
                                        sm_scale=q.shape[-1] ** -0.5)
  return heads_first(out)
