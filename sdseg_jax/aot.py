"""Check a config against a TPU slice or GPU node before paying for it: ahead-of-time compilation.

  python -m sdseg_jax.aot --config configs/refuge.py:v5e8 --topology v5e:2x4 --json out.json
  python -m sdseg_jax.aot --config configs/refuge.py:v5e32 --topology v5e:4x8 --suite train

Runs on a laptop (no accelerator): libtpu (`pip install -r requirements-tpu.txt`) describes the
slice as compile-only devices, and the REAL train step (`step.compile_train_step`, the function
`main` runs) and the single-step inference (`step.predict_step`) are compiled by XLA:TPU for a
mesh over them, with the config's mesh, strategy, global batch and compute dtype. The program is
the SPMD program every host of the pod runs (global arrays over all chips of all hosts), so
shape, sharding and out-of-memory errors show up here instead of on the pod.

Reported per chip and per suite: the compiler's memory plan (arguments, outputs, temporaries,
aliasing, their peak against the chip's HBM; `fits` = peak <= 0.9 x HBM), XLA's FLOP and
byte counts, the collectives of the compiled program, and two step-time ESTIMATES (never
measurements): a roofline bound from the counts and XLA:TPU's own cost model. A suite that does
not fit exits with status 1 and a message naming the suite, its peak and the HBM.
"""

import dataclasses
import functools
import json
import math
import os
import pathlib
import re
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags

from sdseg_jax import multiclass
from sdseg_jax import sharding as sharding_lib
from sdseg_jax import step as step_lib
from sdseg_jax.models import model_config as model_config_lib
from sdseg_jax.models import sdseg

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (as for main).",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "Target, e.g. v5e:2x4 (v5e-8), v5e:4x8, "
                                "v5p:2x2x1, v6e:2x4, v4:2x2x1.")
_SUITE = flags.DEFINE_enum("suite", "both", ["train", "infer", "both"], "What to compile.")
_JSON = flags.DEFINE_string("json", None, "Also write the report as JSON to this file.")
flags.mark_flags_as_required(["config", "topology"])

GIB = 2 ** 30
# Every suite's report has these keys (the JSON schema; `python -m sdseg_jax.aot --help`).
SUITE_KEYS = ("fits", "peak_bytes_per_chip", "argument_bytes_per_chip", "output_bytes_per_chip",
              "alias_bytes_per_chip", "temp_bytes_per_chip", "per_chip_batch", "flops_per_chip",
              "model_flops_per_chip", "bytes_accessed_per_chip", "roofline_step_seconds",
              "xla_optimal_seconds", "estimated_images_per_s_per_chip", "estimated_mfu",
              "collectives", "compile_seconds")
# A suite fits when its peak stays under this share of HBM: the rest is the runtime's own
# reservations, fragmentation and the input pipeline's device buffers.
FIT_FRACTION = 0.9
# Model FLOPs of the official full-size SDSeg at 256x256 (PyTorch FLOP counter: conv, matmul and
# attention at 2 FLOPs per multiply-add; the project's performance figures).
SDSEG_TRAIN_FLOPS_PER_EXAMPLE = 1216.0e9
SDSEG_INFER_FLOPS_PER_IMAGE = 936.8e9
TOPOLOGY_EXAMPLES = ("v5e:2x2", "v5e:2x4", "v5e:4x8", "v5e:16x16", "v4:2x2x1", "v5p:2x2x1",
                     "v5p:4x4x8", "v6e:2x4")


@dataclasses.dataclass(frozen=True)
class Chip:
  """Datasheet figures of one accelerator chip (dense bf16 peak)."""
  name: str
  hbm_bytes: int
  peak_flops: float
  hbm_bytes_per_second: float


# Keyed by jax's `device_kind`. Cloud TPU datasheets; NVIDIA SXM datasheets (dense bf16).
CHIPS: Dict[str, Chip] = {
    "TPU v4": Chip("v4", 32 * GIB, 275e12, 1228e9),
    "TPU v5 lite": Chip("v5e", 16 * GIB, 197e12, 819e9),
    "TPU v5": Chip("v5p", 95 * GIB, 459e12, 2765e9),
    "TPU v6 lite": Chip("v6e", 32 * GIB, 918e12, 1640e9),
    "NVIDIA H100 80GB HBM3": Chip("h100", 80 * 10 ** 9, 989.4e12, 3.35e12),
    "NVIDIA H200": Chip("h200", 141 * 10 ** 9, 989.4e12, 4.8e12),
}


