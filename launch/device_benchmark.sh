#!/usr/bin/env bash
# The prepared GPU benchmark: sdseg_jax (JAX) and the PyTorch baseline on ONE GPU, same process
# per suite, full-size SDSeg at 256x256, random weights, synthetic inputs. Writes JSON reports
# (and the console tables) to $OUT, or to the folder given with --out. Budgeted to finish in
# under 8 minutes on one H100: every step has its own time limit and writes its JSON after each
# batch size, so a step cut short still leaves its finished measurements.
#
#   1. inference, bf16:  batch 1, 8, 32, 64   JAX bf16  vs PyTorch bf16 and fp32
#   2. train step, bf16: batch 8, 32          JAX bf16  vs PyTorch bf16 autocast
#   3. inference, fp32:  batch 1, 8, 32, 64   JAX fp32  vs PyTorch fp32 (TF32 convs in both)
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/device_benchmark.sh [--out DIR] [--python PYTHON] [--wheelhouse DIR] [--quick]

Runs sdseg_jax.benchmark on one GPU (JAX and the PyTorch baseline in the same invocation) and
writes gpu_infer_bf16.json, gpu_train_bf16.json, gpu_infer_fp32.json, *.log and nvidia_smi.csv.

  --out DIR         output folder (default: $OUT, else ./benchmark_out)
  --python PYTHON   interpreter with jax[cuda], torch (CUDA) and diffusers (default: python3)
  --wheelhouse DIR  first pip-install requirements.txt + requirements-bench.txt offline from DIR
  --quick           one small batch per suite (a smoke test of the set-up, ~2 minutes)
  --help            this message

Needs: jax with a CUDA backend, torch with CUDA, diffusers (requirements-bench.txt), and the
packages of requirements.txt. Peak numbers for MFU: H100/H200 SXM dense bf16 989.4 TFLOP/s,
TF32 494.7 TFLOP/s (sdseg_jax/benchmark.py).
USAGE
}

out_dir="${OUT:-benchmark_out}"
python="python3"
wheelhouse=""
quick=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out_dir="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --wheelhouse) wheelhouse="$2"; shift 2 ;;
    --quick) quick=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
mkdir -p "${out_dir}"
out_dir="$(cd "${out_dir}" && pwd)"

if [[ -n "${wheelhouse}" ]]; then
  "${python}" -m pip install -q --no-index --find-links "${wheelhouse}" \
    -r requirements.txt -r requirements-bench.txt
fi

# JAX and PyTorch share the GPU inside one process: no JAX pre-allocation, and at most half the
# memory for JAX (the train step at batch 32 in bf16 needs about 22 GiB, performance.md).
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"

"${python}" - <<'PY'
import sys
import jax
import torch
import diffusers  # noqa: F401
if jax.default_backend() != "gpu":
  sys.exit(f"JAX backend is {jax.default_backend()!r}, not gpu: install jax[cuda12]")
if not torch.cuda.is_available():
  sys.exit("torch has no CUDA device: install a CUDA build of torch")
print("jax", jax.__version__, jax.devices()[0].device_kind, "| torch", torch.__version__,
      torch.cuda.get_device_name(0), flush=True)
PY
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit \
  --format=csv > "${out_dir}/nvidia_smi.csv" 2>/dev/null || true
date -u +%Y-%m-%dT%H:%M:%SZ > "${out_dir}/started_utc.txt"

if [[ "${quick}" == 1 ]]; then
  infer_batches="8"; train_batches="8"; limits=(150 200 100)
else
  infer_batches="1,8,32,64"; train_batches="8,32"; limits=(190 160 90)
fi

failed=0
step() {  # step NAME LIMIT_SECONDS BENCHMARK_ARGS...
  local name="$1" limit="$2"
  shift 2
  echo "=== ${name} (limit ${limit} s): $*" >&2
  if ! timeout --kill-after=10 "${limit}" "${python}" -m sdseg_jax.benchmark "$@" \
      --json "${out_dir}/${name}.json" > "${out_dir}/${name}.log" 2>&1; then
    echo "${name}: stopped early or failed (partial JSON kept); see ${out_dir}/${name}.log" >&2
    failed=1
  fi
  grep -E '^\||^JAX/PyTorch' "${out_dir}/${name}.log" >&2 || tail -n 5 "${out_dir}/${name}.log" >&2
}

step gpu_infer_bf16 "${limits[0]}" --suite infer --batch "${infer_batches}" --dtype bfloat16 \
  --baseline torch --torch-dtype bf16,fp32 --warmup 3 --iters 10
step gpu_train_bf16 "${limits[1]}" --suite train --batch "${train_batches}" --dtype bfloat16 \
  --baseline torch --torch-dtype bf16 --warmup 2 --iters 5
step gpu_infer_fp32 "${limits[2]}" --suite infer --batch "${infer_batches}" --dtype float32 \
  --baseline torch --torch-dtype fp32 --warmup 2 --iters 5

echo "reports in ${out_dir}" >&2
exit "${failed}"
