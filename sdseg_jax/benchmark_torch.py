"""PyTorch (diffusers) baseline for the SDSeg benchmark: same FLOPs and parameters, random weights.

`python -m sdseg_jax.benchmark` compares the JAX implementation with this one. The official SDSeg
code needs an old Lightning/LDM stack, so the baseline rebuilds the three networks from stock
diffusers modules configured to the official sizes (docs/performance.md#how-the-flops-were-counted):

* kl-f8 VAE: `AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
  latent_channels=4)`, 83,653,863 parameters; frozen.
* vision encoder (SDSeg's AEEncoderEmbedder): a second kl-f8 encoder (double_z, 8 channels) and a
  1x1 conv 8->4, 34,163,628 parameters; trainable.
* LDM UNet: `UNet2DModel(in=8, out=4, block_out_channels=(192, 384, 384, 768, 768),
  layers_per_block=2)` with residual up/down-sampling, scale-shift norm, plain self-attention at
  32/16/8/4 px (not at 2x2) with 8 heads, 294,972,292 parameters (1,536 fewer than the official
  module; FLOPs identical); trainable.

Weights are random: speed and memory do not depend on the values. torch and diffusers are
optional dependencies (requirements-bench.txt); nothing else in sdseg_jax imports this module.

Precision policy, chosen to be what a PyTorch user would run:
* inference: the weights are cast to the compute dtype (what `torch_dtype=torch.float16` does in
  diffusers pipelines);
* training: fp32 master weights with `torch.autocast` (AMP); fp16 adds a GradScaler, bf16 needs
  none.

Usage:
  python -m sdseg_jax.benchmark_torch --mode=params
  python -m sdseg_jax.benchmark_torch --mode=infer --batch=32 --dtype=bf16 --device=cuda
  python -m sdseg_jax.benchmark_torch --mode=train --batch=32 --dtype=bf16 --device=cuda
"""

import argparse
from collections.abc import Callable
import dataclasses
import json
import resource
import statistics
import sys
import time
from typing import Any

import diffusers
from diffusers.models.attention_processor import Attention
from diffusers.models.autoencoders.vae import Encoder
import numpy as np
import torch
from torch import nn

# ----------------------------------------------------------------------------------------------
# Constants of the SDSeg setup (docs/method.md#noise-schedule and
# docs/method.md#single-step-inference).
# ----------------------------------------------------------------------------------------------
IMAGE_SIZE = 256
LATENT_CHANNELS = 4
NUM_TIMESTEPS = 1000
LINEAR_START, LINEAR_END = 0.0015, 0.0155
SCALE_FACTOR = 0.18215  # Fixed; SDSeg derives it from data (scale_by_std), irrelevant for speed.
NUM_HEADS = 8
LR, WEIGHT_DECAY = 4e-5, 0.01

# Parameter counts of the diffusers builds (docs/performance.md#parameters).
EXPECTED_PARAMS = {"unet": 294_972_292, "vae": 83_653_863, "vision_encoder": 34_163_628}

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_VAE_BLOCKS = (128, 256, 512, 512)


@dataclasses.dataclass
class Modules:
  """The three SDSeg networks plus the diffusion schedule, on one device."""
  vae: diffusers.AutoencoderKL
  vision_encoder: nn.Module
  unet: diffusers.UNet2DModel
  alphas_cumprod: torch.Tensor  # (1000,) float32


class VisionEncoder(nn.Module):
  """SDSeg's trainable image encoder: a kl-f8 encoder (mean||logvar, 8 ch) and a 1x1 conv to 4."""

  def __init__(self):
    super().__init__()
    self.encoder = Encoder(
        in_channels=3, out_channels=2 * LATENT_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * len(_VAE_BLOCKS),
        block_out_channels=_VAE_BLOCKS, layers_per_block=2, act_fn="silu", norm_num_groups=32,
        double_z=False)  # out_channels already counts both halves.
    self.out = nn.Conv2d(2 * LATENT_CHANNELS, LATENT_CHANNELS, kernel_size=1)

  def forward(self, image: torch.Tensor) -> torch.Tensor:
    return self.out(self.encoder(image))


