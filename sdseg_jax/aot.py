"""Check a config against a TPU slice or GPU node before paying for it: ahead-of-time compilation.

  python -m sdseg_jax.aot --config configs/refuge.py:v5e8 --topology v5e:2x4 --json out.json
  python -m sdseg_jax.aot --config configs/refuge.py:v5e32 --topology v5e:4x8 --suite train
  python -m sdseg_jax.aot --config configs/refuge.py:v5e8 --topology v5e:4x8 --seeds 4
  python -m sdseg_jax.aot --config configs/refuge.py:h100 --topology h100:1   # XLA:GPU

Runs on a laptop (no accelerator): libtpu (`pip install -r requirements-tpu.txt`) describes the
slice as compile-only devices, and the REAL train step (`step.compile_train_step`, the function
`main` runs) and the single-step inference (`step.predict_step`) are compiled by XLA:TPU for a
mesh over them, with the config's mesh, strategy, global batch and compute dtype. The program is
the SPMD program every host of the pod runs (global arrays over all chips of all hosts), so
shape, sharding and out-of-memory errors show up here instead of on the pod.

GPU nodes (`h100:N`, `h200:N`, 1..8 GPUs of one host) are compiled the same way by XLA:GPU from
jax's CUDA plugin (`pip install -r requirements-gpu-aot.txt`), for the target GPUs described in
sdseg_jax/gpu_targets/. Without a GPU, XLA:GPU needs two flags that change the compiled program
(no Triton GEMMs, no autotuning; the JSON lists them under `xla_flags`), and it gives no cost
analysis, so the GPU step-time estimate is built from the model's FLOPs and the memory plan's
argument and output bytes only (see gpu_targets and compiled_cost.analyse).

Reported per chip and per suite: the compiler's memory plan (arguments, outputs, temporaries,
aliasing, their peak against the chip's HBM; `fits` = peak <= 0.9 x HBM), XLA's FLOP and
byte counts, the collectives of the compiled program, and two step-time ESTIMATES (never
measurements): a roofline bound from the counts and XLA:TPU's own cost model. A suite that does
not fit exits with status 1 and a message naming the suite, its peak and the HBM.

`--seeds K` compiles the train step of K seeds side by side (a reproduction study's layout,
sdseg_jax/seed_lanes.py): K lanes of 1/K of the chips, each with the config's mesh and batch.
"""

import dataclasses
import functools
import json
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

from sdseg_jax import compiled_cost
from sdseg_jax import errors
from sdseg_jax import gpu_targets
from sdseg_jax import optim
from sdseg_jax import sharding as sharding_lib
from sdseg_jax import step as step_lib
from sdseg_jax.bench import machine
from sdseg_jax.models import sdseg

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (as for main).",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "Target, e.g. v5e:2x4 (v5e-8), v5e:4x8, "
                                "v5p:2x2x1, v6e:2x4, v4:2x2x1; GPU nodes h100:8, h200:1 "
                                "(GPU model:GPUs in one node, 1..8).")
_SUITE = flags.DEFINE_enum("suite", "both", ["train", "infer", "both"], "What to compile.")
_JSON = flags.DEFINE_string("json", None, "Also write the report as JSON to this file.")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Seeds trained side by side in one job (the train "
                              "suite's layout under `python -m sdseg_jax.reproduce`).")
flags.mark_flags_as_required(["config", "topology"])

TOPOLOGY_EXAMPLES = ("v5e:2x2", "v5e:2x4", "v5e:4x8", "v5e:16x16", "v4:2x2x1", "v5p:2x2x1",
                     "v5p:4x4x8", "v6e:2x4")


class AotError(errors.UserFacingError, ValueError):
  """A target or config that cannot be compiled; the message says why and what to pass."""


# ---- the target ---------------------------------------------------------------------------------
def topology_devices(topology: str) -> List[Any]:
  """Compile-only devices of a TPU slice, e.g. "v5e:2x4" (all hosts' chips), or of one GPU
  node, e.g. "h100:8" (gpu_targets; `main` prepares its environment first)."""
  if gpu_targets.looks_like_gpu(topology):
    return gpu_targets.devices(topology)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  # libtpu guards a real chip with a machine-wide lock file; compile-only devices need no
  # guard, and without this two checks (or parallel tests) on one laptop would block each other.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if not re.fullmatch(r"v(4|5e|5p|6e):\d+(x\d+){1,2}", topology):
    raise AotError(f"unknown topology {topology!r}: expected a TPU slice such as "
                   f"{', '.join(TOPOLOGY_EXAMPLES)}, or a GPU node such as "
                   f"{', '.join(gpu_targets.EXAMPLES)}")
  try:
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
  except Exception as e:  # libtpu missing, or a shape the chip does not come in
    raise AotError(f"cannot describe TPU topology {topology!r} ({e}); is libtpu installed "
                   f"(pip install -r requirements-tpu.txt)? Examples: "
                   f"{', '.join(TOPOLOGY_EXAMPLES)}") from e


