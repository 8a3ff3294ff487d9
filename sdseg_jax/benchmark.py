"""Throughput benchmark of sdseg_jax, optionally against the PyTorch baseline in the same run.

  python -m sdseg_jax.benchmark --suite infer --batch 1,4 --baseline torch --json infer.json
  python -m sdseg_jax.benchmark --suite train --batch 8,32 --dtype bfloat16 --baseline torch \
      --torch-dtype bf16 --json train.json

What is measured (full-size SDSeg at the config's resolution, 256x256 by default; synthetic
inputs and random weights, because speed does not depend on the values):

* infer: single-step inference as ONE jitted call: vision encoder -> UNet at t=999 on noise ->
  x0 recovery -> VAE decode -> probability map. images/s = batch / median call time.
* train: the real AOT-compiled train step of `sdseg_jax.step` (frozen-VAE mask encoding,
  vision encoder + UNet forward/backward, AdamW, EMA) on ONE device, so images/s is per device.

For each batch size: compile time (lower + compile, reported apart from step time), the median
step time over `--iters` timed calls after `--warmup` untimed ones (outputs are blocked on, so
asynchronous dispatch cannot hide work), peak memory and MFU. The PyTorch baseline
(`sdseg_jax/benchmark_torch.py`, diffusers modules of the same FLOPs) runs in the same process
on the same batch sizes, so both stacks see the same machine state; `--rounds` alternates the two
stacks several times, which matters on a shared machine whose load changes during the run.

MFU uses the model FLOPs of docs/performance.md#model-flops (936.8 GFLOP per inference image, 1216.0
GFLOP per training example) against a per-device peak: the datasheet dense bf16 or TF32 figure on
GPU/TPU (`_PEAK_TFLOPS`). On CPU, MFU is n/a: a shared CPU has no stable peak (a matmul peak
measured at start-up gave MFU above 100% minutes later), so achieved TFLOP/s is reported, with the
start-up matmul rate for context. The JSON's device.peak_basis says which applies.
"""

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sdseg_jax import optim
from sdseg_jax import sharding as sharding_lib
from sdseg_jax import state as state_lib
from sdseg_jax import step as step_lib
from sdseg_jax.models import model_config
from sdseg_jax.models import sdseg

# Model FLOPs per image (docs/performance.md#model-flops, counted on the official-size
# modules at 256x256; conv/matmul/attention at 2 FLOPs per multiply-add).
INFER_FLOPS_PER_IMAGE = 936.8e9
TRAIN_FLOPS_PER_EXAMPLE = 1216.0e9
_FLOPS = {"infer": INFER_FLOPS_PER_IMAGE, "train": TRAIN_FLOPS_PER_EXAMPLE}

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

# The full-size official model (configs/base.py), resolved from the repository root.
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "base.py")

# JAX dtype names <-> the baseline's names, to pair the runs that the ratio compares.
_TORCH_NAME = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


# ------------------------------------------------------------------------------------------------
# Machine description
# ------------------------------------------------------------------------------------------------

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
  return images_per_s * _FLOPS[suite] / (peaks[dtype] * 1e12)


def is_full_size(config: ml_collections.ConfigDict) -> bool:
  """Whether config.model is the official full-size SDSeg at 256x256 (the FLOP counts' model)."""
  reference = model_config.model_config().to_dict()
  given = config.model.to_dict()
  ignore = ("compute_dtype", "precision", "attention_impl")
  return all(given.get(k) == v for k, v in reference.items() if k not in ignore)


def _xla_flops(compiled: Any) -> Optional[float]:
  """XLA's own FLOP estimate of an executable (a cross-check; backends count differently)."""
  try:
    cost = compiled.cost_analysis()
  except (AttributeError, NotImplementedError, RuntimeError):
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops else None


# ------------------------------------------------------------------------------------------------
# Model, parameters and inputs
# ------------------------------------------------------------------------------------------------

def build_model(config: ml_collections.ConfigDict, dtype: str) -> Tuple[sdseg.SDSeg, str]:
  """The model of `config.model` with compute dtype `dtype` ("auto" resolved for this backend)."""
  model_cfg = ml_collections.ConfigDict(config.model.to_dict())
  model_cfg.compute_dtype = sdseg.resolve_compute_dtype(dtype)
  return sdseg.build(model_cfg), model_cfg.compute_dtype