def _build_vae() -> diffusers.AutoencoderKL:
  return diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
      down_block_types=("DownEncoderBlock2D",) * len(_VAE_BLOCKS),
      up_block_types=("UpDecoderBlock2D",) * len(_VAE_BLOCKS),
      block_out_channels=_VAE_BLOCKS, layers_per_block=2, norm_num_groups=32,
      sample_size=IMAGE_SIZE)


def _build_unet() -> diffusers.UNet2DModel:
  """The LDM UNet of SDSeg as a diffusers UNet2DModel (same FLOPs, parameters within 0.0005%)."""
  unet = diffusers.UNet2DModel(
      sample_size=IMAGE_SIZE // 8, in_channels=2 * LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
      block_out_channels=(192, 384, 384, 768, 768), layers_per_block=2,
      down_block_types=("AttnDownBlock2D",) * 4 + ("DownBlock2D",),
      up_block_types=("ResnetUpsampleBlock2D",) + ("AttnUpBlock2D",) * 4,
      downsample_type="resnet", upsample_type="resnet", resnet_time_scale_shift="scale_shift",
      attention_head_dim=32, norm_num_groups=32, norm_eps=1e-5)
  # UNet2DModel takes one head *width* for all levels, SDSeg uses 8 heads at every width
  # (num_heads=8, num_head_channels=-1). Heads change neither parameters nor FLOPs, only the
  # attention kernel's shapes, so set them per layer after construction.
  for module in unet.modules():
    if isinstance(module, Attention):
      module.heads = NUM_HEADS
      module.scale = (module.inner_dim // NUM_HEADS) ** -0.5
  return unet


def _alphas_cumprod() -> torch.Tensor:
  """LDM "linear" schedule: betas = linspace(sqrt(start), sqrt(end), T) ** 2."""
  betas = np.linspace(LINEAR_START ** 0.5, LINEAR_END ** 0.5, NUM_TIMESTEPS, dtype=np.float64) ** 2
  return torch.from_numpy(np.cumprod(1.0 - betas)).float()


def count_params(module: nn.Module) -> int:
  return sum(p.numel() for p in module.parameters())


def build_modules(device: str | torch.device = "cpu", *, channels_last: bool = True,
                  seed: int = 0) -> Modules:
  """Builds the randomly initialised networks on `device` (fp32)."""
  torch.manual_seed(seed)
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  vae = _build_vae().to(device, memory_format=fmt).eval().requires_grad_(False)
  vision_encoder = VisionEncoder().to(device, memory_format=fmt)
  unet = _build_unet().to(device, memory_format=fmt)
  return Modules(vae, vision_encoder, unet, _alphas_cumprod().to(device))


def param_counts(modules: Modules) -> dict[str, int]:
  """Parameters per network, to check the builds against EXPECTED_PARAMS."""
  return {"unet": count_params(modules.unet), "vae": count_params(modules.vae),
          "vision_encoder": count_params(modules.vision_encoder)}


def check_param_counts(counts: dict[str, int], rel_tol: float = 1e-4) -> None:
  """Raises if a build drifted from the documented sizes (e.g. a diffusers default changed)."""
  for name, expected in EXPECTED_PARAMS.items():
    if abs(counts[name] - expected) > rel_tol * expected:
      raise AssertionError(f"{name}: {counts[name]:,} parameters, expected {expected:,}")


# ----------------------------------------------------------------------------------------------
# Timing helpers.
# ----------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
  # CUDA launches are asynchronous; without a sync the clock measures only the launch.
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def _peak_memory_start(device: torch.device) -> None:
  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_bytes(device: torch.device) -> int:
  """Peak allocated device memory on CUDA; on CPU the process's peak RSS (never reset)."""
  if device.type == "cuda":
    return int(torch.cuda.max_memory_allocated(device))
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB.


def _time(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> list[float]:
  for _ in range(warmup):
    fn()
  _sync(device)
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    fn()
    _sync(device)
    times.append(time.perf_counter() - start)
  return times


def _result(batch: int, dtype: str, device: torch.device, times: list[float]) -> dict[str, Any]:
  median = statistics.median(times)
  return {"images_per_s": batch / median, "median_s": median,
          "peak_mem_bytes": _peak_memory_bytes(device), "batch": batch, "dtype": dtype,
          "device": str(device), "iters": len(times), "times_s": times,
          "torch": torch.__version__, "diffusers": diffusers.__version__}


def _inputs(batch: int, device: torch.device, fmt: torch.memory_format, dtype=torch.float32):
  g = torch.Generator(device="cpu").manual_seed(1)
  image = torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g) * 2 - 1
  mask = (torch.rand(batch, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g) > 0.5).float() * 2 - 1
  mask = mask.expand(-1, 3, -1, -1)  # SDSeg encodes the binary mask as a 3-channel image.
  return (image.to(device, dtype).contiguous(memory_format=fmt),
          mask.to(device, dtype).contiguous(memory_format=fmt))


# ----------------------------------------------------------------------------------------------
# Inference: vision encoder -> UNet at t=999 on noise||cond -> x0 -> VAE decode -> probabilities.
# ----------------------------------------------------------------------------------------------

def measure_inference(batch: int, dtype: str = "bf16", device: str | torch.device = "cuda",
                      warmup: int = 3, iters: int = 10, *, channels_last: bool = True,
                      compile_modules: bool = False,
                      modules: Modules | None = None) -> dict[str, Any]:
  """Times SDSeg's single-step inference on a batch of 256x256 images.

  Args:
    batch: images per call.
    dtype: "fp32", "bf16" or "fp16": the weights and activations are cast to it.
    device: torch device string.
    warmup: untimed calls first (cuDNN autotuning, allocator warm-up, torch.compile).
    iters: timed calls; the median is reported.
    channels_last: NHWC memory format (faster cuDNN convolutions in half precision).
    compile_modules: wrap the networks in torch.compile.
    modules: reuse already built networks (their dtype is changed in place).

  Returns:
    dict with images_per_s, median_s, peak_mem_bytes and the run's settings.
  """
  device = torch.device(device)
  torch_dtype = _DTYPES[dtype]
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  modules = modules or build_modules(device, channels_last=channels_last)
  vae = modules.vae.to(torch_dtype).eval()
  venc = modules.vision_encoder.to(torch_dtype).eval()
  unet = modules.unet.to(torch_dtype).eval()
  decode = vae.decode
  if compile_modules:
    venc, unet, decode = torch.compile(venc), torch.compile(unet), torch.compile(vae.decode)
  abar = modules.alphas_cumprod[-1]
  c0, c1 = (1.0 / abar).sqrt().item(), (1.0 / abar - 1.0).sqrt().item()
  image, _ = _inputs(batch, device, fmt, torch_dtype)
  t = torch.full((batch,), NUM_TIMESTEPS - 1, device=device, dtype=torch.long)
  g = torch.Generator(device=device).manual_seed(2)

  @torch.inference_mode()
  def step():
    cond = venc(image)
    z_t = torch.randn(cond.shape, generator=g, device=device, dtype=torch_dtype)
    eps = unet(torch.cat([z_t, cond], dim=1), t).sample
    z0 = c0 * z_t - c1 * eps  # predict_start_from_noise at t = 999.
    x = decode(z0 / SCALE_FACTOR).sample
    return ((x.float() + 1) / 2).clamp(0, 1).mean(dim=1)  # Probability map (B, H, W).

  _peak_memory_start(device)
  times = _time(step, device, warmup, iters)
  return _result(batch, dtype, device, times)


# ----------------------------------------------------------------------------------------------
# Training step: frozen VAE encode of the mask, vision encoder + UNet, L1 noise + L1 latent loss,
# backward, AdamW, EMA of the UNet.
# ----------------------------------------------------------------------------------------------

def measure_train_step(batch: int, dtype: str = "bf16", device: str | torch.device = "cuda",
                       warmup: int = 3, iters: int = 10, *, channels_last: bool = True,
                       compile_modules: bool = False,
                       modules: Modules | None = None) -> dict[str, Any]:
  """Times one full SDSeg training step (the official recipe: AdamW, EMA, no grad clipping).

  Args:
    batch: examples per step.
    dtype: "fp32", or "bf16"/"fp16" autocast over fp32 master weights (fp16 with a GradScaler).
    device, warmup, iters, channels_last, compile_modules, modules: as in measure_inference.

  Returns:
    dict with images_per_s, median_s, peak_mem_bytes and the run's settings.
  """
  device = torch.device(device)
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  modules = modules or build_modules(device, channels_last=channels_last)
  vae = modules.vae.float().eval()
  venc = modules.vision_encoder.float().train()
  unet = modules.unet.float().train()
  encode = vae.encode
  venc_fn, unet_fn = venc, unet
  if compile_modules:
    venc_fn, unet_fn, encode = torch.compile(venc), torch.compile(unet), torch.compile(vae.encode)
  params = [*unet.parameters(), *venc.parameters()]
  opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY,
                          **({"fused": True} if device.type == "cuda" else {"foreach": True}))
  unet_params = list(unet.parameters())
  ema = [p.detach().clone() for p in unet_params]
  scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")
  autocast = torch.autocast(device.type, dtype=_DTYPES[dtype], enabled=dtype != "fp32")
  abar = modules.alphas_cumprod
  image, mask = _inputs(batch, device, fmt)
  num_updates = [0]

  def step():
    with torch.no_grad(), autocast:
      z0 = encode(mask).latent_dist.sample().float() * SCALE_FACTOR  # Frozen first stage.
    t = torch.randint(0, NUM_TIMESTEPS, (batch,), device=device)
    noise = torch.randn_like(z0)
    a = abar[t].view(-1, 1, 1, 1)
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
    with autocast:
      cond = venc_fn(image)
      eps = unet_fn(torch.cat([z_t, cond.to(z_t.dtype)], dim=1), t).sample
    eps = eps.float()
    loss_noise = (noise - eps).abs().mean()
    z0_hat = (1 / a).sqrt() * z_t - (1 / a - 1).sqrt() * eps
    loss = loss_noise + (z0_hat - z0).abs().mean()
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    # LitEma: decay = min(0.9999, (1 + n) / (10 + n)); ema <- ema + (1 - decay) (param - ema).
    num_updates[0] += 1
    decay = min(0.9999, (1 + num_updates[0]) / (10 + num_updates[0]))
    with torch.no_grad():
      torch._foreach_lerp_(ema, [p.detach() for p in unet_params], 1.0 - decay)  # pylint: disable=protected-access
    return loss

  _peak_memory_start(device)
  times = _time(step, device, warmup, iters)
  return _result(batch, dtype, device, times)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--mode", choices=("params", "infer", "train"), default="params")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--dtype", choices=tuple(_DTYPES), default="bf16")
  parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
  parser.add_argument("--compile", action="store_true", help="wrap the networks in torch.compile")
  parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
  args = parser.parse_args(argv)
  # diffusers warns on every `.to(dtype)` of a model that has no fp32-only modules; noise here.
  diffusers.utils.logging.set_verbosity_error()
  if args.threads:
    torch.set_num_threads(args.threads)
  modules = build_modules(args.device, channels_last=args.channels_last)
  counts = param_counts(modules)
  print(json.dumps({"params": counts}), flush=True)
  check_param_counts(counts)
  if args.mode == "params":
    return
  measure = measure_inference if args.mode == "infer" else measure_train_step
  result = measure(args.batch, args.dtype, args.device, args.warmup, args.iters,
                   channels_last=args.channels_last, compile_modules=args.compile, modules=modules)
  print(json.dumps({"mode": args.mode, **result}), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
