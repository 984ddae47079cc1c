#!/usr/bin/env bash
# Fetch, on a machine with registry access, the pure-Python wheels the GPU benchmark needs beyond the
# GPU image (TRL 1.16 and liger-kernel) into .whl/ (git-ignored), for the device run to carry:
#   benchmarks/fetch_wheels.sh && <device run, carry [".whl"]> benchmarks/run_gpu.sh
# --no-deps: the image has torch, triton, transformers, accelerate. TRL's trainer utilities also want
# `datasets`; the benchmark only needs TRL's LM-head kernel, and stands in for the one helper its
# backward imports from there when `datasets` is missing (see grpo_fast/benchmarking/baselines.py).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
    --platform any -d .whl "trl==1.16.0" "liger-kernel==0.8.5"
ls -l .whl
