"""Which attention kernel for SDSeg on TPU? XLA's fused attention vs Pallas flash attention.

  python -m sdseg_jax.bench.tpu_attention --config configs/refuge.py:v5e8 --topology v5e:2x4

Compiles, for ONE chip of the target and the config's per-chip batch, every distinct attention
call of SDSeg's train step and inference (found by tracing them, so the shapes are the model's):
`jax.nn.dot_product_attention` (what `models/attention.py` runs) and the Pallas TPU flash
attention kernel (jax.experimental.pallas.ops.tpu, `pallas_flash` below), forward and
forward+backward, and prints the compiler's FLOPs, bytes accessed, temporaries and a roofline
step-time ESTIMATE per call and summed over the model's calls. Nothing runs: these are compiler
estimates, not measurements.

XLA's cost analysis cannot see inside a Pallas (Mosaic) kernel: it reports the kernel's own
declared cost, so the Pallas rows' FLOPs and bytes are not comparable with XLA's (its backward
kernel declares no more FLOPs than the forward) and the table says so; the temporaries (memory
plan) are comparable. The kernel is not an option of the models: a Mosaic kernel cannot be
partitioned by XLA's SPMD partitioner, so it would need a shard_map in every sharded program.
"""

import collections
import functools
import json
import sys
from typing import Any, Dict, List, Tuple

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from sdseg_jax import aot
from sdseg_jax import compiled_cost
from sdseg_jax import step as step_lib
from sdseg_jax.models import attention

# --config, --topology and --json are sdseg_jax.aot's flags (same meaning; importing aot
# defines them).
FLAGS = flags.FLAGS

Shape = Tuple[int, ...]
KERNELS = ("xla", "pallas")
# The Pallas TPU kernel's default block: q and kv rows per grid step.
PALLAS_BLOCK = 128