def random_params(model: sdseg.SDSeg, seed: int = 0) -> Tuple[Any, Any]:
  """Random (trainable, VAE) parameters with PyTorch-like scales, without running `init`.

  `model.init` traces and runs a full forward pass of every network, which costs about a minute
  of CPU at full size; speed does not depend on the values, so shapes come from eval_shape and
  values from a fast generator: U(+-1/sqrt(fan_in)) kernels, unit norm scales, zero biases.
  """
  abstract_params, abstract_vae = jax.eval_shape(model.init, jax.random.key(seed))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = getattr(path[-1], "key", str(path[-1]))
    if name == "scale":
      return jnp.ones(leaf.shape, leaf.dtype)
    if name == "bias":
      return jnp.zeros(leaf.shape, leaf.dtype)
    fan_in = max(int(np.prod(leaf.shape[:-1])), 1)
    values = rng.uniform(-1.0, 1.0, leaf.shape).astype(np.float32) / np.sqrt(fan_in)
    return jnp.asarray(values, leaf.dtype)

  return (jax.tree_util.tree_map_with_path(fill, abstract_params),
          jax.tree_util.tree_map_with_path(fill, abstract_vae))


def synthetic_batch(batch: int, size: int, seed: int = 1) -> Dict[str, np.ndarray]:
  """Image in [-1, 1] and a binary mask in {-1, 1} (3 channels, as SDSeg encodes masks)."""
  rng = np.random.default_rng(seed)
  image = rng.uniform(-1.0, 1.0, (batch, size, size, 3)).astype(np.float32)
  mask = np.where(rng.random((batch, size, size, 1)) > 0.5, 1.0, -1.0).astype(np.float32)
  return {"image": image, "mask": np.repeat(mask, 3, axis=-1)}


def _memory_report(compiled: Any) -> Dict[str, Any]:
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


