#!/usr/bin/env bash
# Mutation testing of the modules where a silent error would corrupt results (issue 14).
#
#   tests/mutation.sh                 # every module below, one after the other
#   tests/mutation.sh diffusion optim # only these (names as in MODULES)
#   tests/mutation.sh --survivors optim
#       after adding tests or changing the module: copies the current tests/ and module into the
#       module's existing scratch copy, runs the mutants of functions whose code changed, and
#       re-runs the surviving ones (every other mutant keeps its status from the full run)
#
# Not part of .ci/run: a full run takes tens of minutes on 2 cores. Needs `pip install
# mutmut==3.8.1` in the active venv (not in requirements.txt) and, for the modules whose tests
# use the official fixtures, ../shared (or SDSEG_SHARED).
#
# Each module is mutated in its own scratch copy of the repository (.mutation/<name>/, ignored by
# git), with a setup.cfg that names the module and ONLY the test files that cover it, so a
# mutant costs seconds. mutmut runs every mutant in a forked child; we fork from mutmut's fork
# server that has imported jax but never touched a device (`process_isolation = forkserver`,
# `forkserver_warmup = import`): forking after XLA has started its thread pools can deadlock, and
# a jit cache inherited from a parent would hide mutants of traced code.
#
# Output: .mutation/<name>/results.txt (every mutant and its status, from `mutmut results
# --all`) and the table .mutation/scores.md (killed / total per module). Functions listed in
# EXCLUDED are left out of the score (dead code due to be deleted).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${SDSEG_MUTATION_DIR:-${repo}/.mutation}"
export SDSEG_SHARED="${SDSEG_SHARED:-$(cd "${repo}/.." && pwd)/shared}"

# name | module file | test files (space separated)
MODULES=(
  "diffusion|sdseg_jax/diffusion.py|tests/test_diffusion.py tests/test_official_parity.py::test_schedule_matches_official"
  "surface_distance|sdseg_jax/surface_distance.py|tests/test_metrics.py tests/test_metric_edges.py"
  "splits|sdseg_jax/data/splits.py|tests/test_splits.py"
  "convert|sdseg_jax/weights/convert.py|tests/test_weights_convert.py"
  "sdseg|sdseg_jax/models/sdseg.py|tests/test_sdseg_model.py"
  "step|sdseg_jax/step.py|tests/test_step_values.py"
  "metrics|sdseg_jax/metrics.py|tests/test_metrics.py tests/test_metric_edges.py"
  "optim|sdseg_jax/optim.py|tests/test_optim.py tests/test_optim_fields.py"
  "transforms|sdseg_jax/data/transforms.py|tests/test_transforms.py"
)
# Dead code that the issue-15 clean-up deletes; not scored (regex on mutmut's mutant names).
EXCLUDED='x_predict_step__mutmut|x_dice_iou_batch__mutmut'

# Writes <dir>/survivors.txt: the diff of every mutant that survived or timed out.
show_survivors() {
  local dir="$1" mutant
  : > "${dir}/survivors.txt"
  for mutant in $(awk '$NF == "survived" || $NF == "timeout" { sub(":", "", $1); print $1 }' \
                  "${dir}/results.txt"); do
    (cd "${dir}" && mutmut show "${mutant}" >> survivors.txt 2>&1)
  done
}

command -v mutmut > /dev/null || { echo "error: mutmut not installed (pip install mutmut==3.8.1)" >&2; exit 1; }
survivors_only=0
if [[ "${1:-}" == "--survivors" ]]; then
  survivors_only=1
  shift
