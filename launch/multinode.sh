#!/usr/bin/env bash
# Generic multi-process launcher for clusters without Slurm or Cloud TPU auto-detection,
# and for local multi-process CPU runs.
#
# Usage (one call per process, on each host):
#   launch/multinode.sh --coordinator HOST:PORT --num-processes N --process-id I [--] MAIN_ARGS...
#   (or set SDSEG_COORDINATOR_ADDRESS / SDSEG_NUM_PROCESSES / SDSEG_PROCESS_ID, or the generic
#    COORDINATOR_ADDRESS / NUM_PROCESSES / PROCESS_ID, instead of the flags)
# It exports SDSEG_COORDINATOR_ADDRESS, SDSEG_NUM_PROCESSES and SDSEG_PROCESS_ID and execs
#   python -m sdseg_jax.main MAIN_ARGS...
# HOST:PORT is process 0's address and a free port that every process can reach. Each process
# uses all accelerators it can see (restrict with CUDA_VISIBLE_DEVICES or SDSEG_LOCAL_DEVICE_IDS).
#
# Usage (N processes on this machine, CPU only, e.g. CI):
#   launch/multinode.sh --local N [--cpu-devices K] [--log-dir DIR] [--port PORT] [--] MAIN_ARGS...
# Starts N processes on 127.0.0.1, each with K emulated CPU devices (default 2; XLA_FLAGS
# --xla_force_host_platform_device_count=K), writes DIR/process_<i>.log (process 0 is also
# echoed to stdout), waits for all, and exits with the first non-zero exit code; the other
# processes are then stopped (SIGTERM, then SIGKILL) instead of hanging in collectives.
#
# Option parsing stops at the first argument that is not one of the above; everything from there
# on (or after --) goes to sdseg_jax.main, e.g. --config configs/tiny.py --workdir /tmp/run.
# Environment: PYTHON (default python), SDSEG_MAIN_MODULE (default sdseg_jax.main).
set -euo pipefail

usage() {
  sed -n '2,/^[^#]*$/{/^#/s/^# \{0,1\}//p}' "$0"
}

die() {
  echo "multinode.sh: error: $*" >&2
  exit 2
}

PYTHON="${PYTHON:-python}"
MODULE="${SDSEG_MAIN_MODULE:-sdseg_jax.main}"
coordinator="${SDSEG_COORDINATOR_ADDRESS:-${COORDINATOR_ADDRESS:-}}"
num_processes="${SDSEG_NUM_PROCESSES:-${NUM_PROCESSES:-}}"
process_id="${SDSEG_PROCESS_ID:-${PROCESS_ID:-}}"
local_n=""
cpu_devices=2
log_dir=""
port=""

while [[ $# -gt 0 ]]; do
  case "$1" in
    --coordinator) coordinator="$2"; shift 2 ;;
    --num-processes) num_processes="$2"; shift 2 ;;
    --process-id) process_id="$2"; shift 2 ;;
    --local) local_n="$2"; shift 2 ;;
    --cpu-devices) cpu_devices="$2"; shift 2 ;;
    --log-dir) log_dir="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

