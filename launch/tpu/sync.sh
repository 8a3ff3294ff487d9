#!/usr/bin/env bash
# Puts identical code on every worker of a TPU VM: one pinned commit everywhere.
#
# Usage: launch/tpu/sync.sh [--git | --scp] [--commit REF] [--repo-url URL]
#          [--name NAME] [--zone ZONE] [--project PROJECT] [--dry-run]
#
#   --git       (default) every worker clones/fetches --repo-url and checks out the commit
#               (detached), so all hosts run byte-identical code
#   --scp       no git remote needed: `git archive` of the commit is copied with
#               `gcloud compute tpus tpu-vm scp --worker=all` and unpacked into REMOTE_DIR
#               (uncommitted changes are NOT shipped; commit them first)
#   --commit    what to ship                  (default: local HEAD, resolved to a full hash)
#   --repo-url  git URL the workers can fetch (default: `git remote get-url origin`)
#
# Multi-host JAX requires every process to trace the same program; different code on different
# hosts hangs or fails in collectives, so never edit files on one worker by hand.
set -euo pipefail
# shellcheck source=launch/tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

method="git"
ref="HEAD"
repo_url=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --git) method="git"; shift ;;
    --scp) method="scp"; shift ;;
    --commit) ref="$2"; shift 2 ;;
    --repo-url) repo_url="$2"; shift 2 ;;
    --name) TPU_NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) print_help "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

commit="$(git -C "${REPO_ROOT}" rev-parse --verify "${ref}^{commit}")" \
  || die "cannot resolve commit '${ref}'"
if [[ -n "$(git -C "${REPO_ROOT}" status --porcelain --untracked-files=no)" ]]; then
  echo "warning: uncommitted changes in ${REPO_ROOT} are not shipped (shipping ${commit})" >&2
fi

if [[ "${method}" == "git" ]]; then
  if [[ -z "${repo_url}" ]]; then
    repo_url="$(git -C "${REPO_ROOT}" remote get-url origin 2>/dev/null)" \
      || die "no 'origin' remote: pass --repo-url URL, or use --scp"
  fi
  ssh_all "set -euo pipefail
    if [[ ! -d ${REMOTE_DIR}/.git ]]; then git clone -q $(printf '%q' "${repo_url}") ${REMOTE_DIR}; fi
    cd ${REMOTE_DIR}
    git fetch -q origin
    git checkout -q --detach ${commit}
    echo \"\$(hostname): \$(git rev-parse HEAD)\""
else
  archive="$(mktemp -t sdseg_code.XXXXXX.tar.gz)"
  trap 'rm -f "${archive}"' EXIT
  git -C "${REPO_ROOT}" archive --format=tar.gz -o "${archive}" "${commit}"
  mapfile -t scope < <(gcloud_scope)
  run gcloud compute tpus tpu-vm scp "${archive}" "${TPU_NAME}:/tmp/sdseg_code.tar.gz" \
    "${scope[@]}" --worker=all
  # Unpack into a clean directory so files deleted upstream do not linger on the workers.
  ssh_all "set -euo pipefail
    rm -rf ${REMOTE_DIR}.new && mkdir -p ${REMOTE_DIR}.new
    tar -xzf /tmp/sdseg_code.tar.gz -C ${REMOTE_DIR}.new
    echo ${commit} > ${REMOTE_DIR}.new/COMMIT
    rm -rf ${REMOTE_DIR} && mv ${REMOTE_DIR}.new ${REMOTE_DIR}
    echo \"\$(hostname): ${commit}\""
fi
echo "Synced ${commit} to all workers of ${TPU_NAME} (${REMOTE_DIR})."
