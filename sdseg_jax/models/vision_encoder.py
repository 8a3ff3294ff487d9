"""SDSeg's trainable vision encoder (official `AEEncoderEmbedder`).

A copy of the VAE encoder architecture (with its own dropout, 0.2 in SDSeg) followed by a 1x1
conv from the encoder's 2*z_channels moments to `embed_dim` channels. It maps the image to the
condition c that is concatenated to the noisy mask latent. Its encoder starts from the kl-f8
weights; the 1x1 `out` conv starts from PyTorch's default random init.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdseg_jax.models import layers
from sdseg_jax.models import vae


class VisionEncoder(nn.Module):
  """Image (B, R, R, 3) in [-1, 1] -> condition (B, R/f, R/f, embed_dim), float32."""
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = ()
  dropout: float = 0.2
  resolution: int = 256
  z_channels: int = 4
  double_z: bool = True
  embed_dim: int = 4
  dtype: Any = jnp.float32
  precision: Any = None
  attention_impl: Any = None
  kernels: layers.Kernels = layers.Kernels()

  @nn.compact
  def __call__(self, image: jax.Array, train: bool = False) -> jax.Array:
    h = vae.Encoder(
        ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
        attn_resolutions=tuple(self.attn_resolutions), dropout=self.dropout,
        resolution=self.resolution, z_channels=self.z_channels, double_z=self.double_z,
        dtype=self.dtype, precision=self.precision, attention_impl=self.attention_impl,
        kernels=self.kernels, name="encoder")(image, train)
    c = layers.conv2d(h, self.embed_dim, "out", kernel_size=1, dtype=self.dtype,
                      precision=self.precision)
    return c.astype(jnp.float32)