def chip_of(device: Any) -> compiled_cost.Chip:
  """The datasheet figures of a target device (compiled_cost.CHIPS)."""
  if device.device_kind not in compiled_cost.CHIPS:
    raise AotError(f"no HBM/peak figures for device kind {device.device_kind!r}; known: "
                   f"{sorted(compiled_cost.CHIPS)}")
  return compiled_cost.CHIPS[device.device_kind]


def devices_per_chip(devices: Sequence[Any]) -> int:
  """TensorCores that libtpu describes as separate devices of one chip (2 on v4, which its
  compile-only topology does not describe as one megacore device; 1 elsewhere)."""
  coords = getattr(devices[0], "coords", None)
  if coords is None:
    return 1
  return sum(1 for d in devices if getattr(d, "coords", None) == coords)


def device_figures(devices: Sequence[Any]) -> compiled_cost.Chip:
  """The datasheet figures of ONE target device: the chip's, split between its devices."""
  chip, cores = chip_of(devices[0]), devices_per_chip(devices)
  if cores == 1:
    return chip
  return compiled_cost.Chip(f"{chip.name} (one of {cores} TensorCores)", chip.hbm_bytes // cores,
                            chip.peak_flops / cores, chip.hbm_bytes_per_second / cores)


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
  seed_mesh: Optional[jax.sharding.Mesh] = None  # K seed lanes (seed_lanes.run), else None


def build_program(config: ml_collections.ConfigDict, devices: Sequence[Any],
                  seeds: int = 1) -> Program:
  """Mesh, model and sharded abstract state for `devices`, mirroring `train.run` (and, with
  `seeds` > 1, the seed lanes of `seed_lanes.run`)."""
  platform = devices[0].platform
  with config.unlocked():
    # "auto" resolves for the TARGET's backend, not for the machine that compiles.
    config.model.compute_dtype = sdseg.resolve_compute_dtype(config.model.compute_dtype,
                                                             backend=platform)
    kernels = sdseg.resolve_kernels(config.model, backend=platform)
    config.model.norm_impl, config.model.upsample_impl = kernels.norm, kernels.upsample
  seed_mesh = None
  try:
    mesh = sharding_lib.make_mesh(config.mesh, devices)
    if seeds > 1:
      seed_mesh = sharding_lib.make_seed_mesh(config.mesh, seeds, devices)
  except errors.ConfigError as e:
    raise AotError(f"{len(devices)} chips, --seeds {seeds}: {e}") from None
  lane_chips = mesh.size // seeds
  hosts = len({d.process_index for d in devices[:lane_chips]})
  gb = config.train.global_batch_size
  if gb % lane_chips or gb % hosts:
    raise AotError(f"config.train.global_batch_size={gb} must be divisible by the number of "
                   f"chips ({lane_chips}) and hosts ({hosts})"
                   f"{' of each seed lane' if seeds > 1 else ''}")
  model = sdseg.build(config.model)
  tx = optim.make_optimizer(config)
  layout = sharding_lib.train_layout(model, tx, mesh, config.mesh.strategy)  # as train.run
  return Program(config, mesh, model, tx, layout.params, layout.param_shardings, layout.vae,
                 layout.vae_shardings, layout.state, layout.state_shardings, seed_mesh)


def compile_train(program: Program) -> Any:
  """The train step `main` runs (or `seed_lanes.run`'s), compiled for the target mesh."""
  if program.seed_mesh is not None:
    return _compile_seed_lanes(program)
  compiled, _ = step_lib.compile_train_step(
      program.model, program.tx, program.config, program.mesh,
      _with_shardings(program.abstract_state, program.state_shardings), program.state_shardings,
      _with_shardings(program.abstract_vae, program.vae_shardings), program.vae_shardings,
      program.config.data.image_size)
  return compiled