# ------------------------------------------------------------------------------------------------
# One process of a multi-host job: validate, export, exec (the exit code is python's own).
# ------------------------------------------------------------------------------------------------
if [[ -z "${local_n}" ]]; then
  missing=()
  [[ -n "${coordinator}" ]] || missing+=(--coordinator)
  [[ -n "${num_processes}" ]] || missing+=(--num-processes)
  [[ -n "${process_id}" ]] || missing+=(--process-id)
  if [[ ${#missing[@]} -gt 0 ]]; then
    die "missing ${missing[*]} (or the SDSEG_* / generic env variables); see --help"
  fi
  [[ "${coordinator}" == *:* ]] || die "--coordinator must be HOST:PORT, got '${coordinator}'"
  if ! { is_uint "${num_processes}" && (( num_processes >= 1 )); }; then
    die "--num-processes must be a positive integer, got '${num_processes}'"
  fi
  if ! { is_uint "${process_id}" && (( process_id < num_processes )); }; then
    die "--process-id must be in [0, ${num_processes}), got '${process_id}'"
  fi
  export SDSEG_COORDINATOR_ADDRESS="${coordinator}"
  export SDSEG_NUM_PROCESSES="${num_processes}"
  export SDSEG_PROCESS_ID="${process_id}"
  exec "${PYTHON}" -m "${MODULE}" "$@"
fi

# ------------------------------------------------------------------------------------------------
# --local N: N CPU processes on this machine.
# ------------------------------------------------------------------------------------------------
if ! { is_uint "${local_n}" && (( local_n >= 1 )); }; then
  die "--local needs a positive process count, got '${local_n}'"
fi
if ! { is_uint "${cpu_devices}" && (( cpu_devices >= 1 )); }; then
  die "--cpu-devices must be a positive integer, got '${cpu_devices}'"
fi
if [[ -z "${port}" ]]; then
  # Ask the kernel for a free port (a tiny race with other programs is acceptable locally).
  port="$("${PYTHON}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
log_dir="${log_dir:-${TMPDIR:-/tmp}/sdseg-local-$(date +%Y%m%d-%H%M%S)-$$}"
mkdir -p "${log_dir}"
echo "multinode.sh: ${local_n} local processes x ${cpu_devices} CPU devices," \
  "coordinator 127.0.0.1:${port}, logs in ${log_dir}" >&2

pids=()
# Stops every child that is still running: TERM first (lets training save a checkpoint).
stop_children() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM "${pid}" 2>/dev/null || true; done
  for _ in $(seq 50); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "${pid}" 2>/dev/null && alive=1; done
    [[ "${alive}" == 0 ]] && return 0
    sleep 0.2
  done
  for pid in "${pids[@]}"; do kill -KILL "${pid}" 2>/dev/null || true; done
}
trap 'echo "multinode.sh: interrupted, stopping processes" >&2; stop_children; exit 130' INT TERM

for ((i = 0; i < local_n; i++)); do
  log="${log_dir}/process_${i}.log"
  # Each process gets its own environment: its id, and its own emulated CPU devices.
  child_env=(
    JAX_PLATFORMS=cpu
    "XLA_FLAGS=${XLA_FLAGS:-} --xla_force_host_platform_device_count=${cpu_devices}"
    "SDSEG_COORDINATOR_ADDRESS=127.0.0.1:${port}"
    "SDSEG_NUM_PROCESSES=${local_n}"
    "SDSEG_PROCESS_ID=${i}"
  )
  if [[ "${i}" == 0 ]]; then
    env "${child_env[@]}" "${PYTHON}" -m "${MODULE}" "$@" > >(tee "${log}") 2>&1 < /dev/null &
  else
    env "${child_env[@]}" "${PYTHON}" -m "${MODULE}" "$@" > "${log}" 2>&1 < /dev/null &
  fi
  pids+=("$!")
done

# Poll rather than `wait -n`, which needs bash >= 5.1 to tell which child ended.
status=0
declare -A done_rc=()
while [[ ${#done_rc[@]} -lt ${local_n} ]]; do
  for ((i = 0; i < local_n; i++)); do
    [[ -n "${done_rc[$i]:-}" ]] && continue
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
      rc=0
      wait "${pids[$i]}" || rc=$?
      done_rc[$i]="${rc}"
      if [[ "${rc}" != 0 && "${status}" == 0 ]]; then
        status="${rc}"
        echo "multinode.sh: process ${i} exited with ${rc}; stopping the others." >&2
        echo "---- last lines of ${log_dir}/process_${i}.log ----" >&2
        tail -n 30 "${log_dir}/process_${i}.log" >&2 || true
        stop_children
      fi
    fi
  done
  [[ ${#done_rc[@]} -lt ${local_n} ]] && sleep 0.2
done
wait  # Let the tee of process 0 flush.

for ((i = 0; i < local_n; i++)); do
  echo "multinode.sh: process ${i} exit code ${done_rc[$i]} (${log_dir}/process_${i}.log)" >&2
done
exit "${status}"
