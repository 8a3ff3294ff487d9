#!/usr/bin/env bash
# Installs the pinned Python environment on every worker of a TPU VM and checks the chips.
#
# Usage: launch/tpu/setup.sh [--name NAME] [--zone ZONE] [--project PROJECT] [--dry-run]
#
# Run launch/tpu/sync.sh first: the install reads requirements.txt from the synced checkout
# (REMOTE_DIR), so every worker gets exactly the same versions. On each worker (--worker=all):
#   1. Python 3.11+ (jax 0.10 needs it; installed with apt when the image lacks it),
#   2. a venv at REMOTE_VENV with `pip install -r requirements.txt "jax[tpu]==<pinned jax>"`,
#   3. a sanity check: sdseg_jax.distributed.initialize() on all workers, printing the process
#      index and local/global device counts (jax.device_count()) per worker.
# On a pod slice the device check runs on all hosts at once, as TPU pods require.
set -euo pipefail
# shellcheck source=launch/tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) TPU_NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) print_help "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

# The jax version comes from the repo's pins so the TPU build matches CPU/GPU machines.
jax_version="$(sed -n 's/^jax==\([0-9.]*\).*/\1/p' "${REPO_ROOT}/requirements.txt")"
[[ -n "${jax_version}" ]] || die "no 'jax==' pin found in ${REPO_ROOT}/requirements.txt"

# The remote script, executed by bash on every worker. Variables prefixed with \$ expand there.
remote_script="
set -euo pipefail
cd ${REMOTE_DIR} || { echo 'no checkout at ${REMOTE_DIR}: run launch/tpu/sync.sh first' >&2; exit 1; }
PY=\$(command -v python3.11 || command -v python3.12 || true)
if [[ -z \"\${PY}\" ]]; then
  sudo apt-get update -q && sudo apt-get install -y -q python3.11 python3.11-venv
  PY=python3.11
fi
[[ -d ${REMOTE_VENV} ]] || \"\${PY}\" -m venv ${REMOTE_VENV}
source ${REMOTE_VENV}/bin/activate
pip install -q --upgrade pip
pip install -q -r requirements.txt 'jax[tpu]==${jax_version}'
# The same start-up path as training (sdseg_jax.distributed), so a broken pod fails here.
SDSEG_TPU_MULTIHOST=1 python - <<'EOF'
import socket
from sdseg_jax import distributed
info = distributed.initialize()
print(f'{socket.gethostname()}: {info}', flush=True)
EOF
"

ssh_all "bash -c $(printf '%q' "${remote_script}")"
