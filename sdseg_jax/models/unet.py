"""The LDM `openaimodel.UNetModel` as used by SDSeg, NHWC.

Residual blocks with scale-shift norm and residual up/down sampling, legacy-order multi-head
self-attention, a sinusoidal [cos, sin] timestep embedding and an optional class embedding.
Names follow the official state_dict (`input_blocks.<i>.<j>.*` becomes `input_blocks_<i>_<j>`)
so that LDM and SDSeg checkpoints map onto these parameters by name. Every field of the official
`unet_config` is accepted; the spatial-transformer (cross-attention) variant is not part of SDSeg
and is rejected.
"""

import functools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdseg_jax.models import attention
from sdseg_jax.models import layers

UNET_NORM_EPS = 1e-5  # `GroupNorm32` in openaimodel; the VAE uses 1e-6.


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of integer timesteps, [cos | sin] order as the LDM code, float32."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class ResBlock(nn.Module):
  """Residual block conditioned on the (time [+ class]) embedding, optionally resampling."""
  out_channels: int
  dropout: float = 0.0
  use_scale_shift_norm: bool = True
  use_conv: bool = False
  up: bool = False
  down: bool = False
  dtype: Any = jnp.float32
  precision: Any = None
  kernels: layers.Kernels = layers.Kernels()

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, train: bool = False) -> jax.Array:
    kw = dict(dtype=self.dtype, precision=self.precision)
    norm = functools.partial(layers.group_norm, epsilon=UNET_NORM_EPS, kernels=self.kernels)
    h = nn.silu(norm(x, "in_layers_0"))
    if self.up:
      h, x = layers.upsample_nearest_2x(h), layers.upsample_nearest_2x(x)
    elif self.down:
      h, x = layers.avg_pool_2x(h), layers.avg_pool_2x(x)
    h = layers.conv2d(h, self.out_channels, "in_layers_2", **kw)

    emb_width = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
    e = layers.linear(nn.silu(emb), emb_width, "emb_layers_1", **kw)[:, None, None, :]
    if self.use_scale_shift_norm:
      scale, shift = jnp.split(e, 2, axis=-1)
      h = norm(h, "out_layers_0") * (1 + scale) + shift
    else:
      h = norm(h + e, "out_layers_0")
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    h = layers.conv2d(h, self.out_channels, "out_layers_3", zero_init=True, **kw)

    if x.shape[-1] != self.out_channels:
      x = layers.conv2d(x, self.out_channels, "skip_connection",
                        kernel_size=3 if self.use_conv else 1, **kw)
    return x + h


class AttentionBlock(nn.Module):
  """Multi-head self-attention over all spatial positions with a residual connection.

  Legacy order (`QKVAttentionLegacy`, SDSeg's default): the 3C qkv channels are grouped per head
  as [q_h, k_h, v_h]. New order (`QKVAttention`): [q (all heads), k, v].
  """
  num_heads: int
  use_new_attention_order: bool = False
  dtype: Any = jnp.float32
  precision: Any = None
  attention_impl: Any = None
  kernels: layers.Kernels = layers.Kernels()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hgt, wid, c = x.shape
    kw = dict(dtype=self.dtype, precision=self.precision)
    h = layers.group_norm(x, "norm", epsilon=UNET_NORM_EPS, kernels=self.kernels)
    h = h.reshape(b, hgt * wid, c)
    qkv = layers.linear(h, 3 * c, "qkv", **kw)
    head_dim = c // self.num_heads
    if self.use_new_attention_order:
      qkv = qkv.reshape(b, hgt * wid, 3, self.num_heads, head_dim)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
      qkv = qkv.reshape(b, hgt * wid, self.num_heads, 3 * head_dim)
      q, k, v = jnp.split(qkv, 3, axis=-1)
    h = attention.attend(q, k, v, implementation=self.attention_impl).reshape(b, hgt * wid, c)
    h = layers.linear(h, c, "proj_out", zero_init=True, **kw)
    return x + h.reshape(b, hgt, wid, c)


class Downsample(nn.Module):
  """Non-residual downsampling (`resblock_updown: False`): stride-2 conv `op` or avg-pool."""
  use_conv: bool
  out_channels: int
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if not self.use_conv:
      return layers.avg_pool_2x(x)
    return layers.conv2d(x, self.out_channels, "op", stride=2, dtype=self.dtype,
                         precision=self.precision)


class Upsample(nn.Module):
  """Non-residual upsampling (`resblock_updown: False`): nearest x2, then optionally a conv."""
  use_conv: bool
  out_channels: int
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = layers.upsample_nearest_2x(x)
    if self.use_conv:
      x = layers.conv2d(x, self.out_channels, "conv", dtype=self.dtype, precision=self.precision)
    return x


