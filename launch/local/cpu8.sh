#!/usr/bin/env bash
# One process on this machine's CPU with 8 emulated devices: exercises the real sharding code
# (an 8-way data-parallel mesh) without accelerators.
#
# Usage: launch/local/cpu8.sh [--config CONFIG] [--workdir DIR] [MAIN ARGS...]
#   --config   default configs/refuge.py:runlocal
#   --workdir  default /tmp/sdseg_cpu8 (rerunning resumes from its checkpoints; delete to restart)
# Other arguments (e.g. --config.train.max_steps=10) go to `python -m sdseg_jax.main` unchanged.
# Environment: PYTHON (default python), CPU_DEVICES (default 8).
set -euo pipefail

config="configs/refuge.py:runlocal"
workdir="/tmp/sdseg_cpu8"
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) config="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^[^#]*$/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    *) extra+=("$1"); shift ;;
  esac
done

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
# XLA reads XLA_FLAGS when the CPU backend starts, so it must be set before python imports jax.
export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${CPU_DEVICES:-8}"
# A stray Slurm/TPU environment must not turn this into a multi-process launch.
export SDSEG_DISTRIBUTED=off
exec "${PYTHON:-python}" -m sdseg_jax.main --config "${config}" --workdir "${workdir}" "${extra[@]}"
