#!/usr/bin/env bash
# The prepared GPU benchmark for one lent H100/H200: sdseg_jax (JAX) against the PyTorch baseline
# on ONE GPU, in the same process per suite, full-size SDSeg at 256x256, random weights,
# synthetic inputs; then one profiler trace reduced to its top ops. Budgeted to 9 minutes of
# wall time including compiles: every step has its own time limit (cut to what is left of the
# budget), writes its JSON as soon as it finishes (the benchmark steps after every batch size),
# and its outcome goes into summary.json at once, so a run cut short keeps everything finished.
#
#   probe       (40 s)  versions of the stack, nvidia-smi; stops the run if JAX has no GPU,
#                       torch no CUDA or diffusers is missing
#   smoke       (60 s)  both suites once, configs/tiny.py for JAX (compiles in seconds) and the
#                       full-size baseline at batch 2; stops the run if it fails (not if it
#                       is only slow: then it hits its limit and the run goes on)
#   infer_bf16 (140 s)  inference, batch 1/8/32/64: JAX bf16 vs PyTorch bf16
#   train_bf16 (140 s)  train step at the h100 / h200 preset batches 32 / 64: JAX bf16 vs
#                       PyTorch bf16 autocast
#   profile     (75 s)  jax.profiler trace of 3 train steps + 3 inference calls at batch 32,
#                       bf16, reduced here to the top 30 ops by device time (JSON + CSV)
#   infer_fp32  (85 s)  inference, batch 1/8/32/64: JAX fp32 vs PyTorch fp32 (TF32 convs in both)
#
# Writes at most 8 files (a lent machine returns no more): summary.json, smoke.json,
# infer_bf16.json, train_bf16.json, profile_top_ops.json, profile_top_ops.csv, infer_fp32.json
# and run.log (every step's output).
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/device_benchmark.sh [--out DIR] [--python PYTHON] [--wheelhouse DIR] [--quick]
                                  [--only STEP,...] [--budget SECONDS] [--dry-run]

