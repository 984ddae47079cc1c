#!/usr/bin/env bash
# Fetch, on a machine with registry access, the wheels the GPU kit's phases import beyond the GPU image
# (which has torch, triton and transformers, and no network) into .whl/ (git-ignored), for the device run
# to carry:  benchmarks/fetch_wheels.sh && <device run, carry [".whl"]> benchmarks/run_gpu.sh
#
# What each phase imports is benchmarks/gpu_phases.py's PHASE_MODULES; run_gpu.sh names a missing one.
#   table, longctx: trl (its fused LM head) and liger-kernel: pure Python, nothing more.
#   trainstep: TRL's GRPOTrainer, which imports accelerate (and psutil) and datasets; datasets imports
#     pyarrow, pandas (with python-dateutil and tzdata), dill, multiprocess and xxhash. pyarrow, pandas,
#     xxhash and psutil are compiled: wheels for the image's CPython 3.12 on x86-64 Linux.
# --no-deps throughout, versions as requirements.lock pins them: the image's own packages stay as they are.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
PYVER=${GPU_PYTHON_VERSION:-3.12}
mkdir -p .whl
pinned() {  # name==version from requirements.lock
    grep -iE "^$1==" requirements.lock | head -1 | grep . || { echo "$1 is not in requirements.lock" >&2; exit 1; }
}
PURE=(trl liger_kernel accelerate datasets dill multiprocess python-dateutil tzdata)
BINARY=(pyarrow pandas xxhash psutil)
pure=() binary=()
for p in "${PURE[@]}"; do pure+=("$(pinned "$p")"); done
for p in "${BINARY[@]}"; do binary+=("$(pinned "$p")"); done
"$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation py \
    --platform any -d .whl "${pure[@]}"
"$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    -d .whl "${binary[@]}"
ls -l .whl
# The device tool carries at most 64 MiB in all (the checkout included, about 2): pyarrow alone is about
# 40 of them.
total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
echo "wheels: $((total / 1024)) KiB"
[ "$total" -le $((60 * 1024 * 1024)) ] || { echo "the wheels exceed 60 MiB"; exit 1; }
