#!/usr/bin/env bash
# Downloads, on a machine with a package index, the wheels the GPU machine lacks (Python 3.12, x86-64 manylinux; it
# has jax[cuda], flax, optax, orbax, transformers, torch, opencv, pillow, absl-py, pyyaml and no index) into .whl/
# (git-ignored), for tools/gpu_check.sh to install there. Default: what gpu_check needs (ml-collections); --train adds
# the record pipeline (grain, array-record and their wheels the machine lacks) for training runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
packages=("ml-collections==1.1.0")
if [[ "${1:-}" == "--train" ]]; then
  packages+=("grain==0.2.18" "array-record==0.8.6" "more-itertools" "dm-tree")
fi
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
mkdir -p .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${packages[@]}"
# What those wheels need in turn (check each against the GPU machine's list, device KINDS.md).
for wheel in .whl/*.whl; do
  echo "$(basename "$wheel"): $(unzip -p "$wheel" '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' |
    sed 's/Requires-Dist: //' | tr '\n' ' ')"
done
du -sh .whl
