#!/usr/bin/env bash
# Fills a folder with the wheels that a GPU machine without a package index lacks, for tools/gpu_check.sh
# --wheels DIR. Run it where PyPI can be reached:
#   tools/fill_wheels.sh DIR [NAME[==VERSION] ...]
# Default packages: what the project needs that the lent H100/H200 image lacks (datasets with the two of its
# dependencies not there, dill and multiprocess; imagehash with PyWavelets), each at the version installed here
# when it is, so that both machines run the same. Wheels only, no dependencies resolved (name each one), for the
# GPU machine's Python (PYTHON_VERSION, default 3.12) on x86-64 Linux. gpu_check.sh installs only those whose
# distribution the machine does not already have.
set -euo pipefail
[ $# -ge 1 ] || { sed -n '4p' "$0" >&2; exit 2; }
folder=$1; shift
packages=("$@")
if [ ${#packages[@]} -eq 0 ]; then
  for name in datasets dill multiprocess imagehash PyWavelets; do
    version=$(python3 -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$name")
    packages+=("$name${version:+==$version}")
  done
fi
mkdir -p "$folder"
platforms=()
for platform in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
    manylinux1_x86_64; do
  platforms+=(--platform "$platform")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
  --implementation cp "${platforms[@]}" -d "$folder" "${packages[@]}"
ls -l "$folder"