class AotError(ValueError):
  """A target or config that cannot be compiled; the message says why and what to pass."""


# ---- the target ---------------------------------------------------------------------------------
def topology_devices(topology: str) -> List[Any]:
  """Compile-only devices of a TPU slice, e.g. "v5e:2x4" (all hosts' chips)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  # libtpu guards a real chip with a machine-wide lock file; compile-only devices need no
  # guard, and without this two checks (or parallel tests) on one laptop would block each other.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if not re.fullmatch(r"v(4|5e|5p|6e):\d+(x\d+){1,2}", topology):
    raise AotError(f"unknown topology {topology!r}: expected a TPU slice such as "
                   f"{', '.join(TOPOLOGY_EXAMPLES)}")
  try:
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
  except Exception as e:  # libtpu missing, or a shape the chip does not come in
    raise AotError(f"cannot describe TPU topology {topology!r} ({e}); is libtpu installed "
                   f"(pip install -r requirements-tpu.txt)? Examples: "
                   f"{', '.join(TOPOLOGY_EXAMPLES)}") from e


def chip_of(device: Any) -> Chip:
  if device.device_kind not in CHIPS:
    raise AotError(f"no HBM/peak figures for device kind {device.device_kind!r}; known: "
                   f"{sorted(CHIPS)}")
  return CHIPS[device.device_kind]


# ---- what is compiled ----------------------------------------------------------------------------
def _with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


@dataclasses.dataclass
class Program:
  """The model, optimizer and abstract (sharded) inputs, exactly as `train.run` builds them."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  model: sdseg.SDSeg
  tx: Any
  abstract_params: Any
  param_shardings: Any
  abstract_vae: Any
  vae_shardings: Any
  abstract_state: Any
  state_shardings: Any


def build_program(config: ml_collections.ConfigDict, devices: Sequence[Any]) -> Program:
  """Mesh, model and sharded abstract state for `devices`, mirroring `train.run`."""
  platform = devices[0].platform
  with config.unlocked():
    # "auto" resolves for the TARGET's backend, not for the machine that compiles.
    config.model.compute_dtype = sdseg.resolve_compute_dtype(config.model.compute_dtype,
                                                             backend=platform)
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  hosts = len({d.process_index for d in devices})
  gb = config.train.global_batch_size
  if gb % mesh.size or gb % hosts:
    raise AotError(f"config.train.global_batch_size={gb} must be divisible by the number of "
                   f"chips ({mesh.size}) and hosts ({hosts})")
  model = sdseg.build(config.model)
  tx = multiclass.make_optimizer(config)
  layout = sharding_lib.train_layout(model, tx, mesh, config.mesh.strategy)  # as train.run
  return Program(config, mesh, model, tx, layout.params, layout.param_shardings, layout.vae,
                 layout.vae_shardings, layout.state, layout.state_shardings)


def compile_train(program: Program) -> Any:
  """The train step `main` runs, compiled for the target mesh."""
  compiled, _ = step_lib.compile_train_step(
      program.model, program.tx, program.config, program.mesh,
      _with_shardings(program.abstract_state, program.state_shardings), program.state_shardings,
      _with_shardings(program.abstract_vae, program.vae_shardings), program.vae_shardings,
      program.config.data.image_size)
  return compiled


def compile_infer(program: Program) -> Any:
  """Single-step prediction (`step.predict_step`) of a global batch of the training size."""
  mesh, model = program.mesh, program.model
  batch_sh, replicated = sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh)
  gb, size = program.config.train.global_batch_size, program.config.data.image_size
  key = jax.eval_shape(lambda: jax.random.key(0))
  jitted = jax.jit(functools.partial(step_lib.predict_step, model=model),
                   in_shardings=(program.param_shardings, program.vae_shardings, batch_sh,
                                 replicated, replicated),
                   out_shardings=batch_sh)
  return jitted.lower(
      _with_shardings(program.abstract_params, program.param_shardings),
      _with_shardings(program.abstract_vae, program.vae_shardings),
      jax.ShapeDtypeStruct((gb, size, size, 3), jnp.float32, sharding=batch_sh),
      jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated),
      jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)).compile()


