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

MFU uses the model FLOPs of docs/performance.md (936.8 GFLOP per inference image, 1216.0 GFLOP
per training example) against a per-device peak: the datasheet dense bf16 or TF32 figure on
GPU/TPU (`bench/machine.py`). On CPU, MFU is n/a: a shared CPU has no stable peak (a matmul peak
measured at start-up gave MFU above 100% minutes later), so achieved TFLOP/s is reported, with
the start-up matmul rate for context. The JSON's device.peak_basis says which applies.

This module is the command line; the work is in `sdseg_jax.bench`: `machine` (device, peaks,
memory), `jax_runners` (the compiled JAX calls and their timing), `torch_runner` (the baseline)
and `report` (the run over batch sizes and rounds, the JSON and the table).
"""

import argparse
import functools
import importlib.util
import json
import os
import sys
from typing import Any, Dict, Optional, Sequence

import ml_collections

from sdseg_jax import errors
from sdseg_jax.bench import report as report_lib

# The benchmark's building blocks under their historical names (benchmark_profile, the tests
# and users' notebooks call them as `benchmark.X`); they live in sdseg_jax.bench.
from sdseg_jax.bench.jax_runners import JaxInference
from sdseg_jax.bench.jax_runners import JaxTrain
from sdseg_jax.bench.jax_runners import build_model
from sdseg_jax.bench.jax_runners import map_microbatches
from sdseg_jax.bench.jax_runners import random_params
from sdseg_jax.bench.jax_runners import resolve_microbatch
from sdseg_jax.bench.jax_runners import synthetic_batch
from sdseg_jax.bench.machine import device_info
from sdseg_jax.bench.machine import is_full_size
from sdseg_jax.bench.machine import mfu
from sdseg_jax.bench.report import format_table
from sdseg_jax.bench.report import run

__all__ = ["DEFAULT_CONFIG", "JaxInference", "JaxTrain", "build_model", "device_info",
           "format_table", "is_full_size", "load_config", "main", "map_microbatches", "mfu",
           "random_params", "resolve_microbatch", "run", "synthetic_batch"]

# The full-size official model (configs/base.py), resolved from the repository root.
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "base.py")


def load_config(path: str) -> ml_collections.ConfigDict:
  """get_config() of a config file (configs/X.py, optionally 'file.py:variant').

  Loaded by file path as `main --config` loads it, so configs that import `configs.base` need
  the repository root as the working directory, as for training.
  """
  file, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location("_benchmark_config", file)
  if spec is None or not os.path.isfile(file):
    raise errors.MissingFileError(f"--config {path}: no such config file")
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
  command = "python -m sdseg_jax.benchmark " + " ".join(
      sys.argv[1:] if argv is None else list(argv))
  def write(report: Dict[str, Any]) -> None:
    if args.json:
      os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
      tmp = args.json + ".tmp"
      with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
      os.replace(tmp, args.json)

  try:
    config = load_config(args.config or DEFAULT_CONFIG)
    report = report_lib.run(
        config, args.suite, args.batch, args.dtype, warmup=args.warmup, iters=args.iters,
        rounds=args.rounds, baseline=args.baseline, torch_dtypes=args.torch_dtype,
        torch_device=args.torch_device, torch_threads=args.torch_threads,
        microbatches=[None if m == "auto" else int(m) for m in args.microbatch],
        command=command, log=functools.partial(print, flush=True), partial=write)
  except errors.UserFacingError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(report_lib.format_table(report), flush=True)
  write(report)
  return report


if __name__ == "__main__":
  main()
