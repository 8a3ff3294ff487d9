"""The kl-f8 AutoencoderKL of Latent Diffusion (frozen in SDSeg), NHWC.

Structure and names follow `ldm/modules/diffusionmodules/model.py` (Encoder, Decoder,
ResnetBlock, AttnBlock, Downsample, Upsample) and `ldm/models/autoencoder.py` (AutoencoderKL,
DiagonalGaussianDistribution), so the official checkpoint maps onto these parameters by name.
All sizes come from the official `ddconfig` fields.
"""

from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdseg_jax.models import attention
from sdseg_jax.models import layers

VAE_NORM_EPS = 1e-6  # `Normalize` in model.py; the UNet uses 1e-5.


class ResnetBlock(nn.Module):
  """GN-SiLU-conv3x3, GN-SiLU-dropout-conv3x3, plus a (1x1 or 3x3) shortcut when widths differ."""
  out_channels: int
  dropout: float = 0.0
  conv_shortcut: bool = False
  dtype: Any = jnp.float32
  precision: Any = None
  kernels: layers.Kernels = layers.Kernels()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    kw = dict(dtype=self.dtype, precision=self.precision)
    h = nn.silu(layers.group_norm(x, "norm1", epsilon=VAE_NORM_EPS, kernels=self.kernels))
    h = layers.conv2d(h, self.out_channels, "conv1", **kw)
    h = nn.silu(layers.group_norm(h, "norm2", epsilon=VAE_NORM_EPS, kernels=self.kernels))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = layers.conv2d(h, self.out_channels, "conv2", **kw)
    if x.shape[-1] != self.out_channels:
      if self.conv_shortcut:
        x = layers.conv2d(x, self.out_channels, "conv_shortcut", **kw)
      else:
        x = layers.conv2d(x, self.out_channels, "nin_shortcut", kernel_size=1, **kw)
    return x + h


class AttnBlock(nn.Module):
  """Single-head spatial self-attention with 1x1-conv q, k, v and output projection."""
  dtype: Any = jnp.float32
  precision: Any = None
  attention_impl: Any = None
  kernels: layers.Kernels = layers.Kernels()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hgt, wid, c = x.shape
    kw = dict(kernel_size=1, dtype=self.dtype, precision=self.precision)
    h = layers.group_norm(x, "norm", epsilon=VAE_NORM_EPS, kernels=self.kernels)
    q = layers.conv2d(h, c, "q", **kw).reshape(b, hgt * wid, 1, c)
    k = layers.conv2d(h, c, "k", **kw).reshape(b, hgt * wid, 1, c)
    v = layers.conv2d(h, c, "v", **kw).reshape(b, hgt * wid, 1, c)
    h = attention.attend(q, k, v, implementation=self.attention_impl).reshape(b, hgt, wid, c)
    return x + layers.conv2d(h, c, "proj_out", **kw)


class Downsample(nn.Module):
  """Halves the resolution: pad right/bottom by one then a stride-2 VALID conv (as the original)."""
  with_conv: bool = True
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if not self.with_conv:
      return layers.avg_pool_2x(x)
    return layers.conv2d(x, x.shape[-1], "conv", stride=2, padding=((0, 1), (0, 1)),
                         dtype=self.dtype, precision=self.precision)


class Upsample(nn.Module):
  """Doubles the resolution: nearest x2, then (optionally) a 3x3 conv.

  With the conv, both run as one `layers.NearestUpsampleConv` (the same maths in 16/36 of the
  multiply-adds; parameters under `conv` as before).
  """
  with_conv: bool = True
  dtype: Any = jnp.float32
  precision: Any = None
  kernels: layers.Kernels = layers.Kernels()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if not self.with_conv:
      return layers.upsample_nearest_2x(x)
    return layers.upsample_conv(x, x.shape[-1], "conv", kernels=self.kernels, dtype=self.dtype,
                                precision=self.precision)