Runs sdseg_jax.benchmark (JAX and the PyTorch baseline in the same process) and
sdseg_jax.benchmark_profile on one GPU; writes summary.json, smoke.json, infer_bf16.json,
train_bf16.json, profile_top_ops.json, profile_top_ops.csv, infer_fp32.json and run.log.

  --out DIR         output folder (default: $OUT, else ./benchmark_out)
  --python PYTHON   interpreter with jax (CUDA), torch (CUDA) (default: python3)
  --wheelhouse DIR  first install DIR/*.whl (launch/device_wheelhouse.sh) with
                    pip --no-index --no-deps --target into a temporary folder on PYTHONPATH
  --quick           probe, smoke, then batch 8 of each suite and the profile at batch 8
                    (budget 5 minutes); the full run's budget is 9 minutes
  --only STEPS      run only these steps (comma-separated: probe is always run), e.g. a rerun
                    of --only infer_fp32 after a first run that was cut short
  --budget SECONDS  wall budget of the whole run (default 540; --quick 300)
  --dry-run         the same steps on any backend (CPU here) with configs/tiny.py and tiny
                    batches, no GPU/torch requirement and no baseline: tests the script
  --help            this message

Steps and their time limits (s): probe 40, smoke 60, infer_bf16 140, train_bf16 140,
profile 75, infer_fp32 85. A step that fails or hits its limit keeps its partial JSON and the
run goes on; a failed probe or smoke stops the run (exit 1), a smoke cut at its limit does
not. Exit status 1 when any step failed. Peak numbers for MFU: H100/H200 SXM dense bf16
989.4 TFLOP/s, TF32 494.7 TFLOP/s (sdseg_jax/bench/machine.py).
USAGE
}

out_dir="${OUT:-benchmark_out}"
python="python3"
wheelhouse=""
mode="full"
only=""
budget=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out_dir="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --wheelhouse) wheelhouse="$2"; shift 2 ;;
    --quick) mode="quick"; shift ;;
    --dry-run) mode="dry-run"; shift ;;
    --only) only="$2"; shift 2 ;;
    --budget) budget="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

# Paths given relative to the caller's directory, resolved before moving to the repository root.
mkdir -p "${out_dir}"
out_dir="$(cd "${out_dir}" && pwd)"
if [[ -n "${wheelhouse}" ]]; then
  if ! compgen -G "${wheelhouse}/*.whl" > /dev/null; then
    echo "error: no wheels in ${wheelhouse} (run launch/device_wheelhouse.sh here first)" >&2
    exit 2
  fi
  wheelhouse="$(cd "${wheelhouse}" && pwd)"
fi
cd "$(dirname "$0")/.."
work="$(mktemp -d "${TMPDIR:-/tmp}/sdseg_device.XXXXXX")"
trap 'rm -rf "${work}"' EXIT
log="${out_dir}/run.log"
summary="${out_dir}/summary.json"
: > "${log}"

if [[ -n "${wheelhouse}" ]]; then
  "${python}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "${work}/site" "${wheelhouse}"/*.whl
  export PYTHONPATH="${work}/site${PYTHONPATH:+:${PYTHONPATH}}"
fi

# JAX and PyTorch share the GPU inside one process: no JAX pre-allocation, and at most half the
# memory for JAX (the train step at batch 64 in bf16 needs an estimated 37 GiB; BENCHMARKS.md).
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
export PYTHONUNBUFFERED=1
# One persistent compilation cache for the run: the profile step reuses the executables that
# the infer_bf16 and train_bf16 steps compiled at the same batch instead of compiling again.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-${work}/xla_cache}"

# Per-mode settings. The train batches are the per-device presets of configs/base.py:
# h100 = 32 and h200 = 64 (tests/test_device_launch.py keeps them in step).
config_args=()
torch_bf16=(--baseline torch --torch-dtype bf16)
torch_fp32=(--baseline torch --torch-dtype fp32)
probe_args=(--require-gpu --require-torch)
smoke_config=(--config configs/tiny.py)
case "${mode}" in
  full)
    infer_batches="1,8,32,64"; train_batches="32,64"; profile_batch=32
    infer_iters=(--warmup 3 --iters 10); train_iters=(--warmup 2 --iters 5)
    fp32_iters=(--warmup 2 --iters 5)
    limits=(40 60 140 140 75 85); budget="${budget:-540}" ;;
  quick)
    infer_batches="8"; train_batches="8"; profile_batch=8
    infer_iters=(--warmup 2 --iters 5); train_iters=(--warmup 2 --iters 3)
    fp32_iters=(--warmup 1 --iters 3)
    limits=(40 60 60 70 60 0); budget="${budget:-300}" ;;
  dry-run)
    # CPU: the tiny model everywhere, no baseline (the full-size PyTorch model takes minutes
    # on a CPU), no GPU requirement; the limits are generous because CPU compiles are slow.
    # Batch 2 throughout, as the smoke: later steps load its executables from the cache.
    infer_batches="2"; train_batches="2"; profile_batch=2
    infer_iters=(--warmup 1 --iters 1); train_iters=(--warmup 1 --iters 1)
    fp32_iters=(--warmup 1 --iters 1)
    config_args=(--config configs/tiny.py); torch_bf16=(); torch_fp32=(); probe_args=()
    limits=(120 240 240 240 240 240); budget="${budget:-1200}" ;;
esac

selected() {  # selected STEP: the step is part of this run
  [[ -z "${only}" || ",${only}," == *",$1,"* ]]
}

failed=0
record() {  # record STEP RC LIMIT WALL [STATUS] [OUTPUT...]
  local step="$1" rc="$2" limit="$3" wall="$4" status="$5"
  shift 5
  local outputs=()
  local f
  for f in "$@"; do outputs+=(--output "${out_dir}/${f}"); done
  "${python}" -m sdseg_jax.benchmark_env record --json "${summary}" --step "${step}" \
    --rc "${rc}" --limit "${limit}" --wall "${wall}" ${status:+--status "${status}"} \
    "${outputs[@]}" || echo "warning: could not record ${step} in ${summary}" >&2
}

# run_step NAME LIMIT REPORT COMMAND...: runs COMMAND under min(LIMIT, budget left) seconds,
# appends its output to run.log, echoes its result lines, records it with its JSON report. Returns COMMAND's status.
run_step() {
  local name="$1" limit="$2" report="$3"
  shift 3
  local left=$(( budget - SECONDS ))
  if (( left < 15 )); then
    echo "=== ${name}: skipped, the ${budget} s budget is spent" | tee -a "${log}" >&2
    record "${name}" 0 "${limit}" 0 "skipped: budget spent" "${report}"
    failed=1
    return 1
  fi
  (( limit > left )) && limit="${left}"
  echo "=== ${name} (limit ${limit} s, ${left} s of the budget left): $*" | tee -a "${log}" >&2
  local start="${SECONDS}" rc=0
  timeout --kill-after=10 "${limit}" "$@" > "${work}/${name}.log" 2>&1 || rc=$?
  cat "${work}/${name}.log" >> "${log}"
  local wall=$(( SECONDS - start ))
  record "${name}" "${rc}" "${limit}" "${wall}" "" "${report}"
  grep -E '^\||^JAX/PyTorch|^device:|^ *[0-9]+ +[0-9.]+% |busy .* window|^error' \
    "${work}/${name}.log" >&2 || tail -n 5 "${work}/${name}.log" >&2
  if (( rc != 0 )); then
    echo "=== ${name}: exit status ${rc} after ${wall} s (partial output kept)" | tee -a "${log}" >&2
    failed=1
  fi
  return "${rc}"
}

bench=("${python}" -m sdseg_jax.benchmark "${config_args[@]}")

# probe: always; nothing else can work when it fails.
echo "=== probe: ${mode} run, budget ${budget} s, output in ${out_dir}" | tee -a "${log}" >&2
start="${SECONDS}"
rc=0
timeout --kill-after=10 "${limits[0]}" "${python}" -m sdseg_jax.benchmark_env probe \
  --json "${summary}" --mode "${mode}" --budget "${budget}" "${probe_args[@]}" \
  > "${work}/probe.log" 2>&1 || rc=$?
cat "${work}/probe.log" >> "${log}"
cat "${work}/probe.log" >&2
if [[ ! -f "${summary}" ]]; then
  echo "error: the probe wrote no ${summary} (exit status ${rc}); see ${log}" >&2
  exit 1
fi
record probe "${rc}" "${limits[0]}" $(( SECONDS - start )) ""
if (( rc != 0 )); then
  echo "error: the probe failed (exit status ${rc}); nothing else was run" >&2
  exit 1
fi

if selected smoke; then
  rc=0
  run_step smoke "${limits[1]}" "smoke.json" \
    "${python}" -m sdseg_jax.benchmark "${smoke_config[@]}" --suite infer,train --batch 2 \
    --dtype bfloat16 "${torch_bf16[@]}" --warmup 1 --iters 2 --json "${out_dir}/smoke.json" ||
    rc=$?
  if (( rc == 124 || rc == 137 )); then
    # Slow, not broken: a first CUDA/cuDNN initialisation can take long. The measurements
    # have their own limits, so they still run.
    echo "warning: the smoke step hit its time limit; going on with the measurements" >&2
  elif (( rc != 0 )); then
    echo "error: the smoke step failed; the measurements were not started" >&2
    exit 1
  fi
fi

if selected infer_bf16; then
  run_step infer_bf16 "${limits[2]}" "infer_bf16.json" \
    "${bench[@]}" --suite infer --batch "${infer_batches}" --dtype bfloat16 \
    "${torch_bf16[@]}" "${infer_iters[@]}" \
    --json "${out_dir}/infer_bf16.json" || true
fi

if selected train_bf16; then
  run_step train_bf16 "${limits[3]}" "train_bf16.json" \
    "${bench[@]}" --suite train --batch "${train_batches}" --dtype bfloat16 \
    "${torch_bf16[@]}" "${train_iters[@]}" \
    --json "${out_dir}/train_bf16.json" || true
fi

if selected profile; then
  run_step profile "${limits[4]}" "profile_top_ops.json" \
    "${python}" -m sdseg_jax.benchmark_profile "${config_args[@]}" --batch "${profile_batch}" \
    --dtype bfloat16 --steps 3 --top 30 --trace-dir "${work}/trace" \
    --json "${out_dir}/profile_top_ops.json" --csv "${out_dir}/profile_top_ops.csv" || true
fi

if selected infer_fp32 && (( limits[5] > 0 )); then
  run_step infer_fp32 "${limits[5]}" "infer_fp32.json" \
    "${bench[@]}" --suite infer --batch "${infer_batches}" --dtype float32 \
    "${torch_fp32[@]}" "${fp32_iters[@]}" \
    --json "${out_dir}/infer_fp32.json" || true
fi

echo "=== done in ${SECONDS} s (budget ${budget} s); reports in ${out_dir}" | tee -a "${log}" >&2
exit "${failed}"