fi
wanted=("$@")
mkdir -p "${work}"
for entry in "${MODULES[@]}"; do
  IFS='|' read -r name module tests <<< "${entry}"
  if (( ${#wanted[@]} )) && [[ " ${wanted[*]} " != *" ${name} "* ]]; then
    continue
  fi
  dir="${work}/${name}"
  if (( survivors_only )); then
    [[ -f "${dir}/results.txt" ]] || { echo "error: no full run of ${name} in ${dir}" >&2; exit 1; }
    mapfile -t names < <(awk '$NF == "survived" || $NF == "timeout" { sub(":", "", $1); print $1 }' \
      "${dir}/results.txt")
    echo "== ${name}: re-running ${#names[@]} surviving mutants with the current tests/"
    rm -rf "${dir}/tests" "${dir}/mutants/tests"
    cp -r "${repo}/tests" "${dir}/tests"
    cp -r "${repo}/tests" "${dir}/mutants/tests"
    # The module as it is now: mutmut re-mutates the functions whose code changed (their old
    # results are dropped) and runs just those mutants; unchanged functions keep their results.
    cp "${repo}/${module}" "${dir}/${module}"
    (cd "${dir}" && nice -n 15 mutmut run --max-children 1 > rerun_changed.log 2>&1) || {
      echo "error: mutmut run failed for ${name}; see ${dir}/rerun_changed.log" >&2; exit 1; }
    if (( ${#names[@]} )); then
      (cd "${dir}" && nice -n 15 mutmut run --max-children 1 "${names[@]}" > rerun.log 2>&1) || {
        echo "error: mutmut re-run failed for ${name}; see ${dir}/rerun.log" >&2; exit 1; }
    fi
    (cd "${dir}" && mutmut results --all true > results.txt)
    show_survivors "${dir}"
    continue
  fi
  rm -rf "${dir}"
  mkdir -p "${dir}"
  cp -r "${repo}/sdseg_jax" "${repo}/configs" "${repo}/tests" "${dir}/"
  printf '%s\n' jax jax.numpy numpy scipy.ndimage flax.linen optax ml_collections pytest \
    > "${dir}/preload.txt"
  {
    echo "[mutmut]"
    echo "source_paths = sdseg_jax"
    echo "only_mutate = ${module}"
    echo "also_copy = configs"
    echo "pytest_add_cli_args_test_selection ="
    for t in ${tests}; do echo "    ${t}"; done
    echo "pytest_add_cli_args ="
    echo "    -p"
    echo "    no:xdist"
    echo "    -p"
    echo "    no:cacheprovider"
    echo "process_isolation = forkserver"
    echo "forkserver_warmup = import"
    echo "preload_modules_file = preload.txt"
    echo "use_git_change_detection = false"
  } > "${dir}/setup.cfg"
  echo "== ${name}: mutating ${module} against: ${tests}"
  start=$(date +%s)
  # One worker, low priority: the machine is shared.
  (cd "${dir}" && nice -n 15 mutmut run --max-children 1 > run.log 2>&1) || {
    echo "error: mutmut run failed for ${name}; see ${dir}/run.log" >&2
    tail -n 30 "${dir}/run.log" >&2
    exit 1
  }
  (cd "${dir}" && mutmut results --all true > results.txt)
  echo "$(( $(date +%s) - start ))" > "${dir}/seconds.txt"
  show_survivors "${dir}"
done

# Score table over every module that has results (raw: killed / total, excluded functions out).
# Timeouts are not counted as killed: check each one (survivors.txt) for a real loop.
{
  echo "| module | mutants | killed | timeout | survived | other | raw score | minutes |"
  echo "|---|---|---|---|---|---|---|---|"
  for entry in "${MODULES[@]}"; do
    IFS='|' read -r name module tests <<< "${entry}"
    results="${work}/${name}/results.txt"
    [[ -f "${results}" ]] || continue
    grep -Ev "${EXCLUDED}" "${results}" | awk -v m="${module}" -v s="$(cat "${work}/${name}/seconds.txt")" '
      /: / { n++; st=$NF; if (st=="killed") k++; else if (st=="timeout") t++;
             else if (st=="survived") sv++; else o++ }
      END { printf "| %s | %d | %d | %d | %d | %d | %.1f%% | %.0f |\n",
            m, n, k, t, sv, o, n ? 100*k/n : 0, s/60 }'
  done
} > "${work}/scores.md"
cat "${work}/scores.md"