def _compile_seed_lanes(program: Program) -> Any:
  """K lanes: every state leaf behind a leading K axis over "seed", as seed_lanes.run lays it
  out; the VAE is per lane only for the stand-in (no config.init.vae / init.sdseg)."""
  seed_mesh, config = program.seed_mesh, program.config
  seeds = seed_mesh.shape[sharding_lib.SEED_AXIS]
  state_sh = sharding_lib.lane_shardings(program.state_shardings, seed_mesh)
  lanes = lambda tree, sh: jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct((seeds, *x.shape), x.dtype, sharding=s), tree, sh)
  per_lane_vae = not (config.init.get("vae") or config.init.get("sdseg"))
  if per_lane_vae:
    vae_sh = sharding_lib.lane_shardings(program.vae_shardings, seed_mesh)
    abstract_vae = lanes(program.abstract_vae, vae_sh)
  else:
    vae_sh = jax.tree_util.tree_map(lambda _: sharding_lib.replicated(seed_mesh),
                                    program.vae_shardings)
    abstract_vae = _with_shardings(program.abstract_vae, vae_sh)
  compiled, _ = step_lib.compile_train_step(
      program.model, program.tx, config, seed_mesh, lanes(program.abstract_state, state_sh),
      state_sh, abstract_vae, vae_sh, config.data.image_size, num_seeds=seeds,
      per_lane_vae=per_lane_vae)
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
def model_flops_per_example(config: ml_collections.ConfigDict, suite: str) -> Dict[str, Any]:
  """Model FLOPs of one example: the analytic count for the official model, else XLA:CPU's
  count of the unpartitioned, unoptimised program at batch 1 (includes elementwise ops)."""
  if machine.is_full_size(config):  # the benchmark's analytic counts
    return {"value": machine.FLOPS[suite], "source": "analytic (official SDSeg at 256x256)"}
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
  return {"value": float(compiled_cost.cost_analysis(lowered)["flops"]),
          "source": "XLA:CPU count of the unpartitioned program at batch 1"}