def _timed(fn: Callable[[], Any], warmup: int, iters: int) -> Dict[str, Any]:
  """Runs fn warmup + iters times, blocking on its outputs; wall and process-CPU seconds."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  wall, cpu = [], []
  for _ in range(iters):
    start, cpu_start = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    wall.append(time.perf_counter() - start)
    cpu.append(time.process_time() - cpu_start)
  return {"times_s": wall, "cpu_times_s": cpu}


def _summary(suite: str, batch: int, dtype: str, timing: Dict[str, Any], compiled: Any,
             compile_s: float, full_size: bool, info: Dict[str, Any],
             load_before) -> Dict[str, Any]:
  median = statistics.median(timing["times_s"])
  ips = batch / median
  xla_flops = _xla_flops(compiled)
  return {"suite": suite, "batch": batch, "dtype": dtype, "images_per_s": ips,
          "median_s": median, "s_per_image": median / batch,
          "cpu_s_per_image": statistics.median(timing["cpu_times_s"]) / batch,
          "compile_s": compile_s, "mfu": mfu(ips, suite, dtype, info, full_size),
          "achieved_tflops": ips * _FLOPS[suite] / 1e12 if full_size else None,
          "model_flops_per_image": _FLOPS[suite] if full_size else None,
          "xla_flops_per_image": xla_flops / batch if xla_flops else None,
          "memory": _memory_report(compiled),
          "iters": len(timing["times_s"]), "times_s": timing["times_s"],
          "load_before": load_before, "load_after": load_average()}


# ------------------------------------------------------------------------------------------------
# JAX measurements
# ------------------------------------------------------------------------------------------------

def resolve_microbatch(microbatch: Optional[int], backend: Optional[str] = None) -> int:
  """None ("auto") -> 1 on CPU, 0 (the whole batch at once) on GPU/TPU; explicit values pass.

  On CPU the full-resolution VAE activations of one image (256x256x128 float32 = 32 MiB) about
  fill the last-level cache; a batch of 4 does not, and every unfused GroupNorm/SiLU/add pass
  then streams from DRAM: measured ~7.5 CPU-s per image at batch 4 vs ~5.7 with the batch
  mapped one image at a time inside the same jitted call. Accelerators want the whole batch.
  """
  if microbatch is not None:
    return microbatch
  return 1 if (backend or jax.default_backend()) == "cpu" else 0


def map_microbatches(fn: Callable[..., jax.Array], microbatch: int,
                     *batched: jax.Array) -> jax.Array:
  """fn over the leading axis in sequential chunks of `microbatch` (0: one call), in-graph.

  A `lax.map`, so it stays one compiled call; the batch must divide into whole chunks.
  """
  batch = batched[0].shape[0]
  if not microbatch or microbatch >= batch:
    return fn(*batched)
  if batch % microbatch:
    raise ValueError(f"batch {batch} is not a multiple of microbatch {microbatch}")
  chunks = [x.reshape(batch // microbatch, microbatch, *x.shape[1:]) for x in batched]
  out = jax.lax.map(lambda xs: fn(*xs), tuple(chunks))
  return out.reshape(batch, *out.shape[2:])


class JaxInference:
  """Compiles single-step inference once per batch size and times it (possibly in rounds)."""

  def __init__(self, config: ml_collections.ConfigDict, dtype: str, seed: int = 0,
               microbatch: Optional[int] = None):
    self.model, self.dtype = build_model(config, dtype)
    self.microbatch = resolve_microbatch(microbatch)
    self.full_size = is_full_size(config)
    params, vae = random_params(self.model, seed)
    if self.dtype != "float32":
      # As the PyTorch baseline (and diffusers pipelines) do for half-precision inference:
      # weights stored in the compute dtype. GroupNorm/softmax still compute in float32.
      cast = lambda x: x.astype(self.dtype)
      params, vae = jax.tree_util.tree_map(cast, params), jax.tree_util.tree_map(cast, vae)
    self.params, self.vae = params, vae
    self.scale_factor = jnp.float32(0.18215)
    self._compiled: Dict[int, Tuple[Any, float, Dict[str, Any]]] = {}

  def _predict(self, params, vae, image, key):
    """predict_step (noise drawn for the whole batch from one key), optionally micro-batched."""
    s = self.model.latent_size
    z_T = jax.random.normal(key, (image.shape[0], s, s, self.model.latent_channels),
                            jnp.float32)
    one = lambda x, z: self.model.predict(params, vae, x, z, self.scale_factor)["prob"]
    return map_microbatches(one, self.microbatch, image, z_T)

  def compile(self, batch: int) -> Tuple[Any, float]:
    """Lower + compile for `batch` (cached); returns (executable, seconds)."""
    if batch not in self._compiled:
      size = self.model.image_size
      image = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
      start = time.perf_counter()
      compiled = jax.jit(self._predict).lower(self.params, self.vae, image,
                                              jax.random.key(0)).compile()
      self._compiled[batch] = (compiled, time.perf_counter() - start, {})
    compiled, seconds, _ = self._compiled[batch]
    return compiled, seconds

  def call(self, batch: int) -> Callable[[], Any]:
    """One inference call at `batch` on a fixed synthetic batch (compiled first if needed)."""
    compiled, _ = self.compile(batch)
    image = jnp.asarray(synthetic_batch(batch, self.model.image_size)["image"])
    key = jax.random.key(2)
    return lambda: compiled(self.params, self.vae, image, key)

  def measure(self, batch: int, warmup: int, iters: int, info: Dict[str, Any]) -> Dict[str, Any]:
    load_before = load_average()
    compiled, compile_s = self.compile(batch)
    timing = _timed(self.call(batch), warmup, iters)
    result = _summary("infer", batch, self.dtype, timing, compiled, compile_s, self.full_size,
                      info, load_before)
    result["microbatch"] = self.microbatch
    return result


class JaxTrain:
  """The compiled train step of sdseg_jax.step on a one-device mesh (per-device throughput)."""

  def __init__(self, config: ml_collections.ConfigDict, dtype: str, seed: int = 0):
    self.config = ml_collections.ConfigDict(config.to_dict())
    self.model, self.dtype = build_model(config, dtype)
    self.full_size = is_full_size(config)
    self.seed = seed
    self.mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
    self._params = random_params(self.model, seed)
    self._compiled: Dict[int, Tuple[Any, float, Any, Any]] = {}

  def compile(self, batch: int):
    """AOT-compiles the real train step for a global batch of `batch` (cached)."""
    if batch in self._compiled:
      return self._compiled[batch]
    config = ml_collections.ConfigDict(self.config.to_dict())
    config.train.global_batch_size = batch
    config.model.compute_dtype = self.dtype
    tx = optim.make_optimizer(config)
    mesh = self.mesh
    params, vae = self._params
    vae_sh = jax.tree_util.tree_map(lambda _: sharding_lib.replicated(mesh), vae)
    create = lambda p, s: state_lib.create(p, tx, jax.random.key(self.seed + 7), s)
    abstract_state = jax.eval_shape(create, params, jnp.float32(1))
    state_sh = sharding_lib.param_shardings(abstract_state, mesh, "dp")
    with_sh = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    abstract_state_sh = jax.tree_util.tree_map(with_sh, abstract_state, state_sh)
    abstract_vae_sh = jax.tree_util.tree_map(with_sh, vae, vae_sh)
    compiled, stats = step_lib.compile_train_step(
        self.model, tx, config, mesh, abstract_state_sh, state_sh, abstract_vae_sh, vae_sh,
        self.model.image_size)
    make_state = jax.jit(create, out_shardings=state_sh)
    self._compiled[batch] = (compiled, stats["compile_seconds"], make_state,
                             jax.device_put(vae, vae_sh))
    return self._compiled[batch]

  def call(self, batch: int) -> Callable[[], Tuple[jax.Array, jax.Array]]:
    """One train step at `batch` per call, on a fresh state (the step donates its input state).

    Returns (step counter, loss) of the step; the state is carried between calls.
    """
    compiled, _, make_state, vae = self.compile(batch)
    state = make_state(self._params[0], jnp.float32(0.18215))
    batch_arrays = sharding_lib.host_batch_to_global(
        synthetic_batch(batch, self.model.image_size), self.mesh)
    holder = {"state": state}

    def step():
      holder["state"], metrics = compiled(holder["state"], batch_arrays, vae)
      return holder["state"].step, metrics["loss"]

    return step

  def measure(self, batch: int, warmup: int, iters: int, info: Dict[str, Any]) -> Dict[str, Any]:
    load_before = load_average()
    compiled, compile_s, _, _ = self.compile(batch)
    step = self.call(batch)
    timing = _timed(step, warmup, iters)
    loss = float(jax.device_get(step()[1]))
    result = _summary("train", batch, self.dtype, timing, compiled, compile_s, self.full_size,
                      info, load_before)
    result["final_loss"] = loss
    del step
    return result


# ------------------------------------------------------------------------------------------------
# PyTorch baseline
# ------------------------------------------------------------------------------------------------

class TorchBaseline:
  """sdseg_jax.benchmark_torch's measurements, with the modules built once per process."""

  def __init__(self, device: Optional[str] = None, threads: int = 0, modules: Any = None):
    """`modules`: prebuilt benchmark_torch.Modules (tests pass small ones); else full size."""
    import diffusers  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top

    from sdseg_jax import benchmark_torch  # pylint: disable=g-import-not-at-top
    diffusers.utils.logging.set_verbosity_error()
    if threads:
      torch.set_num_threads(threads)
    self.torch, self.lib = torch, benchmark_torch
    self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    self.modules = modules or benchmark_torch.build_modules(self.device)
    self.params = benchmark_torch.param_counts(self.modules)
    if modules is None:
      benchmark_torch.check_param_counts(self.params)
    self.version = {"torch": torch.__version__, "diffusers": diffusers.__version__,
                    "threads": torch.get_num_threads(), "device": self.device}

  def measure(self, suite: str, batch: int, dtype: str, warmup: int, iters: int,
              info: Dict[str, Any]) -> Dict[str, Any]:
    load_before = load_average()
    fn = self.lib.measure_inference if suite == "infer" else self.lib.measure_train_step
    cpu_start = time.process_time()
    result = fn(batch, dtype, self.device, warmup, iters, modules=self.modules)
    cpu = time.process_time() - cpu_start
    jax_dtype = {v: k for k, v in _TORCH_NAME.items()}[dtype]
    result.update(
        suite=suite, s_per_image=result["median_s"] / batch,
        # Includes warm-up calls and input set-up: a rough, load-robust cross-check only.
        cpu_s_per_image_incl_warmup=cpu / (warmup + iters) / batch,
        mfu=mfu(result["images_per_s"], suite, jax_dtype, info),
        achieved_tflops=result["images_per_s"] * _FLOPS[suite] / 1e12,
        memory={"peak_bytes": result.pop("peak_mem_bytes"),
                "peak_source": ("torch.cuda.max_memory_allocated()" if self.device != "cpu"
                                else "process peak RSS (ru_maxrss, never reset)")},
        load_before=load_before, load_after=load_average())
    return result

  def release(self):
    if self.device != "cpu":
      self.torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

