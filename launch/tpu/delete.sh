#!/usr/bin/env bash
# Deletes the TPU VM (and its queued resource, if it was created with --spot/--queued).
#
# Usage: launch/tpu/delete.sh [--name NAME] [--zone ZONE] [--project PROJECT] [--queued]
#          [--dry-run]
#
#   --queued   delete the queued resource NAME-qr with --force (this also deletes its TPU node);
#              use it for TPUs made by `create.sh --spot` or `create.sh --queued`
#
# Checkpoints in the gs:// workdir are kept; everything on the workers' disks is lost.
set -euo pipefail
# shellcheck source=launch/tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

queued=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) TPU_NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --queued) queued=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) print_help "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

mapfile -t scope < <(gcloud_scope)
if [[ "${queued}" == 1 ]]; then
  run gcloud compute tpus queued-resources delete "${TPU_NAME}-qr" "${scope[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "${TPU_NAME}" "${scope[@]}" --quiet
fi