# ---- the command ---------------------------------------------------------------------------------
def run(config: ml_collections.ConfigDict, topology: str, suites: Sequence[str],
        on_suite: Optional[Callable[[Dict[str, Any]], None]] = None,
        seeds: int = 1) -> Dict[str, Any]:
  """Compiles `suites` for `topology` and returns the JSON-ready report.

  `on_suite(report)` is called after each suite, so that a long full-size compile keeps its
  first suite's figures even if the second is interrupted. With `seeds` > 1 the train suite is
  K seeds side by side (the inference suite stays one run over all chips, as their evaluation).
  """
  if seeds < 1:
    raise AotError(f"--seeds must be >= 1, got {seeds}")
  devices = topology_devices(topology)
  chip = device_figures(devices)
  program = build_program(config, devices, seeds)
  per_chip_batch = config.train.global_batch_size / len(devices)
  report: Dict[str, Any] = {
      "topology": topology,
      "num_chips": len(devices),
      "num_hosts": len({d.process_index for d in devices}),
      "devices_per_chip": devices_per_chip(devices),
      "device_figures": chip.name,  # "per chip" below means per device where that is a core
      "device_kind": devices[0].device_kind,
      "hbm_bytes_per_chip": chip.hbm_bytes,
      "peak_flops_per_chip": chip.peak_flops,
      "hbm_bytes_per_second_per_chip": chip.hbm_bytes_per_second,
      "fit_fraction": compiled_cost.FIT_FRACTION,
      "mesh": dict(program.mesh.shape),
      "strategy": config.mesh.strategy,
      "global_batch_size": config.train.global_batch_size,
      "compute_dtype": config.model.compute_dtype,
      "use_checkpoint": bool(config.model.unet.get("use_checkpoint", False)),
      "norm_impl": config.model.norm_impl,
      "upsample_impl": config.model.upsample_impl,
      "note": "step times, images/s and MFU are compiler ESTIMATES, not measurements",
  }
  if gpu_targets.looks_like_gpu(topology):
    report.update(gpu_targets.report_fields(topology))
  if seeds > 1:
    report["seed_lanes"] = {"seeds": seeds, "mesh": dict(program.seed_mesh.shape),
                            "chips_per_seed": len(devices) // seeds}
  compilers = {"train": compile_train, "infer": compile_infer}
  for suite in suites:
    start = time.perf_counter()
    try:
      compiled = compilers[suite](program)
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      report[suite] = compiled_cost.out_of_memory(str(e), time.perf_counter() - start)
    else:
      seconds = time.perf_counter() - start
      lane_batch = seeds if suite == "train" else 1  # every lane trains the config's batch
      report[suite] = compiled_cost.analyse(
          compiled, chip=chip, num_chips=len(devices),
          per_chip_batch=per_chip_batch * lane_batch,
          model_flops=model_flops_per_example(config, suite), compile_seconds=seconds)
    if on_suite is not None:
      on_suite(report)
  return report


def summary(report: Dict[str, Any], suites: Sequence[str]) -> str:
  lines = [f"{report['topology']}: {report['num_chips']} x {report['device_kind']} "
           f"({report['num_hosts']} hosts), mesh {report['mesh']}, {report['strategy']}, "
           f"global batch {report['global_batch_size']}, {report['compute_dtype']}"]
  if report.get("devices_per_chip", 1) > 1:
    cores = report["devices_per_chip"]
    lines.append(f"  (each device is one of a chip's {cores} TensorCores: 'per chip' figures "
                 f"below are per TensorCore, with 1/{cores} of the chip's HBM, peak and "
                 f"bandwidth)")
  if "xla_flags" in report:
    lines.append(f"  XLA_FLAGS: {' '.join(report['xla_flags'])} ({report['xla_flags_note']})")
  if "seed_lanes" in report:
    lanes = report["seed_lanes"]
    lines.append(f"  train: {lanes['seeds']} seeds side by side, {lanes['chips_per_seed']} chips "
                 f"each (mesh {lanes['mesh']}), global batch {report['global_batch_size']} "
                 f"per seed")
  hbm = report["hbm_bytes_per_chip"] / compiled_cost.GIB
  for suite in suites:
    r = report[suite]
    if r.get("error"):
      lines.append(f"  {suite}: DOES NOT FIT: {r['error']}")
      continue
    verdict = "fits" if r["fits"] else "DOES NOT FIT"
    optimal = ("n/a" if r["xla_optimal_seconds"] is None
               else f"{r['xla_optimal_seconds'] * 1e3:.1f} ms")
    xla_flops = ("XLA FLOPs n/a (no cost analysis: the roofline uses the model FLOPs and the "
                 "memory plan's argument + output bytes)" if r["flops_per_chip"] is None else
                 f"XLA {r['flops_per_chip'] / 1e12:.2f} TFLOP/chip "
                 f"({r['xla_to_model_flops'] or 0:.2f} x model)")
    lines.append(
        f"  {suite}: {verdict}: peak {r['peak_bytes_per_chip'] / compiled_cost.GIB:.2f} GiB of "
        f"{hbm:.1f} GiB "
        f"per chip; {xla_flops}; estimated step "
        f"{r['roofline_step_seconds'] * 1e3:.1f} ms (roofline) / {optimal} (XLA cost model), "
        f"{r['estimated_images_per_s_per_chip']:.1f} img/s/chip, MFU "
        f"{r['estimated_mfu']:.1%} (estimates); compiled in {r['compile_seconds']:.0f} s")
    if r.get("rematerialized_instructions"):
      lines.append(f"    XLA recomputes {r['rematerialized_instructions']} instructions of {suite} "
                   f"to stay under its memory limit: extra work per step")
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
  if gpu_targets.looks_like_gpu(_TOPOLOGY.value):  # before jax starts any backend
    gpu_targets.prepare_environment()
  # The targets are compile-only devices; the local backend only builds abstract shapes.
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_threefry_partitionable", True)
  suites = ("train", "infer") if _SUITE.value == "both" else (_SUITE.value,)
  try:
    report = run(_CONFIG.value, _TOPOLOGY.value, suites, on_suite=_write_json,
                 seeds=_SEEDS.value)
  except errors.UserFacingError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(summary(report, suites))
  hbm = report["hbm_bytes_per_chip"]
  failed = [s for s in suites if not report[s]["fits"]]
  for suite in failed:
    peak = report[suite]["peak_bytes_per_chip"]
    peak_text = "unknown" if peak is None else f"{peak / compiled_cost.GIB:.2f} GiB"
    print(f"error: {suite} does not fit: peak {peak_text} per chip > "
          f"{compiled_cost.FIT_FRACTION} x {hbm / compiled_cost.GIB:.1f} GiB HBM of "
          f"{report['device_kind']}", file=sys.stderr)
  if failed:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