def _merge_rounds(results: List[Dict[str, Any]]) -> Dict[str, Any]:
  """One entry from several rounds of the same (suite, batch, dtype): median over all times."""
  merged = dict(results[-1])
  times = [t for r in results for t in r["times_s"]]
  median = statistics.median(times)
  merged.update(times_s=times, iters=len(times), median_s=median, rounds=len(results),
                images_per_s=merged["batch"] / median, s_per_image=median / merged["batch"],
                round_images_per_s=[r["images_per_s"] for r in results],
                load_before=results[0]["load_before"])
  if "compile_s" in merged:
    merged["compile_s"] = results[0]["compile_s"]
  if "cpu_s_per_image" in merged:
    merged["cpu_s_per_image"] = statistics.median(r["cpu_s_per_image"] for r in results)
  return merged


def run(config: ml_collections.ConfigDict, suites: Sequence[str], batches: Sequence[int],
        dtypes: Sequence[str], *, warmup: int = 2, iters: int = 5, rounds: int = 1,
        baseline: Optional[str] = None, torch_dtypes: Optional[Sequence[str]] = None,
        torch_device: Optional[str] = None, torch_threads: int = 0, torch_modules: Any = None,
        microbatches: Sequence[Optional[int]] = (None,), command: str = "",
        log: Callable[[str], None] = print,
        partial: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
  """Runs every (suite, batch, dtype) for JAX and the baseline; returns the JSON report.

  The headline figure (top-level "images_per_s" of "jax" and "torch") is the first suite, the
  largest batch and the first dtype (and inference microbatch setting) of each stack.
  `partial`, if given, receives the report so far after every batch size, so a run cut short
  by a time limit still leaves its finished measurements behind.
  """
  info = device_info()
  log(f"device: {info['device_kind']} ({info['platform']}), peak basis: {info['peak_basis']}")
  torch_runner = None
  if baseline == "torch":
    if not is_full_size(config) and torch_modules is None:
      log("warning: the PyTorch baseline is the full-size model, the JAX one is not: the "
          "ratio compares different models")
    torch_runner = TorchBaseline(torch_device, torch_threads, torch_modules)
    if torch_dtypes is None:
      torch_dtypes = ["fp32"] if torch_runner.device == "cpu" else ["fp32", "bf16"]
  elif baseline:
    raise ValueError(f"unknown baseline {baseline!r}; expected 'torch'")
  batches = sorted(set(batches))  # ascending: device peak memory is a process-wide maximum
  jax_results: List[Dict[str, Any]] = []
  torch_results: List[Dict[str, Any]] = []
  for suite in suites:
    variants = [(d, m) for d in dtypes for m in (microbatches if suite == "infer" else [None])]
    for dtype, microbatch in variants:
      if suite == "infer":
        runner = JaxInference(config, dtype, microbatch=microbatch)
      else:
        runner = JaxTrain(config, dtype)
      for batch in batches:
        jax_rounds, torch_rounds = [], {d: [] for d in (torch_dtypes or [])}
        for r in range(rounds):
          res = runner.measure(batch, warmup if r == 0 else min(warmup, 1), iters, info)
          jax_rounds.append(res)
          log(_line("jax", res))
          if torch_runner is not None and (dtype, microbatch) == variants[0]:
            for tdtype in torch_dtypes:
              tres = torch_runner.measure(suite, batch, tdtype,
                                          warmup if r == 0 else min(warmup, 1), iters, info)
              torch_rounds[tdtype].append(tres)
              log(_line("torch", tres))
              torch_runner.release()
        jax_results.append(_merge_rounds(jax_rounds))
        torch_results.extend(_merge_rounds(v) for v in torch_rounds.values() if v)
        if partial is not None:
          partial(dict(_report(jax_results, torch_results, suites, torch_runner, info, command,
                               warmup, iters, rounds, config), complete=False))
      del runner
  return dict(_report(jax_results, torch_results, suites, torch_runner, info, command, warmup,
                      iters, rounds, config), complete=True)


def _report(jax_results, torch_results, suites, torch_runner, info, command, warmup, iters,
            rounds, config) -> Dict[str, Any]:
  """The JSON report of the measurements so far."""
  report = {"jax": _stack_block(jax_results, suites[0], {"jax": jax.__version__}),
            "torch": (_stack_block(torch_results, suites[0], torch_runner.version)
                      if torch_runner is not None else None),
            "device": info, "command": command,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_average_end": load_average(),
            "settings": {"warmup": warmup, "iters": iters, "rounds": rounds,
                         "image_size": config.model.vae.resolution,
                         "xla_flags": os.environ.get("XLA_FLAGS", "")}}
  report["ratios"] = _ratios(jax_results, torch_results)
  head = report["jax"].get("headline")
  report["ratio"] = None
  if report["torch"] and head:
    report["ratio"] = _headline_ratio(report["ratios"], head)
  return report


def _line(stack: str, r: Dict[str, Any]) -> str:
  mem = r.get("memory", {}).get("peak_bytes")
  compile_s = r.get("compile_s")
  return (f"[{stack:5s}] {r['suite']:5s} batch {r['batch']:3d} {r['dtype']:8s} "
          f"{r['images_per_s']:9.3f} img/s  {r['median_s']:8.3f} s/step"
          + (f"  compile {compile_s:6.1f} s" if compile_s is not None else "")
          + (f"  mem {mem / 2**30:6.2f} GiB" if mem else "")
          + f"  load {r.get('load_before')}->{r.get('load_after')}")


def _stack_block(results: List[Dict[str, Any]], suite: str,
                 version: Dict[str, Any]) -> Dict[str, Any]:
  block: Dict[str, Any] = {"images_per_s": None, "headline": None, "version": version,
                           "results": results}
  chosen = [r for r in results if r["suite"] == suite]
  if chosen:
    first = (chosen[0]["dtype"], chosen[0].get("microbatch"))
    best = max((r for r in chosen if (r["dtype"], r.get("microbatch")) == first),
               key=lambda r: r["batch"])
    block["images_per_s"] = best["images_per_s"]
    block["headline"] = {"suite": suite, "batch": best["batch"], "dtype": best["dtype"]}
    if "microbatch" in best:
      block["headline"]["microbatch"] = best["microbatch"]
    block["compile_s"] = best.get("compile_s")
  return block


def _ratios(jax_results, torch_results) -> List[Dict[str, Any]]:
  """JAX / PyTorch images/s for every (suite, batch) measured by both, same dtype first."""
  out = []
  for j in jax_results:
    for t in torch_results:
      if (t["suite"], t["batch"]) == (j["suite"], j["batch"]):
        out.append({"suite": j["suite"], "batch": j["batch"], "jax_dtype": j["dtype"],
                    "jax_microbatch": j.get("microbatch"),
                    "torch_dtype": t["dtype"], "same_dtype": _TORCH_NAME[j["dtype"]] == t["dtype"],
                    "ratio": j["images_per_s"] / t["images_per_s"]})
  return out


def _headline_ratio(ratios, head) -> Optional[float]:
  same = [r for r in ratios if (r["suite"], r["batch"], r["jax_dtype"], r["jax_microbatch"]) ==
          (head["suite"], head["batch"], head["dtype"], head.get("microbatch"))]
  same.sort(key=lambda r: not r["same_dtype"])  # matching precision first
  return same[0]["ratio"] if same else None


def format_table(report: Dict[str, Any]) -> str:
  """A readable summary of a report (also what BENCHMARKS.md tables are copied from)."""
  lines = [f"device: {report['device']['device_kind']} x{report['device']['num_devices']} "
           f"({report['device']['cpu_model']}), jax {report['device']['jax']}"
           + (f", torch {report['torch']['version']['torch']}" if report["torch"] else ""),
           f"MFU basis: {report['device']['peak_basis']}",
           "| stack | suite | batch | dtype | microbatch | img/s | s/img | compile s | "
           "peak mem GiB | MFU | TFLOP/s | load 1m before/after |",
           "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
  for stack in ("jax", "torch"):
    if not report.get(stack):
      continue
    for r in report[stack]["results"]:
      mem = r.get("memory", {}).get("peak_bytes")
      lb, la = r.get("load_before"), r.get("load_after")
      lines.append(
          f"| {stack} | {r['suite']} | {r['batch']} | {r['dtype']} | "
          f"{r.get('microbatch', '-') or 'whole'} | {r['images_per_s']:.3f} | "
          f"{r['s_per_image']:.3f} | "
          + (f"{r['compile_s']:.1f}" if r.get("compile_s") is not None else "-") + " | "
          + (f"{mem / 2**30:.2f}" if mem else "-") + " | "
          + (f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a") + " | "
          + (f"{r['achieved_tflops']:.3f}" if r.get("achieved_tflops") else "-") + " | "
          + f"{lb[0] if lb else '?'} / {la[0] if la else '?'} |")
  for r in report.get("ratios", []):
    mb = r.get("jax_microbatch")
    lines.append(f"JAX/PyTorch {r['suite']} batch {r['batch']} ({r['jax_dtype']}"
                 + (f", microbatch {mb}" if mb else "") + f" vs {r['torch_dtype']}): "
                 f"{r['ratio']:.2f}x")
  return "\n".join(lines)


def _load_config(path: str) -> ml_collections.ConfigDict:
  """get_config() of a config file (configs/X.py, optionally 'file.py:variant')."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  file, _, arg = path.partition(":")
  repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if repo_root not in sys.path:
    sys.path.insert(0, repo_root)  # configs/*.py import `configs.base`
  spec = importlib.util.spec_from_file_location("_benchmark_config", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _csv(cast):
  return lambda s: [cast(x) for x in s.split(",") if x]


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--suite", type=_csv(str), default=["infer"],
                      help="infer, train, or both comma-separated (the first is the headline)")
  parser.add_argument("--batch", type=_csv(int), default=[1, 4], help="e.g. 1,4,32")
  parser.add_argument("--config", default=None, help="config file (default configs/base.py)")
  parser.add_argument("--dtype", type=_csv(str), default=["auto"],
                      help="JAX compute dtype(s): auto (bf16 on GPU/TPU, f32 on CPU), "
                           "float32, bfloat16; comma-separated")
  parser.add_argument("--microbatch", type=_csv(str), default=["auto"],
                      help="inference: images per in-graph chunk; auto (1 on CPU, whole batch "
                           "on GPU/TPU), 0 (whole batch) or N; comma-separated to compare")
  parser.add_argument("--baseline", choices=("torch",), default=None)
  parser.add_argument("--torch-dtype", type=_csv(str), default=None,
                      help="baseline dtypes: fp32, bf16, fp16 (default fp32; fp32,bf16 on GPU)")
  parser.add_argument("--torch-device", default=None, help="default: cuda if available")
  parser.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=1,
                      help="alternate JAX and the baseline this many times (shared machines)")
  parser.add_argument("--json", default=None, help="write the report here")
  args = parser.parse_args(argv)
  for suite in args.suite:
    if suite not in ("infer", "train"):
      parser.error(f"unknown suite {suite!r}")
  config = _load_config(args.config or DEFAULT_CONFIG)
  command = "python -m sdseg_jax.benchmark " + " ".join(
      sys.argv[1:] if argv is None else list(argv))
  def write(report: Dict[str, Any]) -> None:
    if args.json:
      os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
      tmp = args.json + ".tmp"
      with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
      os.replace(tmp, args.json)

  report = run(config, args.suite, args.batch, args.dtype, warmup=args.warmup, iters=args.iters,
               rounds=args.rounds, baseline=args.baseline, torch_dtypes=args.torch_dtype,
               torch_device=args.torch_device, torch_threads=args.torch_threads,
               microbatches=[None if m == "auto" else int(m) for m in args.microbatch],
               command=command, log=functools.partial(print, flush=True), partial=write)
  print(format_table(report), flush=True)
  write(report)
  return report


if __name__ == "__main__":
  main()
