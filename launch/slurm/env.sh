#!/usr/bin/env bash
# GPU runtime environment for sdseg_jax: NCCL, XLA and memory settings, plus a container hook.
# Sourced by launch/slurm/train.sbatch and launch/local/gpu.sh; edit here for your cluster.
#
# Usage: source launch/slurm/env.sh     (`bash launch/slurm/env.sh --help` prints this help;
#        running it directly does nothing else)
#
# Every variable keeps a value you exported before sourcing. Notable knobs:
#   XLA_PYTHON_CLIENT_MEM_FRACTION  share of GPU memory JAX preallocates (default 0.90; the
#                                   rest is for cuDNN/NCCL workspaces and the data loader)
#   SDSEG_XLA_GPU_FLAGS             extra XLA flags appended to XLA_FLAGS
#   NCCL_DEBUG                      WARN by default; INFO to debug hangs / topology
#   NCCL_SOCKET_IFNAME, NCCL_IB_HCA cluster-specific network selection (unset by default)
#   SDSEG_CONTAINER_IMAGE           run inside a container (NVIDIA JAX-Toolbox image, e.g.
#                                   ghcr.io/nvidia/jax:jax) so CUDA, cuDNN and jaxlib match;
#   SDSEG_CONTAINER_RUNTIME         "pyxis" (srun --container-image, default) or "apptainer"
# After sourcing, SDSEG_SRUN_ARGS (srun flags) and SDSEG_LAUNCH_PREFIX (command prefix) are arrays
# that implement the container hook; both are empty without a container.

# The arrays below are read by the sourcing script, not here.
# shellcheck disable=SC2034
set -euo pipefail

if [[ "${BASH_SOURCE[0]}" == "${0}" ]]; then
  sed -n '2,/^[^#]*$/{/^#/s/^# \{0,1\}//p}' "$0"
  exit 0
fi

# --- Memory: preallocate most of the GPU (fragmentation-free), leave room for workspaces.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"

# --- XLA: overlap collectives with compute (gradient all-reduce behind the backward pass).
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true ${SDSEG_XLA_GPU_FLAGS:-}"

# --- NCCL: quiet by default; network selection is cluster-specific, so only pass through.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# Example for InfiniBand clusters (uncomment and adapt):
#   export NCCL_IB_HCA=mlx5
#   export NCCL_SOCKET_IFNAME=ib0

# --- Optional persistent compilation cache on the shared FS, so requeued jobs and later runs
# skip the multi-minute compile.
if [[ -n "${SDSEG_COMPILATION_CACHE:-}" ]]; then
  export JAX_COMPILATION_CACHE_DIR="${SDSEG_COMPILATION_CACHE}"
fi

# --- Container hook (arrays cannot be exported; they are read by the sourcing script).
SDSEG_SRUN_ARGS=()
SDSEG_LAUNCH_PREFIX=()
if [[ -n "${SDSEG_CONTAINER_IMAGE:-}" ]]; then
  case "${SDSEG_CONTAINER_RUNTIME:-pyxis}" in
    pyxis)
      # enroot/pyxis: srun starts every task inside the image; mount the repo and workdir.
      SDSEG_SRUN_ARGS=(--container-image="${SDSEG_CONTAINER_IMAGE}"
                       --container-mounts="${SDSEG_CONTAINER_MOUNTS:-${PWD}:${PWD}}"
                       --container-workdir="${PWD}")
      ;;
    apptainer)
      SDSEG_LAUNCH_PREFIX=(apptainer exec --nv --bind "${SDSEG_CONTAINER_MOUNTS:-${PWD}}"
                           "${SDSEG_CONTAINER_IMAGE}")
      ;;
    *)
      echo "env.sh: SDSEG_CONTAINER_RUNTIME must be pyxis or apptainer" >&2
      return 1
      ;;
  esac
fi