class UNet(nn.Module):
  """eps-prediction UNet: (B, r, r, in_channels), t (B,), [y (B,)] -> (B, r, r, out_channels)."""
  image_size: int = 32
  in_channels: int = 8
  out_channels: int = 4
  model_channels: int = 192
  attention_resolutions: Sequence[int] = (1, 2, 4, 8)
  num_res_blocks: int = 2
  channel_mult: Sequence[int] = (1, 2, 2, 4, 4)
  num_heads: int = 8
  num_head_channels: int = -1
  num_heads_upsample: int = -1
  use_scale_shift_norm: bool = True
  resblock_updown: bool = True
  conv_resample: bool = True
  use_new_attention_order: bool = False
  num_classes: Optional[int] = None
  dropout: float = 0.0
  # The official `use_checkpoint`: recompute each residual and attention block's activations in
  # the backward pass instead of storing them (gradient checkpointing, as openaimodel's
  # `checkpoint(...)`): less activation memory for about one more forward pass of the UNet.
  remat_blocks: bool = False
  dtype: Any = jnp.float32
  precision: Any = None
  attention_impl: Any = None
  kernels: layers.Kernels = layers.Kernels()

  def _heads(self, channels: int, upsample: bool) -> int:
    if self.num_head_channels != -1:
      return channels // self.num_head_channels
    if upsample and self.num_heads_upsample != -1:
      return self.num_heads_upsample
    return self.num_heads

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, y: Optional[jax.Array] = None,
               train: bool = False) -> jax.Array:
    if (y is None) != (self.num_classes is None):
      raise ValueError("class labels `y` must be given if and only if the UNet has num_classes "
                       f"(num_classes={self.num_classes}, y given: {y is not None})")
    kw = dict(dtype=self.dtype, precision=self.precision)
    mc = self.model_channels
    # `train` (argument 3 counting self) selects dropout, so it stays a Python bool under remat.
    res_cls = nn.remat(ResBlock, static_argnums=(3,)) if self.remat_blocks else ResBlock
    attn_cls = nn.remat(AttentionBlock) if self.remat_blocks else AttentionBlock

    def res_block(h, out_channels, name, **extra):
      return res_cls(out_channels, self.dropout, self.use_scale_shift_norm, kernels=self.kernels,
                     name=name, **extra, **kw)(h, emb, train)

    def attn_block(h, name, upsample=False):
      return attn_cls(self._heads(h.shape[-1], upsample), self.use_new_attention_order,
                      attention_impl=self.attention_impl, kernels=self.kernels, name=name,
                      **kw)(h)

    emb = timestep_embedding(t, mc)
    emb = layers.linear(emb, 4 * mc, "time_embed_0", **kw)
    emb = layers.linear(nn.silu(emb), 4 * mc, "time_embed_2", **kw)
    if self.num_classes is not None:
      emb = emb + nn.Embed(self.num_classes, 4 * mc, dtype=self.dtype,
                           embedding_init=nn.initializers.normal(1.0), name="label_emb")(y)

    h = layers.conv2d(x.astype(self.dtype), mc, "input_blocks_0_0", **kw)
    skips = [h]
    block, ds = 1, 1
    last_level = len(self.channel_mult) - 1
    for level, mult in enumerate(self.channel_mult):
      for _ in range(self.num_res_blocks):
        h = res_block(h, mult * mc, f"input_blocks_{block}_0")
        if ds in self.attention_resolutions:
          h = attn_block(h, f"input_blocks_{block}_1")
        skips.append(h)
        block += 1
      if level != last_level:
        name = f"input_blocks_{block}_0"
        if self.resblock_updown:
          h = res_block(h, h.shape[-1], name, down=True)
        else:
          h = Downsample(self.conv_resample, h.shape[-1], name=name, **kw)(h)
        skips.append(h)
        block += 1
        ds *= 2

    h = res_block(h, h.shape[-1], "middle_block_0")
    h = attn_block(h, "middle_block_1")
    h = res_block(h, h.shape[-1], "middle_block_2")

    block = 0
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
        h = res_block(h, mc * mult, f"output_blocks_{block}_0")
        sub = 1
        if ds in self.attention_resolutions:
          h = attn_block(h, f"output_blocks_{block}_1", upsample=True)
          sub = 2
        if level and i == self.num_res_blocks:
          name = f"output_blocks_{block}_{sub}"
          if self.resblock_updown:
            h = res_block(h, h.shape[-1], name, up=True)
          else:
            h = Upsample(self.conv_resample, h.shape[-1], name=name, **kw)(h)
          ds //= 2
        block += 1

    h = nn.silu(layers.group_norm(h, "out_0", epsilon=UNET_NORM_EPS, kernels=self.kernels))
    h = layers.conv2d(h, self.out_channels, "out_2", zero_init=True, **kw)
    return h.astype(jnp.float32)
