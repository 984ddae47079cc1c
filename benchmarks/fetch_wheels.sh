#!/usr/bin/env bash
# Fetch, on a machine with registry access, the pure-Python wheels the GPU benchmark needs beyond the
# GPU image (TRL 1.16 and liger-kernel) into .whl/ (git-ignored), for the device run to carry:
#   benchmarks/fetch_wheels.sh && <device run, carry [".whl"]> benchmarks/run_gpu.sh
# --no-deps: the image has torch, triton and transformers, which is all that TRL's LM-head kernel and
# Liger's loss import (checked with datasets, accelerate and peft absent). TRL's trainer utilities also
# want `datasets` (pyarrow alone is ~40 MiB): the benchmark stands in for the one helper the kernel's
# backward imports from there (grpo_fast/benchmarking/baselines.py), and the tests that need TRL's
# trainer skip without `datasets`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
    --platform any -d .whl "trl==1.16.0" "liger-kernel==0.8.5"
ls -l .whl
# The device tool carries at most 64 MiB in all; the wheels keep within 40 of them.
total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
echo "wheels: $((total / 1024)) KiB"
[ "$total" -le $((40 * 1024 * 1024)) ] || { echo "the wheels exceed 40 MiB"; exit 1; }
