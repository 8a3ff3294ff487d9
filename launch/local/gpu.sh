#!/usr/bin/env bash
# One process driving all local GPUs (single node; data parallel over every visible GPU).
#
# Usage: launch/local/gpu.sh --config CONFIG --workdir DIR [MAIN ARGS...]
#   e.g. launch/local/gpu.sh --config configs/refuge.py:gpu8 --workdir /data/runs/refuge
# Restrict the GPUs with CUDA_VISIBLE_DEVICES=0,1 ... . Memory/XLA/NCCL settings and the
# optional container come from launch/slurm/env.sh (SDSEG_CONTAINER_RUNTIME=apptainer only;
# pyxis needs srun). Rerunning with the same --workdir resumes from its latest checkpoint.
# Environment: PYTHON (default python).
set -euo pipefail

if [[ $# -eq 0 || "$1" == "-h" || "$1" == "--help" ]]; then
  sed -n '2,/^[^#]*$/{/^#/s/^# \{0,1\}//p}' "$0"
  [[ $# -eq 0 ]] && exit 2
  exit 0
fi

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
# shellcheck source=launch/slurm/env.sh
source launch/slurm/env.sh
# One process owns every GPU; never join a multi-process job from here (e.g. inside salloc).
export SDSEG_DISTRIBUTED=off
exec "${SDSEG_LAUNCH_PREFIX[@]}" "${PYTHON:-python}" -m sdseg_jax.main "$@"