class _Level(nn.Module):
  """One resolution level: `block_i` (+ `attn_i`) then an optional resampler.

  Encoder levels are named `down_<i>` and decoder levels `up_<i>`, as the official ModuleLists.
  """
  out_channels: int
  num_blocks: int
  use_attention: bool
  resample: str  # "down", "up" or "none"
  dropout: float = 0.0
  resamp_with_conv: bool = True
  dtype: Any = jnp.float32
  precision: Any = None
  attention_impl: Any = None
  kernels: layers.Kernels = layers.Kernels()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    kw = dict(dtype=self.dtype, precision=self.precision)
    for i in range(self.num_blocks):
      x = ResnetBlock(self.out_channels, self.dropout, kernels=self.kernels, name=f"block_{i}",
                      **kw)(x, train)
      if self.use_attention:
        x = AttnBlock(attention_impl=self.attention_impl, kernels=self.kernels, name=f"attn_{i}",
                      **kw)(x)
    if self.resample == "down":
      x = Downsample(self.resamp_with_conv, name="downsample", **kw)(x)
    elif self.resample == "up":
      x = Upsample(self.resamp_with_conv, kernels=self.kernels, name="upsample", **kw)(x)
    return x


class _Mid(nn.Module):
  """ResnetBlock, AttnBlock, ResnetBlock at the lowest resolution."""
  dropout: float = 0.0
  dtype: Any = jnp.float32
  precision: Any = None
  attention_impl: Any = None
  kernels: layers.Kernels = layers.Kernels()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    kw = dict(dtype=self.dtype, precision=self.precision)
    c = x.shape[-1]
    x = ResnetBlock(c, self.dropout, kernels=self.kernels, name="block_1", **kw)(x, train)
    x = AttnBlock(attention_impl=self.attention_impl, kernels=self.kernels, name="attn_1",
                  **kw)(x)
    return ResnetBlock(c, self.dropout, kernels=self.kernels, name="block_2", **kw)(x, train)


class Encoder(nn.Module):
  """Image (B, R, R, in_channels) -> moments (B, R/f, R/f, 2*z_channels) [or z_channels]."""
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = ()
  dropout: float = 0.0
  resolution: int = 256
  z_channels: int = 4
  double_z: bool = True
  resamp_with_conv: bool = True
  dtype: Any = jnp.float32
  precision: Any = None
  attention_impl: Any = None
  kernels: layers.Kernels = layers.Kernels()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    kw = dict(dtype=self.dtype, precision=self.precision)
    x = x.astype(self.dtype)
    h = layers.conv2d(x, self.ch, "conv_in", **kw)
    res = self.resolution
    last = len(self.ch_mult) - 1
    for i, mult in enumerate(self.ch_mult):
      h = _Level(self.ch * mult, self.num_res_blocks, res in self.attn_resolutions,
                 "down" if i != last else "none", self.dropout, self.resamp_with_conv,
                 attention_impl=self.attention_impl, kernels=self.kernels, name=f"down_{i}",
                 **kw)(h, train)
      if i != last:
        res //= 2
    h = _Mid(self.dropout, attention_impl=self.attention_impl, kernels=self.kernels, name="mid",
             **kw)(h, train)
    h = nn.silu(layers.group_norm(h, "norm_out", epsilon=VAE_NORM_EPS, kernels=self.kernels))
    out_channels = 2 * self.z_channels if self.double_z else self.z_channels
    return layers.conv2d(h, out_channels, "conv_out", **kw)


