"""The machine and software stack of a benchmark run, and the run's step-by-step record.

`launch/device_benchmark.sh` calls this first, so that the exact versions of a lent machine's
image (JAX, its CUDA plugin, flax, optax, orbax, numpy, torch, diffusers, driver) are on record
even if every later step fails, and again after each step to add that step's outcome:

  python -m sdseg_jax.benchmark_env probe --json summary.json --require-gpu --require-torch
  python -m sdseg_jax.benchmark_env record --json summary.json --step infer_bf16 --rc 0 \
      --limit 140 --wall 97 --output infer_bf16.json

`probe` exits with status 3 and a message naming what is missing when a requirement is not met
(JAX without a GPU backend, torch without CUDA, diffusers absent), before any device time is
spent on compiling.
"""

import argparse
import datetime
import importlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
from typing import Any, Dict, List, Optional, Sequence

# Distributions whose versions a result depends on (absent ones are reported as None).
PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin",
            "jax-cuda12-pjrt", "libtpu", "flax", "optax", "orbax-checkpoint", "chex", "numpy",
            "ml-dtypes", "tensorstore", "scipy", "grain", "ml-collections", "etils", "torch",
            "diffusers", "huggingface-hub", "safetensors", "triton", "nvidia-cudnn-cu13",
            "nvidia-cudnn-cu12", "nvidia-cublas", "nvidia-nccl-cu13")
_NVIDIA_SMI_FIELDS = "name,memory.total,driver_version,clocks.max.sm,clocks.max.mem,power.limit"


def package_versions(names: Sequence[str] = PACKAGES) -> Dict[str, Optional[str]]:
  versions = {}
  for name in names:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def nvidia_smi() -> Optional[List[Dict[str, str]]]:
  """One dict per GPU from nvidia-smi's CSV query, or None where there is no nvidia-smi."""
  exe = shutil.which("nvidia-smi")
  if exe is None:
    return None
  try:
    out = subprocess.run([exe, f"--query-gpu={_NVIDIA_SMI_FIELDS}", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
  except (subprocess.SubprocessError, OSError) as e:
    return [{"error": str(e)}]
  keys = _NVIDIA_SMI_FIELDS.split(",")
  return [dict(zip(keys, (v.strip() for v in line.split(","))))
          for line in out.splitlines() if line.strip()]


def probe(require_gpu: bool, require_torch: bool) -> Dict[str, Any]:
  """The stack; raises SystemExit(3) naming what is missing when a requirement fails."""
  problems = []
  info: Dict[str, Any] = {
      "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "python": sys.version.split()[0], "python_executable": sys.executable,
      "platform": platform.platform(), "hostname": platform.node(), "cpu_count": os.cpu_count(),
      "packages": package_versions(), "nvidia_smi": nvidia_smi(),
      "env": {k: v for k, v in sorted(os.environ.items())
              if k.startswith(("XLA_", "JAX_", "TF_CPP", "CUDA_VISIBLE", "NVIDIA_VISIBLE"))
              or k == "PYTHONPATH"}}
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  info["jax"] = {"backend": jax.default_backend(), "version": jax.__version__,
                 "devices": [f"{d.platform}:{d.id} {d.device_kind}" for d in devices]}
  if require_gpu and jax.default_backend() != "gpu":
    problems.append(f"JAX backend is {jax.default_backend()!r}, not 'gpu' (jax "
                    f"{jax.__version__}; is jax-cuda13-plugin (or jax[cuda12]) installed?)")
  try:
    torch = importlib.import_module("torch")
    info["torch"] = {"version": torch.__version__, "cuda": torch.cuda.is_available(),
                     "device": torch.cuda.get_device_name(0) if torch.cuda.is_available()
                     else None, "cuda_version": torch.version.cuda}
    if require_torch and not torch.cuda.is_available():
      problems.append(f"torch {torch.__version__} sees no CUDA device")
  except ImportError as e:
    info["torch"] = None
    if require_torch:
      problems.append(f"torch is not importable ({e})")
  try:
    importlib.import_module("diffusers")
  except ImportError as e:
    if require_torch:
      problems.append(f"diffusers is not importable ({e}); carry the wheelhouse "
                      "(launch/device_wheelhouse.sh) and pass --wheelhouse")
  info["problems"] = problems
  return info


def _write(path: str, data: Dict[str, Any]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1)
  os.replace(tmp, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("probe", help="record the stack; check requirements")
  p.add_argument("--json", required=True)
  p.add_argument("--require-gpu", action="store_true")
  p.add_argument("--require-torch", action="store_true")
  p.add_argument("--mode", default="", help="the run's mode, recorded (full, quick, dry-run)")
  p.add_argument("--budget", type=int, default=0, help="the run's wall budget (s), recorded")
  r = sub.add_parser("record", help="add one step's outcome to the summary")
  r.add_argument("--json", required=True)
  r.add_argument("--step", required=True)
  r.add_argument("--rc", type=int, required=True)
  r.add_argument("--limit", type=int, required=True)
  r.add_argument("--wall", type=int, required=True)
  r.add_argument("--status", default=None, help="default: from --rc")
  r.add_argument("--output", action="append", default=[], help="files the step wrote")
  args = parser.parse_args(argv)

  if args.command == "probe":
    info = probe(args.require_gpu, args.require_torch)
    summary = {"mode": args.mode, "budget_s": args.budget, "stack": info, "steps": []}
    _write(args.json, summary)
    print(json.dumps({"python": info["python"], "jax": info["jax"],
                      "torch": info["torch"], "nvidia_smi": info["nvidia_smi"],
                      "packages": {k: v for k, v in info["packages"].items() if v}}, indent=1))
    for problem in info["problems"]:
      print(f"error: {problem}", file=sys.stderr)
    return 3 if info["problems"] else 0

  with open(args.json) as f:
    summary = json.load(f)
  status = args.status or {0: "ok", 124: "stopped at its time limit",
                           137: "killed at its time limit"}.get(args.rc, "failed")
  outputs = {}
  for path in args.output:
    if os.path.exists(path):
      try:
        with open(path) as f:
          outputs[os.path.basename(path)] = {"complete": json.load(f).get("complete")}
      except (ValueError, OSError, AttributeError):
        outputs[os.path.basename(path)] = {"complete": None}
    else:
      outputs[os.path.basename(path)] = None
  summary["steps"].append({"step": args.step, "status": status, "rc": args.rc,
                           "limit_s": args.limit, "wall_s": args.wall, "outputs": outputs})
  _write(args.json, summary)
  return 0


if __name__ == "__main__":
  sys.exit(main())
