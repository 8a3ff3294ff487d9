#!/usr/bin/env bash
# Starts the same training command on every worker of a TPU VM, detached, one log per worker.
#
# Usage: launch/tpu/run.sh --config CONFIG --workdir gs://BUCKET/PATH [--run-name NAME]
#          [--name NAME] [--zone ZONE] [--project PROJECT] [--allow-local-workdir] [--dry-run]
#          [-- EXTRA MAIN ARGS, e.g. --config.train.max_steps=1000]
#
# Every worker runs, under nohup from REMOTE_DIR with REMOTE_VENV active:
#   python -m sdseg_jax.main --config CONFIG --workdir WORKDIR [EXTRA...]
# with SDSEG_TPU_MULTIHOST=1 so sdseg_jax.distributed joins all hosts of the slice.
# Logs: ~/sdseg_logs/RUN_NAME/<hostname>.log on each worker; the process id is written next to
# it (<hostname>.pid) for launch/tpu/stop.sh. Follow worker 0 with:
#   gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=0 --command='tail -F ~/sdseg_logs/RUN_NAME/*.log'
#
# The workdir must be shared by all hosts (a gs:// bucket): orbax writes one multi-host
# checkpoint into it from every process, and a restart resumes from it automatically.
# Process 0 writes logs and metrics; every process saves and restores checkpoints.
set -euo pipefail
# shellcheck source=launch/tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

config=""
workdir=""
run_name="run-$(date +%Y%m%d-%H%M%S)"
allow_local=0
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) config="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --run-name) run_name="$2"; shift 2 ;;
    --name) TPU_NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --allow-local-workdir) allow_local=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) print_help "$0"; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown argument: $1 (see --help; pass training flags after --)" ;;
  esac
done
[[ -n "${config}" ]] || die "--config is required"
[[ -n "${workdir}" ]] || die "--workdir is required"
if [[ "${workdir}" != gs://* && "${allow_local}" != 1 ]]; then
  die "--workdir must be a gs:// path shared by all workers (got '${workdir}');" \
    "pass --allow-local-workdir for a single-host TPU VM or a shared filesystem mount"
fi

# Shell-quote the python command once here; the remote shell sees exactly these arguments.
main_cmd="$(printf '%q ' python -m sdseg_jax.main --config "${config}" --workdir "${workdir}" \
  "${extra[@]}")"
# Tilde left unexpanded on purpose: it must expand on the worker.
# shellcheck disable=SC2088
log_dir="~/sdseg_logs/${run_name}"

ssh_all "set -euo pipefail
  mkdir -p ${log_dir}
  cd ${REMOTE_DIR}
  source ${REMOTE_VENV}/bin/activate
  log=${log_dir}/\$(hostname).log
  SDSEG_TPU_MULTIHOST=1 nohup ${main_cmd} > \"\${log}\" 2>&1 < /dev/null &
  echo \$! > ${log_dir}/\$(hostname).pid
  echo \"\$(hostname): started pid \$(cat ${log_dir}/\$(hostname).pid), log \${log}\""
echo "Started '${run_name}' on all workers of ${TPU_NAME}. Stop with: launch/tpu/stop.sh --name ${TPU_NAME}"
