#!/usr/bin/env bash
# Stops sdseg_jax jobs on every worker of a TPU VM and frees the TPU chips for the next run.
#
# Usage: launch/tpu/stop.sh [--name NAME] [--zone ZONE] [--project PROJECT] [--grace SECONDS]
#          [--dry-run]
#
# On each worker (--worker=all):
#   1. SIGTERM to every job started by launch/tpu/run.sh (pid files under ~/sdseg_logs), so the
#      training loop can save a checkpoint and exit; SIGKILL after --grace seconds (default 120).
#   2. Kill any remaining process that holds /dev/accel* (TPU v4/v5p) or /dev/vfio/* (v5e/v6e):
#      a crashed or orphaned python keeps the chips busy and the next run fails with
#      "TPU is already in use" / "Unable to initialize backend 'tpu'".
#   3. Remove /tmp/libtpu_lockfile, which a killed process leaves behind.
set -euo pipefail
# shellcheck source=launch/tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

grace=120
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) TPU_NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --grace) grace="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) print_help "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
[[ "${grace}" =~ ^[0-9]+$ ]] || die "--grace must be a number of seconds"

# Runs on each worker. Only processes we started (pid files) get the graceful TERM; the device
# holders found afterwards are by definition stale and are killed. Single quotes on purpose:
# everything expands on the worker, except ${grace}.
# shellcheck disable=SC2016
remote_script='
set -uo pipefail
pids=()
for f in ~/sdseg_logs/*/*.pid; do
  [[ -f "$f" ]] || continue
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid" && pids+=("$pid"); fi
  rm -f "$f"
done
for _ in $(seq '"${grace}"'); do
  alive=0
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
  [[ $alive == 0 ]] && break
  sleep 1
done
for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"; done
holders=$(sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | sort -u || true)
if [[ -z "$holders" ]] && command -v fuser >/dev/null; then
  holders=$(sudo fuser /dev/accel* /dev/vfio/* 2>/dev/null | tr -s " " "\n" | sort -u || true)
fi
for pid in $holders; do
  echo "$(hostname): killing TPU holder $pid ($(ps -o comm= -p "$pid" 2>/dev/null))"
  sudo kill -KILL "$pid" 2>/dev/null || true
done
sudo rm -f /tmp/libtpu_lockfile
echo "$(hostname): TPU free"
'

ssh_all "bash -c $(printf '%q' "${remote_script}")"