def pallas_flash(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v by the Pallas TPU flash-attention kernel, for `attend`'s
  (batch, tokens, heads, head_dim) layout (the kernel's is (batch, heads, tokens, head_dim))."""
  from jax.experimental.pallas.ops.tpu import flash_attention  # pylint: disable=g-import-not-at-top
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)
  out = flash_attention.flash_attention(heads_first(q), heads_first(k), heads_first(v),
                                        sm_scale=q.shape[-1] ** -0.5)
  return heads_first(out)


def kernel_fn(kernel: str):
  return pallas_flash if kernel == "pallas" else functools.partial(
      jax.nn.dot_product_attention, implementation="xla")


def attention_calls(program: aot.Program, per_chip_batch: int) -> Dict[str, collections.Counter]:
  """{"train"/"infer": Counter of (q shape, dtype)} of every `attention.attend` call."""
  calls: Dict[str, collections.Counter] = {}
  original = attention.attend

  def recording(q, k, v, **kw):
    calls[suite][(tuple(q.shape), str(q.dtype))] += 1
    return original(q, k, v, **kw)

  size = program.config.data.image_size
  image = jax.ShapeDtypeStruct((per_chip_batch, size, size, 3), jnp.float32)
  key = jax.eval_shape(lambda: jax.random.key(0))
  attention.attend = recording
  try:
    suite = "train"
    calls[suite] = collections.Counter()
    jax.eval_shape(functools.partial(step_lib.train_step, model=program.model, tx=program.tx,
                                     config=program.config),
                   program.abstract_state, {"image": image, "mask": image}, program.abstract_vae)
    suite = "infer"
    calls[suite] = collections.Counter()
    jax.eval_shape(functools.partial(step_lib.predict_step, model=program.model),
                   program.abstract_params, program.abstract_vae, image,
                   jax.ShapeDtypeStruct((), jnp.float32), key)
  finally:
    attention.attend = original
  return calls


def compile_call(device: Any, chip: compiled_cost.Chip, shape: Shape, dtype: str, kernel: str,
                 backward: bool) -> Dict[str, Any]:
  """Compiler figures of one attention call (forward, or forward + backward) on one chip."""
  mesh = jax.sharding.Mesh([device], ("one",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  x = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding)
  if kernel == "pallas" and shape[1] % PALLAS_BLOCK:
    return {"error": f"not run: {shape[1]} tokens is not a multiple of the kernel's "
                     f"{PALLAS_BLOCK}-row block (the XLA figures are used)"}
  fn = kernel_fn(kernel)
  if backward:
    forward = fn
    fn = jax.grad(lambda q, k, v: jnp.sum(forward(q, k, v).astype(jnp.float32)),
                  argnums=(0, 1, 2))
  try:
    compiled = jax.jit(fn).lower(x, x, x).compile()
  except Exception as e:  # pylint: disable=broad-except
    return {"error": str(e).splitlines()[0][:300]}
  cost = compiled_cost.cost_analysis(compiled)
  flops, nbytes = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  return {"flops": flops, "bytes_accessed": nbytes,
          "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
          "roofline_seconds": max(flops / chip.peak_flops, nbytes / chip.hbm_bytes_per_second)}


def compare(config, topology: str) -> Dict[str, Any]:
  devices = aot.topology_devices(topology)
  chip = aot.device_figures(devices)
  program = aot.build_program(config, devices)
  per_chip = config.train.global_batch_size // len(devices)
  rows: List[Dict[str, Any]] = []
  totals = {(s, k): 0.0 for s in ("train", "infer") for k in KERNELS}
  for suite, calls in attention_calls(program, per_chip).items():
    for (shape, dtype), count in sorted(calls.items()):
      by_kernel = {}
      for kernel in KERNELS:  # "xla" first: the figures used where the kernel cannot run
        figures = compile_call(devices[0], chip, shape, dtype, kernel, backward=suite == "train")
        rows.append({"suite": suite, "q_shape": list(shape), "dtype": dtype, "calls": count,
                     "kernel": kernel, **figures})
        by_kernel[kernel] = figures if "roofline_seconds" in figures else by_kernel["xla"]
        totals[(suite, kernel)] += count * by_kernel[kernel].get("roofline_seconds", 0.0)
  return {"topology": topology, "device_kind": devices[0].device_kind,
          "per_chip_batch": per_chip, "compute_dtype": config.model.compute_dtype,
          "note": ("compiler ESTIMATES; Pallas kernels' FLOPs/bytes are the kernel's declared "
                   "cost (XLA cannot see inside), not comparable with XLA's"),
          "rows": rows,
          "roofline_seconds_summed": {f"{s}/{k}": v for (s, k), v in totals.items()}}


def main(argv) -> None:
  del argv
  jax.config.update("jax_platforms", "cpu")
  try:
    report = compare(FLAGS.config, FLAGS.topology)
  except aot.AotError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"{report['device_kind']}, {report['per_chip_batch']} per chip, "
        f"{report['compute_dtype']} ({report['note']})")
  print(f"{'suite':6} {'q (B, tokens, heads, dim)':28} {'calls':>5} {'kernel':13} "
        f"{'GFLOP':>8} {'MB accessed':>11} {'temp MB':>8} {'roofline ms':>11}")
  for r in report["rows"]:
    if "error" in r:
      print(f"{r['suite']:6} {str(tuple(r['q_shape'])):28} {r['calls']:5} {r['kernel']:13} "
            f"{r['error']}")
      continue
    print(f"{r['suite']:6} {str(tuple(r['q_shape'])):28} {r['calls']:5} {r['kernel']:13} "
          f"{r['flops'] / 1e9:8.2f} {r['bytes_accessed'] / 1e6:11.1f} "
          f"{r['temp_bytes'] / 1e6:8.1f} {r['roofline_seconds'] * 1e3:11.3f}")
  for name, seconds in report["roofline_seconds_summed"].items():
    print(f"sum over the model's calls, {name}: {seconds * 1e3:.2f} ms (estimate)")
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  app.run(main)
