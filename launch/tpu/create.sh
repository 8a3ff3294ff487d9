#!/usr/bin/env bash
# Creates a Cloud TPU VM (single host or pod slice) for sdseg_jax.
#
# Usage: launch/tpu/create.sh [--name NAME] [--zone ZONE] [--project PROJECT]
#          [--type ACCELERATOR_TYPE] [--version RUNTIME_VERSION] [--spot | --queued] [--dry-run]
#
#   --name     TPU name                      (env TPU_NAME, default sdseg-tpu)
#   --zone     zone offering the type        (env ZONE, default us-west4-a)
#   --project  GCP project                   (env PROJECT, default gcloud's configured project)
#   --type     accelerator type              (env ACCELERATOR_TYPE, default v5litepod-16 = 4 hosts)
#   --version  TPU runtime image             (env RUNTIME_VERSION, default v2-alpha-tpuv5-lite)
#   --spot     spot (preemptible) VM through a queued resource: waits for capacity, may be
#              reclaimed at any time, so keep the workdir on GCS and rely on auto-resume
#   --queued   on-demand capacity through a queued resource (waits instead of failing when the
#              zone is out of capacity); the queued resource is named NAME-qr
#   --dry-run  print the gcloud command instead of running it
#
# Then: launch/tpu/setup.sh, launch/tpu/sync.sh, launch/tpu/run.sh (see launch/README.md).
set -euo pipefail
# shellcheck source=launch/tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

mode="direct"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) TPU_NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --type) ACCELERATOR_TYPE="$2"; shift 2 ;;
    --version) RUNTIME_VERSION="$2"; shift 2 ;;
    --spot) mode="spot"; shift ;;
    --queued) mode="queued"; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) print_help "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

mapfile -t scope < <(gcloud_scope)

if [[ "${mode}" == "direct" ]]; then
  # Plain on-demand create: fails immediately when the zone has no capacity.
  run gcloud compute tpus tpu-vm create "${TPU_NAME}" "${scope[@]}" \
    --accelerator-type="${ACCELERATOR_TYPE}" --version="${RUNTIME_VERSION}"
else
  # Queued resource: the request waits in the queue until capacity frees up; the TPU node
  # (named TPU_NAME) appears once the queued resource is ACTIVE.
  extra=()
  if [[ "${mode}" == "spot" ]]; then
    extra+=(--spot)
  fi
  run gcloud compute tpus queued-resources create "${TPU_NAME}-qr" "${scope[@]}" \
    --node-id="${TPU_NAME}" --accelerator-type="${ACCELERATOR_TYPE}" \
    --runtime-version="${RUNTIME_VERSION}" "${extra[@]}"
  echo "Queued. Watch with: gcloud compute tpus queued-resources describe ${TPU_NAME}-qr" \
    "--zone=${ZONE}   (state ACTIVE = ready)"
fi