# ---- model FLOPs ---------------------------------------------------------------------------------
def _is_official_sdseg(model_cfg: ml_collections.ConfigDict) -> bool:
  """The full-size binary SDSeg at 256x256, whose FLOPs the performance figures count."""
  skip = ("compute_dtype", "precision", "attention_impl")
  ours = {k: v for k, v in model_cfg.to_dict().items() if k not in skip}
  official = {k: v for k, v in model_config_lib.model_config().to_dict().items() if k not in skip}
  return ours == official


def model_flops_per_example(config: ml_collections.ConfigDict, suite: str) -> Dict[str, Any]:
  """Model FLOPs of one example: the analytic count for the official model, else XLA:CPU's
  count of the unpartitioned, unoptimised program at batch 1 (includes elementwise ops)."""
  if _is_official_sdseg(config.model):
    value = SDSEG_TRAIN_FLOPS_PER_EXAMPLE if suite == "train" else SDSEG_INFER_FLOPS_PER_IMAGE
    return {"value": value, "source": "analytic (official SDSeg at 256x256)"}
  local = ml_collections.ConfigDict(config.to_dict())
  local.train.global_batch_size = 1
  local.mesh.data, local.mesh.fsdp, local.mesh.strategy = 1, 1, "dp"
  program = build_program(local, jax.local_devices(backend="cpu")[:1])
  if suite == "train":
    fn = functools.partial(step_lib.train_step, model=program.model, tx=program.tx,
                           config=program.config)
    size = local.data.image_size
    batch = {k: jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32) for k in ("image", "mask")}
    lowered = jax.jit(fn).lower(program.abstract_state, batch, program.abstract_vae)
  else:
    size = local.data.image_size
    key = jax.eval_shape(lambda: jax.random.key(0))
    lowered = jax.jit(functools.partial(step_lib.predict_step, model=program.model)).lower(
        program.abstract_params, program.abstract_vae,
        jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
        jax.ShapeDtypeStruct((), jnp.float32), key)
  return {"value": float(_cost(lowered)["flops"]),
          "source": "XLA:CPU count of the unpartitioned program at batch 1"}


