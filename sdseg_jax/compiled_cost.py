"""What a compiled program costs on one chip: memory plan, XLA's counts, collectives, estimates.

`aot.py` compiles the train step and inference for a target slice; this module reads the
executables: the compiler's memory plan against the chip's HBM, XLA's FLOP and byte counts, the
collectives in the HLO, and two step-time ESTIMATES (a roofline bound and XLA's cost model).
"""

import dataclasses
import math
import re
from typing import Any, Dict

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

@dataclasses.dataclass(frozen=True)
class Chip:
  """Datasheet figures of one accelerator chip (dense bf16 peak)."""
  name: str
  hbm_bytes: int
  peak_flops: float
  hbm_bytes_per_second: float


# Keyed by jax's `device_kind`. Cloud TPU datasheets; NVIDIA SXM datasheets (dense bf16 peak,
# HBM bandwidth). The GPUs' HBM is what they report to CUDA as total memory, the figure XLA:GPU
# plans against (sdseg_jax/gpu_targets/*.txtpb: 79.1 GiB of the H100's "80GB", 141 GiB H200).
CHIPS: Dict[str, Chip] = {
    "TPU v4": Chip("v4", 32 * GIB, 275e12, 1228e9),
    "TPU v5 lite": Chip("v5e", 16 * GIB, 197e12, 819e9),
    "TPU v5": Chip("v5p", 95 * GIB, 459e12, 2765e9),
    "TPU v6 lite": Chip("v6e", 32 * GIB, 918e12, 1640e9),
    "NVIDIA H100 80GB HBM3": Chip("h100", 84_942_979_072, 989.4e12, 3.35e12),
    "NVIDIA H200": Chip("h200", 151_397_597_184, 989.4e12, 4.8e12),
    # The name XLA's own H200 target spec gives (a target text copied from openxla/xla).
    "NVIDIA H200 141GB HBM3e": Chip("h200", 151_397_597_184, 989.4e12, 4.8e12),
}



def cost_analysis(stage: Any) -> Dict[str, float]:
  """XLA's cost analysis of a lowered or compiled program as one dict (empty if none)."""
  cost = stage.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per device program
    cost = cost[0] if cost else None
  return dict(cost or {})


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_COLLECTIVE_RE = re.compile(
    r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_REMAT_RE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.-]+\.remat\d* = ", re.MULTILINE)
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
  cost = cost_analysis(compiled)
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
      # Instructions XLA recomputed to stay under its memory limit (XLA:GPU: about 76% of the
      # device's memory, BENCHMARKS.md "GPU (H100/H200)"): the step does extra work.
      "rematerialized_instructions": len(_REMAT_RE.findall(hlo)),
      "compile_seconds": compile_seconds,
  }
  # Estimate 1: roofline. XLA counts a loop body once, so the compute term never goes below the
  # model's FLOPs.
  if flops is None:
    # XLA:GPU gives no cost analysis for compile-only devices. What is left: the model's FLOPs
    # at the chip's peak, and the memory plan's arguments and outputs, each of which the step
    # reads or writes at least once (temporaries' traffic is unknown, so not counted).
    report["flops_note"] = report["bytes_accessed_note"] = (
        "not reported: this compiler's cost_analysis() is empty")
    report["roofline_step_seconds"] = max(model_per_chip / chip.peak_flops,
                                          (argument + output) / chip.hbm_bytes_per_second)
    report["roofline_note"] = (
        "estimate without XLA's counts: max(model FLOPs / peak, (argument + output bytes of the "
        "memory plan) / HBM bandwidth); a lower bound on the step time, so images/s is an upper "
        "bound and MFU is 1.0 whenever the model-FLOPs term is the larger")
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
