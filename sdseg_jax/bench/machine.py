"""The machine a benchmark runs on: device, peak FLOP/s, load, and the model FLOPs behind MFU.

MFU uses the model FLOPs of the full-size SDSeg at 256x256 (936.8 GFLOP per inference image,
1216.0 GFLOP per training example) against a per-device peak: the datasheet dense bf16 or TF32
figure on GPU/TPU (`_PEAK_TFLOPS`). On CPU, MFU is n/a: a shared CPU has no stable peak (a matmul
peak measured at start-up gave MFU above 100% minutes later), so achieved TFLOP/s is reported,
with the start-up matmul rate for context. The JSON's device.peak_basis says which applies.
"""

import os
import platform
import statistics
import time
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from sdseg_jax.models import model_config

# Model FLOPs per image (docs/performance.md#model-flops, counted on the official-size
# modules at 256x256; conv/matmul/attention at 2 FLOPs per multiply-add).
INFER_FLOPS_PER_IMAGE = 936.8e9
TRAIN_FLOPS_PER_EXAMPLE = 1216.0e9
FLOPS = {"infer": INFER_FLOPS_PER_IMAGE, "train": TRAIN_FLOPS_PER_EXAMPLE}

# Dense peak TFLOP/s per device, by a substring of `device.device_kind` (first match wins).
# "float32" on NVIDIA is the TF32 tensor-core peak: XLA's DEFAULT precision and PyTorch's cuDNN
# convolutions (allow_tf32=True by default) both use TF32 for float32 inputs.
_PEAK_TFLOPS: Tuple[Tuple[str, Dict[str, float], str], ...] = (
    ("H200", {"bfloat16": 989.4, "float32": 494.7}, "H200 SXM datasheet, dense"),
    ("H100 PCIe", {"bfloat16": 756.0, "float32": 378.0}, "H100 PCIe datasheet, dense"),
    ("H100", {"bfloat16": 989.4, "float32": 494.7}, "H100 SXM datasheet, dense"),
    ("A100", {"bfloat16": 312.0, "float32": 156.0}, "A100 datasheet, dense"),
    ("TPU v5 lite", {"bfloat16": 197.0, "float32": 197.0}, "TPU v5e datasheet"),
    ("TPU v5e", {"bfloat16": 197.0, "float32": 197.0}, "TPU v5e datasheet"),
    ("TPU v5p", {"bfloat16": 459.0, "float32": 459.0}, "TPU v5p datasheet"),
    ("TPU v5", {"bfloat16": 459.0, "float32": 459.0}, "TPU v5p datasheet"),
    ("TPU v6", {"bfloat16": 918.0, "float32": 918.0}, "TPU v6e datasheet"),
    ("TPU v4", {"bfloat16": 275.0, "float32": 275.0}, "TPU v4 datasheet"),
)


def cpu_model() -> str:
  """The CPU model string of /proc/cpuinfo (Linux), else platform.processor()."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def load_average() -> Optional[List[float]]:
  """1/5/15-minute load averages: on a shared machine, the context of every timing."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def measured_matmul_tflops(n: int = 2048, iters: int = 5) -> float:
  """Median float32 TFLOP/s of an n x n matmul: context for CPU figures (not an MFU basis)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(f(a))
    times.append(time.perf_counter() - start)
  return 2 * n ** 3 / statistics.median(times) / 1e12


def device_info(measure_cpu_peak: bool = True) -> Dict[str, Any]:
  """Platform, device kind and the peak FLOP/s basis that MFU is computed against."""
  device = jax.devices()[0]
  info = {"platform": device.platform, "device_kind": device.device_kind,
          "num_devices": jax.device_count(), "jax": jax.__version__,
          "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "hostname": platform.node()}
  for key, peaks, basis in _PEAK_TFLOPS:
    if key.lower() in device.device_kind.lower():
      info["peak_tflops"], info["peak_basis"] = dict(peaks), basis
      break
  else:
    info["peak_tflops"] = None
    if device.platform == "cpu":
      # A shared CPU's ceiling changes with the other tenants' load from one minute to the
      # next, so a peak measured at start-up makes MFU meaningless (it exceeded 100% in
      # testing). MFU is n/a; achieved TFLOP/s is reported instead, with this for context.
      info["peak_basis"] = "CPU: MFU n/a (no stable peak); see achieved_tflops per result"
      if measure_cpu_peak:
        info["matmul_tflops_at_start"] = measured_matmul_tflops()
        info["peak_basis"] += (f"; a float32 2048x2048 matmul ran at "
                               f"{info['matmul_tflops_at_start']:.3f} TFLOP/s at start-up")
    else:
      info["peak_basis"] = "unknown device: MFU not reported"
  return info


def mfu(images_per_s: float, suite: str, dtype: str, info: Dict[str, Any],
        full_size: bool = True) -> Optional[float]:
  """Model FLOPs utilisation against the device peak for `dtype`.

  None where no peak is known, or for a model other than the full-size 256x256 one, whose
  FLOP counts are the only ones measured (docs/performance.md#model-flops).
  """
  peaks = info.get("peak_tflops")
  if not full_size or not peaks or dtype not in peaks:
    return None
  return images_per_s * FLOPS[suite] / (peaks[dtype] * 1e12)


def is_full_size(config: ml_collections.ConfigDict) -> bool:
  """Whether config.model is the official full-size SDSeg at 256x256 (the FLOP counts' model)."""
  reference = model_config.model_config().to_dict()
  given = config.model.to_dict()
  # Settings that change how, not what, is computed (the same FLOPs of the same model).
  ignore = ("compute_dtype", "precision", "attention_impl", "norm_impl", "upsample_impl")
  how = lambda unet: {k: v for k, v in unet.items() if k != "use_checkpoint"}
  reference["unet"], given["unet"] = how(reference["unet"]), how(given.get("unet", {}))
  return all(given.get(k) == v for k, v in reference.items() if k not in ignore)


def xla_flops(compiled: Any) -> Optional[float]:
  """XLA's own FLOP estimate of an executable (a cross-check; backends count differently)."""
  try:
    cost = compiled.cost_analysis()
  except (AttributeError, NotImplementedError, RuntimeError):
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops else None


def memory_report(compiled: Any) -> Dict[str, Any]:
  """Peak device memory where the runtime reports it, plus XLA's static buffer sizes.

  GPU/TPU: `memory_stats()["peak_bytes_in_use"]`, the process-wide peak so far (it cannot be
  reset, so batch sizes are run in increasing order). CPU has no allocator statistics: then the
  compiled executable's argument + output + temporary buffer sizes (minus aliased/donated
  buffers) is the estimate.
  """
  report: Dict[str, Any] = {}
  try:
    stats = jax.devices()[0].memory_stats()
  except (AttributeError, NotImplementedError, RuntimeError):
    stats = None
  if stats and "peak_bytes_in_use" in stats:
    report["peak_bytes"] = int(stats["peak_bytes_in_use"])
    report["peak_source"] = "device.memory_stats()['peak_bytes_in_use'] (process peak so far)"
  try:
    mem = compiled.memory_analysis()
  except (AttributeError, NotImplementedError, RuntimeError):
    mem = None
  if mem is not None:
    sizes = {k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0)
             for k in ("argument", "output", "temp", "alias", "generated_code")}
    report["compiled"] = sizes
    estimate = sizes["argument"] + sizes["output"] + sizes["temp"] - sizes["alias"]
    if "peak_bytes" not in report:
      report["peak_bytes"] = estimate
      report["peak_source"] = ("compiled.memory_analysis(): argument + output + temp - alias "
                               "bytes (no allocator statistics on this backend)")
  return report

