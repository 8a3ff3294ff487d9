"""Building blocks shared by the VAE, the vision encoder and the UNet.

The helpers here are called inside a parent's `@nn.compact` method and create the Flax layer
under the given name, so that parameter paths mirror the official PyTorch state_dict keys
(`down_0/block_1/conv1/kernel` <-> `down.0.block.1.conv1.weight`), which keeps checkpoint
conversion a mechanical rename.

Initialisers follow PyTorch's defaults so that a model created from scratch has the same weight
statistics as the official code: U(+-1/sqrt(fan_in)) for conv/linear weights and biases (kaiming
uniform with a=sqrt(5)), N(0, 1) for embeddings, and zeros where LDM uses `zero_module`.
"""

import dataclasses
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Precision = Any


def torch_default_kernel_init() -> Callable:
  """PyTorch's Conv/Linear weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int) -> Callable:
  """PyTorch's Conv/Linear bias init, which (unlike Flax's) depends on the fan-in."""
  bound = 1.0 / max(fan_in, 1) ** 0.5

  def init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def conv2d(x: jax.Array, features: int, name: str, *, kernel_size: int = 3, stride: int = 1,
           padding: Any = None, zero_init: bool = False, dtype: Dtype = jnp.float32,
           precision: Precision = None) -> jax.Array:
  """Applies a torch.nn.Conv2d-equivalent convolution (NHWC) created under `name`.

  `padding` defaults to "same" for odd kernels (kernel_size // 2 on every side, as the official
  3x3 convs with padding=1); explicit pairs express the VAE's asymmetric downsampling.
  """
  if padding is None:
    padding = kernel_size // 2
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  fan_in = x.shape[-1] * kernel_size * kernel_size
  layer = nn.Conv(
      features, (kernel_size, kernel_size),
      strides=(stride, stride),
      padding=padding,
      dtype=dtype,
      precision=precision,
      kernel_init=nn.initializers.zeros if zero_init else torch_default_kernel_init(),
      bias_init=nn.initializers.zeros if zero_init else torch_default_bias_init(fan_in),
      name=name)
  return layer(x)


class NearestUpsampleConv(nn.Module):
  """Nearest x2 upsampling then a 3x3 'same' conv, as four 2x2 convs on the low-res input.

  Every output pixel of phase (a, b) (row parity a, column parity b) sees only two distinct
  input rows and two input columns, so the 3x3 kernel folds into one 2x2 kernel per phase
  (rows: [k0, k1 + k2] for even rows, [k0 + k1, k2] for odd rows; columns alike). Same result as
  `conv2d(upsample_nearest_2x(x))` up to float32 round-off, with 16 instead of 36 multiply-adds
  per input pixel and channel, and without materialising the 4x upsampled input. The kl-f8
  decoder's three upsampling convs are ~19% of SDSeg's inference FLOPs. Parameters are those of
  `conv2d` (`kernel` (3, 3, C_in, C_out), `bias`), so checkpoints are unchanged.
  """
  features: int
  dtype: Dtype = jnp.float32
  precision: Precision = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_features = x.shape[-1]
    kernel = self.param("kernel", torch_default_kernel_init(),
                        (3, 3, in_features, self.features), jnp.float32)
    bias = self.param("bias", torch_default_bias_init(in_features * 9), (self.features,),
                      jnp.float32)

    def fold(k: jax.Array, axis: int, phase: int) -> jax.Array:
      k0, k1, k2 = (jnp.take(k, i, axis=axis) for i in range(3))
      taps = (k0, k1 + k2) if phase == 0 else (k0 + k1, k2)
      return jnp.stack(taps, axis=axis)

    # Even output rows read input rows (i-1, i): pad one row above; odd rows read (i, i+1).
    pads = {0: (1, 0), 1: (0, 1)}
    phases = []
    for a in (0, 1):
      row_folded = fold(kernel, 0, a)
      row = []
      for b in (0, 1):
        k = fold(row_folded, 1, b).astype(self.dtype)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), k, window_strides=(1, 1), padding=(pads[a], pads[b]),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)
        row.append(y)
      phases.append(jnp.stack(row, axis=3))            # (B, H, W, 2[b], C)
    y = jnp.stack(phases, axis=2)                        # (B, H, 2[a], W, 2[b], C)
    batch, height, _, width, _, channels = y.shape
    y = y.reshape(batch, 2 * height, 2 * width, channels)
    return y + bias.astype(self.dtype)


def linear(x: jax.Array, features: int, name: str, *, zero_init: bool = False,
           dtype: Dtype = jnp.float32, precision: Precision = None) -> jax.Array:
  """Applies a torch.nn.Linear-equivalent dense layer (also used for 1x1 Conv1d) under `name`."""
  layer = nn.Dense(
      features,
      dtype=dtype,
      precision=precision,
      kernel_init=nn.initializers.zeros if zero_init else torch_default_kernel_init(),
      bias_init=nn.initializers.zeros if zero_init else torch_default_bias_init(x.shape[-1]),
      name=name)
  return layer(x)


class GroupNorm(nn.Module):
  """torch.nn.GroupNorm over NHWC with float32 statistics (params `scale`, `bias`, as Flax's).

  Same maths as `flax.linen.GroupNorm(use_fast_variance=False)`, arranged for speed: the
  statistics are per-channel sums over the spatial axes, combined per group on the tiny (B, C)
  arrays, so every pass over the activation is a plain reduction or a fused elementwise op.
  Flax's version reshapes to (B, HW, G, C/G) and reduces over two non-adjacent axes; on CPU its
  backward pass was 2.5x slower (10 ms vs 26 ms for a 16x64x64x64 GroupNorm+SiLU fwd+bwd), and
  GroupNorm is in every residual block.
  """
  num_groups: int = 32
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(f"GroupNorm: {channels} channels do not split into {self.num_groups} "
                       "groups")
    scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    x = x.astype(jnp.float32)
    batch, group_size = x.shape[0], channels // self.num_groups
    spatial_axes = tuple(range(1, x.ndim - 1))
    count = group_size * math.prod(x.shape[1:-1])

    def per_channel(group_stat: jax.Array) -> jax.Array:
      """(B, G) -> (B, 1, ..., 1, C): each group's value on each of its channels."""
      values = jnp.repeat(group_stat, group_size, axis=1)
      return values.reshape((batch,) + (1,) * len(spatial_axes) + (channels,))

    def group_sum(per_channel_sum: jax.Array) -> jax.Array:
      return per_channel_sum.reshape(batch, self.num_groups, group_size).sum(-1)

    mean = per_channel(group_sum(x.sum(spatial_axes)) / count)
    centred = x - mean
    # Two-pass variance (not E[x^2] - E[x]^2), to match PyTorch within float32 round-off.
    variance = group_sum(jnp.square(centred).sum(spatial_axes)) / count
    inv_std = per_channel(jax.lax.rsqrt(variance + self.epsilon))
    return centred * inv_std * scale + bias


NORM_IMPLS = ("channel_sums", "flax")
UPSAMPLE_IMPLS = ("folded", "repeat")


@dataclasses.dataclass(frozen=True)
class Kernels:
  """How two layers are computed; same parameters and maths either way (`config.model.kernels`).

  norm: "channel_sums" (`GroupNorm` above, faster on CPU) or "flax" (`flax.linen.GroupNorm`).
  upsample: "folded" (`NearestUpsampleConv`, 16/36 of the multiply-adds) or "repeat" (nearest
  x2 upsampling materialised, then the 3x3 conv, as the official code).
  The best choice depends on the compiler (BENCHMARKS.md, "Layer choices"); the parity tests
  run every combination against the official outputs.
  """
  norm: str = "channel_sums"
  upsample: str = "folded"

  def __post_init__(self):
    if self.norm not in NORM_IMPLS:
      raise ValueError(f"unknown norm kernel {self.norm!r}; expected one of {NORM_IMPLS}")
    if self.upsample not in UPSAMPLE_IMPLS:
      raise ValueError(f"unknown upsample kernel {self.upsample!r}; expected one of "
                       f"{UPSAMPLE_IMPLS}")


def group_norm(x: jax.Array, name: str, *, epsilon: float, num_groups: int = 32,
               kernels: Kernels = Kernels()) -> jax.Array:
  """GroupNorm with statistics always in float32, returning x's dtype.

  The official UNet computes its norms in float32 (`GroupNorm32`), and under bf16 the statistics
  over 256x256 VAE activations would otherwise lose precision.
  """
  if kernels.norm == "flax":
    norm = nn.GroupNorm(num_groups=num_groups, epsilon=epsilon, use_fast_variance=False,
                        dtype=jnp.float32, param_dtype=jnp.float32, name=name)
  else:
    norm = GroupNorm(num_groups=num_groups, epsilon=epsilon, name=name)
  return norm(x.astype(jnp.float32)).astype(x.dtype)


def upsample_conv(x: jax.Array, features: int, name: str, *, kernels: Kernels = Kernels(),
                  dtype: Dtype = jnp.float32, precision: Precision = None) -> jax.Array:
  """Nearest x2 upsampling then a 3x3 'same' conv (parameters `name/kernel`, `name/bias`)."""
  if kernels.upsample == "repeat":
    return conv2d(upsample_nearest_2x(x), features, name, dtype=dtype, precision=precision)
  return NearestUpsampleConv(features, dtype=dtype, precision=precision, name=name)(x)


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
  """Nearest-neighbour x2 upsampling of an NHWC tensor (torch interpolate mode='nearest')."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avg_pool_2x(x: jax.Array) -> jax.Array:
  """2x2 average pooling with stride 2 of an NHWC tensor (torch AvgPool2d(2, 2))."""
  return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")
