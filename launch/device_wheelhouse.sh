#!/usr/bin/env bash
# The wheels the lent GPU machine lacks, for its Python 3.12, fetched here (that machine has no
# registry access). Downloads exactly the pins of launch/device_wheels.txt (cp312, manylinux
# x86_64, no dependency resolution) into an ignored folder, builds a wheel from the sdist where
# a project publishes none (pure-Python ones only), removes any other wheel there, checks the set
# with launch/device_wheelhouse_check.py (complete together with the image's packages, one
# version each, at most 40 MB) and prints the install line a device command starts with.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/device_wheelhouse.sh [--dest DIR] [--python PYTHON] [--check-only]

Fills DIR (default: .whl, git-ignored) with the cp312 manylinux x86_64 wheels of
launch/device_wheels.txt, checks them against launch/device_image_packages.txt and prints:

  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site

(launch/device_benchmark.sh --wheelhouse .whl runs that line itself.)

  --dest DIR        wheel folder, relative to the repository root (default .whl)
  --python PYTHON   a Python 3 with pip, used to download and check (default python3)
  --check-only      download nothing; only check DIR
  --help            this message
USAGE
}

dest=".whl"
python="python3"
check_only=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dest) dest="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --check-only) check_only=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
pins="launch/device_wheels.txt"
mkdir -p "${dest}"

# pip matches each manylinux platform tag exactly: name every one the pinned wheels use.
platforms=()
for p in manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31 \
         manylinux_2_34 manylinux_2_35 manylinux2014 manylinux1; do
  platforms+=(--platform "${p}_x86_64")
done

have_wheel() {  # have_wheel NAME VERSION: a wheel of exactly that version is in dest
  local stem="${1//-/_}-${2}-"
  compgen -G "${dest}/${stem}*.whl" > /dev/null ||
    compgen -G "${dest}/${stem,,}*.whl" > /dev/null
}

if [[ "${check_only}" == 0 ]]; then
  wanted=()
  while read -r line; do
    spec="${line%%#*}"
    spec="${spec//[[:space:]]/}"
    [[ -z "${spec}" ]] && continue
    wanted+=("${spec}")
    name="${spec%%==*}"
    version="${spec#*==}"
    if have_wheel "${name}" "${version}"; then
      continue
    fi
    echo "fetching ${spec}" >&2
    if ! "${python}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --abi cp312 --abi abi3 --abi none "${platforms[@]}" \
        -d "${dest}" "${spec}" 2> "${dest}/.pip.log"; then
      # No wheel published (e.g. promise, medpy): build one from the sdist; the check below
      # refuses it unless it is pure Python (py3-none-any).
      echo "  no cp312 wheel on the index; building one from the sdist" >&2
      "${python}" -m pip wheel -q --no-deps --no-binary "${name}" -w "${dest}" "${spec}" \
        2>> "${dest}/.pip.log" || { cat "${dest}/.pip.log" >&2; exit 1; }
    fi
  done < "${pins}"
  rm -f "${dest}/.pip.log"
  # Anything else in dest (an older pin, a stray download) would install a second version.
  for wheel in "${dest}"/*.whl; do
    [[ -e "${wheel}" ]] || continue
    base="$(basename "${wheel}")"
    keep=0
    for spec in "${wanted[@]}"; do
      stem="${spec%%==*}"
      stem="${stem//-/_}-${spec#*==}-"
      if [[ "${base,,}" == "${stem,,}"* ]]; then keep=1; break; fi
    done
    if [[ "${keep}" == 0 ]]; then
      echo "removing ${base} (not pinned)" >&2
      rm -f "${wheel}"
    fi
  done
fi

"${python}" launch/device_wheelhouse_check.py --wheels "${dest}" --pins "${pins}" \
  --image launch/device_image_packages.txt --max-mb 40

cat <<LINE
Install line (device command, with carry: ["${dest}"]):
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ${dest}/*.whl && export PYTHONPATH=/tmp/site || exit;
LINE
