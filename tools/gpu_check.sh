#!/usr/bin/env bash
# One command, one run on a GPU machine (<= 8 minutes): installs the wheels shipped in .whl/ (tools/gpu_wheels.sh
# downloads them on a machine with an index), then runs tools/gpu_check.py. JSON under $OUT when set; table last.
#   tools/gpu_check.sh           full run (DINOv2-S/14, batch 64 and 128, 224 and 448)
#   tools/gpu_check.sh --tiny    the same code on a toy model, on any CPU (tests/test_gpu_check.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/flowfeat_site \
    .whl/*.whl
  export PYTHONPATH="/tmp/flowfeat_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# JAX and torch share the card: no 75 % preallocation by JAX.
export XLA_PYTHON_CLIENT_PREALLOCATE=false OMP_WAIT_POLICY=PASSIVE
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,power.draw --format=csv,noheader || true
fi
exec timeout "${GPU_CHECK_TIMEOUT:-470}" "$PYTHON" tools/gpu_check.py "$@"
