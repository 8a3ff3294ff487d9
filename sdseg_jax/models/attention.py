"""The one attention function of the models.

Every attention block (VAE single-head, UNet multi-head) calls `attend`, so a faster kernel
(cuDNN flash attention on GPU, a Pallas kernel on TPU) can be swapped in here behind the
`implementation` knob without touching the models. At the <=1024 tokens SDSeg uses, XLA's own
fusion is competitive; logits and softmax are always computed in float32.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from sdseg_jax import errors


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *,
           implementation: Optional[str] = None) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v for (batch, tokens, heads, head_dim) inputs.

  Mathematically the same as the official code, which scales q and k by d^-1/4 each before the
  product; the difference is float32 round-off.
  """
  if implementation not in (None, "xla", "cudnn"):
    raise errors.ConfigError(f"unknown attention implementation {implementation!r}; "
                             "expected None, 'xla' or 'cudnn'")
  if implementation == "cudnn" and q.dtype == jnp.float32:
    implementation = "xla"  # cuDNN's fused kernel needs 16-bit inputs.
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
