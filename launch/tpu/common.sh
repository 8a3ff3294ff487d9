#!/usr/bin/env bash
# Shared settings and helpers for launch/tpu/*.sh (sourced, not run).
#
# Every value can be overridden from the environment or by the calling script's flags:
#   TPU_NAME         TPU VM / node name                      (default: sdseg-tpu)
#   ZONE             zone that offers ACCELERATOR_TYPE        (default: us-west4-a)
#   PROJECT          GCP project                              (default: gcloud's configured one)
#   ACCELERATOR_TYPE e.g. v5litepod-8 (1 host), v5litepod-16 (4 hosts), v5p-32, v6e-16
#   RUNTIME_VERSION  TPU software image; must match the generation:
#                      v5e: v2-alpha-tpuv5-lite   v5p: v2-alpha-tpuv5   v6e: v2-alpha-tpuv6e
#                      v4:  tpu-ubuntu2204-base
#   REMOTE_DIR       code checkout on every worker            (default: ~/sdseg_jax)
#   REMOTE_VENV      virtualenv on every worker               (default: ~/sdseg_venv)
#   DRY_RUN=1        print the gcloud commands instead of running them
#
# Usage: source "$(dirname "$0")/common.sh"   (`bash launch/tpu/common.sh --help` prints this)
set -euo pipefail

if [[ "${BASH_SOURCE[0]}" == "${0}" ]]; then
  sed -n '2,/^[^#]*$/{/^#/s/^# \{0,1\}//p}' "$0"
  exit 0
fi

TPU_NAME="${TPU_NAME:-sdseg-tpu}"
ZONE="${ZONE:-us-west4-a}"
PROJECT="${PROJECT:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-16}"
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}"
# Single quotes on purpose: '~' must expand on the worker, not here.
# shellcheck disable=SC2088
REMOTE_DIR="${REMOTE_DIR:-~/sdseg_jax}"
# shellcheck disable=SC2088
REMOTE_VENV="${REMOTE_VENV:-~/sdseg_venv}"
DRY_RUN="${DRY_RUN:-0}"

# The repository this script lives in (launch/tpu/ -> repo root); used by the sourcing scripts.
# shellcheck disable=SC2034
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

# Prints a script's leading comment block (everything after the shebang up to the first line
# that is not a comment) as its --help text.
print_help() {
  sed -n '2,/^[^#]*$/{/^#/s/^# \{0,1\}//p}' "$1"
}

# Runs a command, or prints it (shell-quoted) when DRY_RUN=1.
run() {
  if [[ "${DRY_RUN}" == "1" ]]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# gcloud flags common to every TPU call.
gcloud_scope() {
  local flags=(--zone="${ZONE}")
  if [[ -n "${PROJECT}" ]]; then
    flags+=(--project="${PROJECT}")
  fi
  printf '%s\n' "${flags[@]}"
}

# Runs one shell command line on every worker of the TPU VM, concurrently.
# --worker=all is what keeps multi-host jobs consistent: every host runs the same thing.
ssh_all() {
  local scope
  mapfile -t scope < <(gcloud_scope)
  run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${scope[@]}" --worker=all --command="$1"
}

die() {
  echo "error: $*" >&2
  exit 1
}
