"""NVIDIA GPU nodes as compile-only devices, for `python -m sdseg_jax.aot --topology h100:8`.

XLA:GPU compiles for a GPU it is only told about: jax's CUDA plugin (`jax[cuda12]`, about 5 GB,
requirements-gpu-aot.txt) takes a `GpuTargetConfig` (what the GPU reports to CUDA: memory, SMs,
caches, compute capability) and returns compile-only devices, on a machine without a GPU or a
CUDA driver. The target texts of the GPUs we support ship in this folder (`*.txtpb`, each says
where its numbers come from).

Two settings make that possible, and both are set here for the GPU path only, before jax starts
a backend:
  * `JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1`: the plugin otherwise refuses to load without a CUDA
    driver of a matching version;
  * XLA_FLAGS `--xla_gpu_enable_triton_gemm=false --xla_gpu_autotune_level=0`: without a GPU,
    XLA cannot autotune, and its Triton GEMM emitter then stops the full train step with
    "Couldn't find output tile sizes". With them, every matmul goes to cuBLAS with XLA's
    default (untuned) algorithm choice. They change the compiled program, so the memory plan and
    the kernels can differ from a run on a real GPU with default flags; the model's FLOP count
    does not depend on them.
"""

import dataclasses
import importlib.resources
import importlib.util
import os
import re
from typing import Any, Dict, List, Tuple

from sdseg_jax import errors

# One node: GPUs per host (an HGX/DGX H100 or H200 board has 8).
MAX_GPUS_PER_NODE = 8
# Appended to the user's XLA_FLAGS for a compile without a GPU (the module docstring says why).
COMPILE_ONLY_XLA_FLAGS = ("--xla_gpu_enable_triton_gemm=false", "--xla_gpu_autotune_level=0")
INSTALL_HINT = ("pip install -r requirements-gpu-aot.txt  (jax[cuda12]==0.10.2, about 5 GB; "
                "a separate venv is best)")
# The module jax's CUDA 12 PJRT plugin installs (package jax-cuda12-plugin).
CUDA_PLUGIN_MODULE = "jax_plugins.xla_cuda12"


@dataclasses.dataclass(frozen=True)
class Gpu:
  """A supported GPU: its target file in this folder and the memory it reports to CUDA."""
  name: str
  target_file: str
  device_memory_bytes: int  # must equal the file's device_memory_size (tests check)


GPUS = {
    "h100": Gpu("H100 SXM 80GB", "h100_sxm.txtpb", 84_942_979_072),
    "h200": Gpu("H200 SXM 141GB", "h200_sxm.txtpb", 151_397_597_184),
}
EXAMPLES = tuple(f"{gpu}:{count}" for gpu in GPUS for count in (1, 8))


class GpuTargetError(errors.UserFacingError, ValueError):
  """A GPU topology that cannot be described; the message says what to pass or install."""


def looks_like_gpu(topology: str) -> bool:
  """True for "name:count" strings whose name is not a TPU chip (v4, v5e, v5p, v6e, ...)."""
  name, colon, _ = topology.lower().partition(":")
  return bool(colon) and re.fullmatch(r"[a-z][a-z0-9]*", name) is not None and (
      re.fullmatch(r"v\d+[a-z]*", name) is None)


def parse_topology(topology: str) -> Tuple[str, int]:
  """"h100:8" -> ("h100", 8): a GPU we have a target for and 1..8 GPUs of one node."""
  name, _, count_text = topology.partition(":")
  name = name.lower()
  if name not in GPUS:
    raise GpuTargetError(f"unknown GPU {name!r} in topology {topology!r}: known GPUs are "
                         f"{', '.join(sorted(GPUS))}, e.g. {', '.join(EXAMPLES)}")
  if not count_text.isdigit():
    raise GpuTargetError(f"topology {topology!r}: the number of GPUs after the colon must be an "
                         f"integer 1..{MAX_GPUS_PER_NODE}, e.g. {name}:8")
  count = int(count_text)
  if not 1 <= count <= MAX_GPUS_PER_NODE:
    raise GpuTargetError(f"topology {topology!r}: {count} GPUs; one node has 1.."
                         f"{MAX_GPUS_PER_NODE} (multi-node GPU targets are not supported)")
  return name, count


def target_config(name: str) -> str:
  """The GpuTargetConfig text of a supported GPU (a package data file)."""
  return (importlib.resources.files(__name__) / GPUS[name].target_file).read_text()


def target_memory_bytes(text: str) -> int:
  """`device_memory_size` of a target text: what the compiler plans the memory against."""
  match = re.search(r"^\s*device_memory_size:\s*(\d+)\s*$", text, re.MULTILINE)
  if match is None:
    raise GpuTargetError("GPU target text has no device_memory_size")
  return int(match.group(1))


def cuda_plugin_installed() -> bool:
  try:
    return importlib.util.find_spec(CUDA_PLUGIN_MODULE) is not None
  except ModuleNotFoundError:  # no jax_plugins namespace at all
    return False


def prepare_environment() -> None:
  """Sets the compile-only environment of the GPU path (the module docstring says why).

  Call before jax starts any backend: XLA reads XLA_FLAGS once per process, and the CUDA
  plugin checks its constraints when it loads. The flags are appended to the user's XLA_FLAGS;
  a flag the user set already is left as the user set it.
  """
  os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
  user = os.environ.get("XLA_FLAGS", "").split()
  user_names = {flag.split("=")[0] for flag in user}
  added = [flag for flag in COMPILE_ONLY_XLA_FLAGS if flag.split("=")[0] not in user_names]
  os.environ["XLA_FLAGS"] = " ".join(user + added)


def devices(topology: str) -> List[Any]:
  """Compile-only devices of one GPU node, e.g. "h100:8" (8 H100 SXM on one host)."""
  name, count = parse_topology(topology)
  if not cuda_plugin_installed():
    raise GpuTargetError(f"topology {topology!r} needs jax's CUDA plugin, which is not "
                         f"installed: {INSTALL_HINT}")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    described = topologies.get_topology_desc(
        "sdseg", "cuda", target_config=target_config(name), topology=f"1x1x{count}")
  except Exception as e:  # a plugin of another jax version, or a target it cannot parse
    raise GpuTargetError(f"jax's CUDA plugin cannot describe {topology!r} from "
                         f"{GPUS[name].target_file} ({e}); {INSTALL_HINT}") from e
  return list(described.devices)


def report_fields(topology: str) -> Dict[str, Any]:
  """What the aot report says about a GPU compile: the target file and the flags in effect."""
  name, _ = parse_topology(topology)
  return {
      "gpu_target_config": f"sdseg_jax/gpu_targets/{GPUS[name].target_file}",
      # Every flag this compile ran with: the user's and the compile-only ones.
      "xla_flags": os.environ.get("XLA_FLAGS", "").split(),
      "xla_flags_note": (f"{' '.join(COMPILE_ONLY_XLA_FLAGS)} are set for compiling without a "
                         f"GPU: no Triton GEMMs and no autotuning, so the memory plan and kernel "
                         f"choice may differ from a real GPU run with default flags; the model "
                         f"FLOPs are unaffected"),
  }