class Decoder(nn.Module):
  """Latent (B, r, r, z_channels) -> image (B, r*f, r*f, out_ch); unbounded, no tanh by default."""
  ch: int = 128
  out_ch: int = 3
  ch_mult: Sequence[int] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = ()
  dropout: float = 0.0
  resolution: int = 256
  resamp_with_conv: bool = True
  give_pre_end: bool = False
  tanh_out: bool = False
  dtype: Any = jnp.float32
  precision: Any = None
  attention_impl: Any = None
  kernels: layers.Kernels = layers.Kernels()

  @nn.compact
  def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
    kw = dict(dtype=self.dtype, precision=self.precision)
    n_levels = len(self.ch_mult)
    res = self.resolution // 2 ** (n_levels - 1)
    h = layers.conv2d(z.astype(self.dtype), self.ch * self.ch_mult[-1], "conv_in", **kw)
    h = _Mid(self.dropout, attention_impl=self.attention_impl, kernels=self.kernels, name="mid",
             **kw)(h, train)
    for i in reversed(range(n_levels)):
      h = _Level(self.ch * self.ch_mult[i], self.num_res_blocks + 1, res in self.attn_resolutions,
                 "up" if i != 0 else "none", self.dropout, self.resamp_with_conv,
                 attention_impl=self.attention_impl, kernels=self.kernels, name=f"up_{i}",
                 **kw)(h, train)
      if i != 0:
        res *= 2
    if self.give_pre_end:
      return h
    h = nn.silu(layers.group_norm(h, "norm_out", epsilon=VAE_NORM_EPS, kernels=self.kernels))
    h = layers.conv2d(h, self.out_ch, "conv_out", **kw)
    return jnp.tanh(h) if self.tanh_out else h


class DiagonalGaussian:
  """The VAE posterior: mean and clamped log-variance split from the moments' channels."""

  def __init__(self, moments: jax.Array):
    self.mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    self.logvar = jnp.clip(logvar, -30.0, 20.0)
    self.std = jnp.exp(0.5 * self.logvar)

  def sample(self, rng: jax.Array) -> jax.Array:
    return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

  def mode(self) -> jax.Array:
    return self.mean


class AutoencoderKL(nn.Module):
  """kl-f8 autoencoder: encoder + quant_conv -> posterior; post_quant_conv + decoder."""
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = ()
  dropout: float = 0.0
  resolution: int = 256
  in_channels: int = 3
  out_ch: int = 3
  z_channels: int = 4
  double_z: bool = True
  embed_dim: int = 4
  dtype: Any = jnp.float32
  precision: Any = None
  attention_impl: Any = None
  kernels: layers.Kernels = layers.Kernels()

  def setup(self):
    common = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                  attn_resolutions=tuple(self.attn_resolutions), dropout=self.dropout,
                  resolution=self.resolution, dtype=self.dtype, precision=self.precision,
                  attention_impl=self.attention_impl, kernels=self.kernels)
    self.encoder = Encoder(z_channels=self.z_channels, double_z=self.double_z, **common)
    self.decoder = Decoder(out_ch=self.out_ch, **common)
    fan = 2 * self.z_channels
    self.quant_conv = nn.Conv(
        2 * self.embed_dim, (1, 1), dtype=self.dtype, precision=self.precision,
        kernel_init=layers.torch_default_kernel_init(),
        bias_init=layers.torch_default_bias_init(fan))
    self.post_quant_conv = nn.Conv(
        self.z_channels, (1, 1), dtype=self.dtype, precision=self.precision,
        kernel_init=layers.torch_default_kernel_init(),
        bias_init=layers.torch_default_bias_init(self.embed_dim))

  def encode_moments(self, x: jax.Array) -> jax.Array:
    """Image in [-1, 1] -> posterior moments (mean || logvar), float32."""
    return self.quant_conv(self.encoder(x)).astype(jnp.float32)

  def encode(self, x: jax.Array) -> DiagonalGaussian:
    return DiagonalGaussian(self.encode_moments(x))

  def decode(self, z: jax.Array) -> jax.Array:
    """Unscaled latent -> image (float32, roughly in [-1, 1])."""
    return self.decoder(self.post_quant_conv(z.astype(self.dtype))).astype(jnp.float32)

  def __call__(self, x: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """Reconstruction through the posterior mean (used only to create all parameters)."""
    moments = self.encode_moments(x)
    return self.decode(DiagonalGaussian(moments).mode()), moments
