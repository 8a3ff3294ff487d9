"""The JAX side of the benchmark: the full model on random weights, compiled once per batch size.

* infer: single-step inference as ONE jitted call: vision encoder -> UNet at t=999 on noise ->
  x0 recovery -> VAE decode -> probability map. images/s = batch / median call time.
* train: the real AOT-compiled train step of `sdseg_jax.step` (frozen-VAE mask encoding,
  vision encoder + UNet forward/backward, AdamW, EMA) on ONE device, so images/s is per device.

Compile time (lower + compile) is reported apart from step time; the step time is the median
over `iters` timed calls after `warmup` untimed ones, blocking on the outputs so that
asynchronous dispatch cannot hide work.
"""

import statistics
import time
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sdseg_jax import errors
from sdseg_jax import inference
from sdseg_jax import optim
from sdseg_jax import sharding as sharding_lib
from sdseg_jax import state as state_lib
from sdseg_jax import step as step_lib
from sdseg_jax.bench import machine
from sdseg_jax.models import sdseg


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


def timed(fn: Callable[[], Any], warmup: int, iters: int) -> Dict[str, Any]:
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


def summary(suite: str, batch: int, dtype: str, timing: Dict[str, Any], compiled: Any,
            compile_s: float, full_size: bool, info: Dict[str, Any],
            load_before: Optional[list]) -> Dict[str, Any]:
  """One JAX measurement as a report entry (see `report.run` for the JSON)."""
  median = statistics.median(timing["times_s"])
  ips = batch / median
  xla_flops = machine.xla_flops(compiled)
  return {"suite": suite, "batch": batch, "dtype": dtype, "images_per_s": ips,
          "median_s": median, "s_per_image": median / batch,
          "cpu_s_per_image": statistics.median(timing["cpu_times_s"]) / batch,
          "compile_s": compile_s, "mfu": machine.mfu(ips, suite, dtype, info, full_size),
          "achieved_tflops": ips * machine.FLOPS[suite] / 1e12 if full_size else None,
          "model_flops_per_image": machine.FLOPS[suite] if full_size else None,
          "xla_flops_per_image": xla_flops / batch if xla_flops else None,
          "memory": machine.memory_report(compiled),
          "iters": len(timing["times_s"]), "times_s": timing["times_s"],
          "load_before": load_before, "load_after": machine.load_average()}


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
    raise errors.ConfigError(f"--batch {batch} is not a multiple of --microbatch {microbatch}")
  chunks = [x.reshape(batch // microbatch, microbatch, *x.shape[1:]) for x in batched]
  out = jax.lax.map(lambda xs: fn(*xs), tuple(chunks))
  return out.reshape(batch, *out.shape[2:])


class JaxInference:
  """Compiles single-step inference once per batch size and times it (possibly in rounds)."""

  def __init__(self, config: ml_collections.ConfigDict, dtype: str, seed: int = 0,
               microbatch: Optional[int] = None):
    self.model, self.dtype = build_model(config, dtype)
    self.microbatch = resolve_microbatch(microbatch)
    self.full_size = machine.is_full_size(config)
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
    z_T = inference.draw_noise(self.model, key, image.shape[0])
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
    load_before = machine.load_average()
    compiled, compile_s = self.compile(batch)
    timing = timed(self.call(batch), warmup, iters)
    result = summary("infer", batch, self.dtype, timing, compiled, compile_s, self.full_size,
                      info, load_before)
    result["microbatch"] = self.microbatch
    return result


class JaxTrain:
  """The compiled train step of sdseg_jax.step on a one-device mesh (per-device throughput)."""

  def __init__(self, config: ml_collections.ConfigDict, dtype: str, seed: int = 0):
    self.config = ml_collections.ConfigDict(config.to_dict())
    self.model, self.dtype = build_model(config, dtype)
    self.full_size = machine.is_full_size(config)
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
    load_before = machine.load_average()
    compiled, compile_s, _, _ = self.compile(batch)
    step = self.call(batch)
    timing = timed(step, warmup, iters)
    loss = float(jax.device_get(step()[1]))
    result = summary("train", batch, self.dtype, timing, compiled, compile_s, self.full_size,
                      info, load_before)
    result["final_loss"] = loss
    del step
    return result