# ---- reading the compiled program ----------------------------------------------------------------
def _cost(stage: Any) -> Dict[str, float]:
  cost = stage.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per device program
    cost = cost[0] if cost else None
  return dict(cost or {})


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_COLLECTIVE_RE = re.compile(
    r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_ARRAY_RE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")


def collectives(hlo_text: str) -> Dict[str, Dict[str, int]]:
  """Count and result bytes of each collective in compiled HLO text (one chip's program).

  Async pairs count once (their -start op). An op inside a loop body counts once, however
  often the loop runs. For async starts other than all-reduce, whose result tuple holds the
  operands and then the results, only the second half is counted.
  """
  out = {name: {"count": 0, "bytes": 0} for name in COLLECTIVES}
  for match in _COLLECTIVE_RE.finditer(hlo_text):
    shape, name, start = match.groups()
    arrays = [_DTYPE_BYTES[d] * math.prod(int(n) for n in dims.split(",") if n)
              for d, dims in _ARRAY_RE.findall(shape) if dims]
    if start and name != "all-reduce":
      arrays = arrays[len(arrays) // 2:]
    out[name]["count"] += 1
    out[name]["bytes"] += sum(arrays)
  return out


def analyse(compiled: Any, *, chip: Chip, num_chips: int, per_chip_batch: float,
            model_flops: Dict[str, Any], compile_seconds: float) -> Dict[str, Any]:
  """The per-chip report of one compiled suite (see the module docstring)."""
  mem = compiled.memory_analysis()
  argument = int(mem.argument_size_in_bytes)
  output = int(mem.output_size_in_bytes)
  alias = int(mem.alias_size_in_bytes)
  temp = int(mem.temp_size_in_bytes)
  code = int(getattr(mem, "generated_code_size_in_bytes", 0))
  peak = argument + output - alias + temp + code
  cost = _cost(compiled)
  hlo = compiled.as_text()
  flops = float(cost.get("flops", 0.0)) if cost else None
  bytes_accessed = float(cost.get("bytes accessed", 0.0)) if cost else None
  model_per_chip = model_flops["value"] * per_chip_batch
  report: Dict[str, Any] = {
      "fits": peak <= FIT_FRACTION * chip.hbm_bytes,
      "peak_bytes_per_chip": peak,
      "argument_bytes_per_chip": argument,
      "output_bytes_per_chip": output,
      "alias_bytes_per_chip": alias,
      "temp_bytes_per_chip": temp,
      "generated_code_bytes_per_chip": code,
      "per_chip_batch": per_chip_batch,
      "flops_per_chip": flops,
      "model_flops_per_chip": model_per_chip,
      "model_flops_source": model_flops["source"],
      "xla_to_model_flops": None if flops is None else flops / model_per_chip,
      "bytes_accessed_per_chip": bytes_accessed,
      "collectives": collectives(hlo),
      "while_loops": len(re.findall(r"\swhile\(", hlo)),
      "compile_seconds": compile_seconds,
  }
  # Estimate 1: roofline. XLA counts a loop body once, so the compute term never goes below the
  # model's FLOPs.
  if flops is None:
    report["roofline_step_seconds"] = model_per_chip / chip.peak_flops
    report["roofline_note"] = ("estimate; no cost analysis from this compiler: compute bound "
                               "of the model FLOPs only")
  else:
    report["roofline_step_seconds"] = max(max(flops, model_per_chip) / chip.peak_flops,
                                          bytes_accessed / chip.hbm_bytes_per_second)
    report["roofline_note"] = ("estimate: max(max(XLA, model) FLOPs / peak, bytes accessed / "
                               "HBM bandwidth)")
  rs = report["roofline_step_seconds"]
  report["estimated_images_per_s_per_chip"] = per_chip_batch / rs
  report["estimated_mfu"] = model_per_chip / (chip.peak_flops * rs)
  # Estimate 2: XLA:TPU's cost model, where it gives a usable (positive) figure.
  optimal = cost.get("optimal_seconds") if cost else None
  if optimal is not None and optimal > 0:
    report["xla_optimal_seconds"] = float(optimal)
    report["xla_optimal_images_per_s_per_chip"] = per_chip_batch / optimal
    report["xla_optimal_mfu"] = model_per_chip / (chip.peak_flops * optimal)
  else:
    report["xla_optimal_seconds"] = None
    report["xla_optimal_note"] = ("not reported by this compiler" if optimal is None else
                                  f"XLA's cost model returned {optimal:.4g} s (not positive): "
                                  f"unusable")
  return report


_OOM_RE = re.compile(r"\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def out_of_memory(message: str, compile_seconds: float) -> Dict[str, Any]:
  """The report of a suite XLA refused to compile because it exceeds HBM.

  XLA:TPU first tries to fit (rematerialisation, memory-space assignment) and then stops with
  RESOURCE_EXHAUSTED and its own figure of what the program needs; that figure is the peak.
  """
  match = _OOM_RE.search(message)
  peak = None if match is None else int(float(match.group(1)) * _UNITS[match.group(2)])
  report: Dict[str, Any] = {key: None for key in SUITE_KEYS}
  report.update(fits=False, peak_bytes_per_chip=peak, compile_seconds=compile_seconds,
                error=message.strip().splitlines()[0][:2000])
  return report


# ---- the command ---------------------------------------------------------------------------------
def run(config: ml_collections.ConfigDict, topology: str, suites: Sequence[str],
        on_suite: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
  """Compiles `suites` for `topology` and returns the JSON-ready report.

  `on_suite(report)` is called after each suite, so that a long full-size compile keeps its
  first suite's figures even if the second is interrupted.
  """
  devices = topology_devices(topology)
  chip = chip_of(devices[0])
  program = build_program(config, devices)
  per_chip_batch = config.train.global_batch_size / len(devices)
  report: Dict[str, Any] = {
      "topology": topology,
      "num_chips": len(devices),
      "num_hosts": len({d.process_index for d in devices}),
      "device_kind": devices[0].device_kind,
      "hbm_bytes_per_chip": chip.hbm_bytes,
      "peak_flops_per_chip": chip.peak_flops,
      "hbm_bytes_per_second_per_chip": chip.hbm_bytes_per_second,
      "fit_fraction": FIT_FRACTION,
      "mesh": dict(program.mesh.shape),
      "strategy": config.mesh.strategy,
      "global_batch_size": config.train.global_batch_size,
      "compute_dtype": config.model.compute_dtype,
      "note": "step times, images/s and MFU are compiler ESTIMATES, not measurements",
  }
  compilers = {"train": compile_train, "infer": compile_infer}
  for suite in suites:
    start = time.perf_counter()
    try:
      compiled = compilers[suite](program)
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      report[suite] = out_of_memory(str(e), time.perf_counter() - start)
    else:
      seconds = time.perf_counter() - start
      report[suite] = analyse(compiled, chip=chip, num_chips=len(devices),
                              per_chip_batch=per_chip_batch,
                              model_flops=model_flops_per_example(config, suite),
                              compile_seconds=seconds)
    if on_suite is not None:
      on_suite(report)
  return report


def summary(report: Dict[str, Any], suites: Sequence[str]) -> str:
  lines = [f"{report['topology']}: {report['num_chips']} x {report['device_kind']} "
           f"({report['num_hosts']} hosts), mesh {report['mesh']}, {report['strategy']}, "
           f"global batch {report['global_batch_size']}, {report['compute_dtype']}"]
  hbm = report["hbm_bytes_per_chip"] / GIB
  for suite in suites:
    r = report[suite]
    if r.get("error"):
      lines.append(f"  {suite}: DOES NOT FIT: {r['error']}")
      continue
    verdict = "fits" if r["fits"] else "DOES NOT FIT"
    optimal = ("n/a" if r["xla_optimal_seconds"] is None
               else f"{r['xla_optimal_seconds'] * 1e3:.1f} ms")
    lines.append(
        f"  {suite}: {verdict}: peak {r['peak_bytes_per_chip'] / GIB:.2f} GiB of {hbm:.1f} GiB "
        f"per chip; XLA {(r['flops_per_chip'] or 0) / 1e12:.2f} TFLOP/chip "
        f"({r['xla_to_model_flops'] or 0:.2f} x model); estimated step "
        f"{r['roofline_step_seconds'] * 1e3:.1f} ms (roofline) / {optimal} (XLA cost model), "
        f"{r['estimated_images_per_s_per_chip']:.1f} img/s/chip, MFU "
        f"{r['estimated_mfu']:.1%} (estimates); compiled in {r['compile_seconds']:.0f} s")
  return "\n".join(lines)


def _write_json(report: Dict[str, Any]) -> None:
  if _JSON.value:
    path = pathlib.Path(_JSON.value)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(path)


def main(argv) -> None:
  del argv
  # The targets are compile-only devices; the local backend only builds abstract shapes.
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_threefry_partitionable", True)
  suites = ("train", "infer") if _SUITE.value == "both" else (_SUITE.value,)
  try:
    report = run(_CONFIG.value, _TOPOLOGY.value, suites, on_suite=_write_json)
  except (AotError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(summary(report, suites))
  hbm = report["hbm_bytes_per_chip"]
  failed = [s for s in suites if not report[s]["fits"]]
  for suite in failed:
    peak = report[suite]["peak_bytes_per_chip"]
    peak_text = "unknown" if peak is None else f"{peak / GIB:.2f} GiB"
    print(f"error: {suite} does not fit: peak {peak_text} per chip > {FIT_FRACTION} x "
          f"{hbm / GIB:.1f} GiB HBM of {report['device_kind']}", file=sys.stderr)
  if failed:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
