#!/usr/bin/env bash
# The GPU session's one command: carried wheels, the build, then the phases of the GPU record.
#
#   benchmarks/run_gpu.sh [--cpu-dry-run] [PHASE ...]
#       PHASE: preamble truth tests table longctx trainstep skipzero report (default: all eight, in order);
#              vocab_parallel (the NCCL overhead of the vocab-parallel path) only when named.
#       trainstep: benchmarks/bench_longctx.py, one GRPO training step of TRL, FastGRPOTrainer and the thin
#              trainer (padded, padding-free, token budget) at growing completion lengths, into
#              longctx-gpu-<date>.json and .png; it gets the time the phases before it left.
#       skipzero: benchmarks/bench_skip_zero.py, grpo_loss alone and a loss step of FastGRPOTrainer and the
#              thin trainer with 0/25/50/75% of the completions at advantage 0, skip off and on, into
#              skip-zero-gpu-<date>.json and .png.
#
# Results: $OUT/<device>-<date>.json (benchmarks/results/ when OUT is unset), rewritten after every
# measurement, so a run that is killed still returns what it measured; tests.log and bench.log next to it;
# the .md table and .png chart at the end. A copy lands in benchmarks/results/ too. The run keeps within
# RUN_BUDGET seconds (default 480: 8 minutes of a 10-minute device call): each phase gets what is left, the
# benchmark stops starting new measurements at its deadline, and a re-run with the same results file
# resumes where it stopped.
#
# --cpu-dry-run: every phase on CPU tensors at tiny shapes (fp32; Triton under TRITON_INTERPRET=1, TRL
# and Liger on the CPU), no wheels, no build (the checkout's environment as is). CI runs it, so the GPU
# run cannot die on a script bug. Its record says dry_run: true and measures nothing worth keeping.
#
# On the dev machine first: benchmarks/fetch_wheels.sh (TRL, liger-kernel and what they need beyond the
# image, into .whl/), then run this on the GPU machine with .whl carried.
#
# Environment: RUN_BUDGET (s), GRPO_FAST_NO_CUDA (default 0: the native CUDA kernels are built for this
# GPU's architecture only unless TORCH_CUDA_ARCH_LIST says otherwise; 1 skips them), GRPO_FAST_COMMIT
# (recorded in the results when git is not there), BENCH_ARGS (extra arguments for bench_gpu.py).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
START=$(date +%s)
DRY=0
if [ "${1:-}" = "--cpu-dry-run" ]; then
    DRY=1
    shift
fi
BUDGET=${RUN_BUDGET:-480}
left() { echo $((BUDGET - ($(date +%s) - START))); }
LOGDIR=${OUT:-benchmarks/results}
mkdir -p "$LOGDIR" benchmarks/results
PHASES=("$@")
[ ${#PHASES[@]} -eq 0 ] && PHASES=(preamble truth tests table longctx trainstep skipzero report)
PY=${PYTHON:-python3}
case $PY in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac  # the phases cd around
status=0

if [ $DRY -eq 1 ]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    DRY_ARGS=(--dry-run)
else
    unset TRITON_INTERPRET
    DRY_ARGS=()
    if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || { echo "installing the carried wheels failed"; exit 1; }
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    # Editable install: kernels/ becomes grpo_fast.kernels (setup.py's package_dir). Skipped when this
    # checkout is installed already (a warm machine).
    ROOT=$PWD
    if ! (cd /tmp && "$PY" -c "import grpo_fast.kernels as k, sys; sys.exit(not k.__file__.startswith('$ROOT/'))") 2>/dev/null; then
        echo "== building grpo_fast ($(left) s left)"
        # This GPU's architecture only (sm_90a on Hopper): half the compile time of the full list.
        ARCH=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}' + ('a' if m == 9 else ''))" 2>/dev/null)}
        TORCH_CUDA_ARCH_LIST=$ARCH GRPO_FAST_NO_CUDA=${GRPO_FAST_NO_CUDA:-0} MAX_JOBS=${MAX_JOBS:-16} \
            "$PY" -m pip install -q --no-build-isolation --no-deps -e . || { echo "the build failed"; exit 1; }
    fi
fi
"$PY" -c "import torch, triton, grpo_fast.kernels; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"

NAME=$(cd benchmarks && "$PY" -c "import bench_gpu, grpo_fast.benchmarking.harness as b; print(bench_gpu.default_out(b.environment()['device']).name)") \
    || { echo "bench_gpu.py does not import"; exit 1; }
[ $DRY -eq 1 ] && NAME=${NAME%.json}-dry-run.json
RESULTS=${RESULTS:-$LOGDIR/$NAME}
echo "results: $RESULTS"

bench() {  # bench_gpu.py phases within the time left, keeping 20 s for what follows
    local limit=$(( $(left) - 20 ))
    [ $limit -lt 5 ] && limit=5
    "$PY" benchmarks/bench_gpu.py "${DRY_ARGS[@]}" "$@" --out "$RESULTS" --time-limit $limit ${BENCH_ARGS:-} \
        2>&1 | tee -a "$LOGDIR/bench.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}

for phase in "${PHASES[@]}"; do
    echo "== $phase ($(left) s left)"
    if [ "$(left)" -le 10 ] && [ "$phase" != report ]; then
        echo "out of time: $phase not run"
        status=1
        continue
    fi
    case $phase in
        preamble|truth|table|longctx|report)
            bench --phase "$phase"
            ;;
        tests)
            # The GPU tests: every gpu-marked test, then the Triton tests natively on the GPU (the CPU-only
            # compile tests run in CI). The dry run collects and runs the gpu-marked ones (they skip).
            timeout $(( $(left) > 60 ? $(left) - 30 : 30 )) "$PY" -m pytest -q -ra -m gpu -p no:cacheprovider tests \
                2>&1 | tee "$LOGDIR/tests.log"
            [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
            if [ $DRY -eq 0 ]; then
                timeout $(( $(left) > 60 ? $(left) - 30 : 30 )) "$PY" -m pytest -q -ra -p no:cacheprovider \
                    tests/test_triton_ops.py 2>&1 | tee -a "$LOGDIR/tests.log"
                [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
            fi
            ;;
        trainstep)
            if [ $DRY -eq 1 ]; then
                LC_OUT="$LOGDIR/longctx-cpu-dry.json"
                LC_ARGS=(--dry-run)
            else
                LC_OUT="$LOGDIR/longctx-gpu-$(date +%Y%m%d).json"
                LC_ARGS=(--device cuda --bf16 --hidden 512 --layers 4 --completions 8
                         --lengths 4096 8192 16384 32768 --token-budget 32768 --budget-mb 40960)
            fi
            timeout $(( $(left) > 60 ? $(left) - 20 : 30 )) "$PY" benchmarks/bench_longctx.py "${LC_ARGS[@]}" \
                --time-limit $(( $(left) > 90 ? $(left) - 60 : 20 )) --out "$LC_OUT" 2>&1 | tee -a "$LOGDIR/bench.log"
            [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
            ;;
        skipzero)
            if [ $DRY -eq 1 ]; then
                SZ_OUT="$LOGDIR/skip-zero-cpu-dry.json"
                SZ_ARGS=(--dry-run)
            else
                SZ_OUT="$LOGDIR/skip-zero-gpu-$(date +%Y%m%d).json"
                SZ_ARGS=(--device cuda --bf16 --loss-shape 16384 4096 151936 64 --tokens 2048 --iters 3)
            fi
            (cd benchmarks && timeout $(( $(left) > 60 ? $(left) - 20 : 30 )) "$PY" bench_skip_zero.py "${SZ_ARGS[@]}" \
                --time-limit $(( $(left) > 90 ? $(left) - 60 : 20 )) --out "$(cd .. && realpath -m "$SZ_OUT")") \
                2>&1 | tee -a "$LOGDIR/bench.log"
            [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
            ;;
        vocab_parallel)
            if [ $DRY -eq 1 ]; then
                echo "vocab_parallel needs CUDA and NCCL: not in the dry run"
                continue
            fi
            VP_OUT="${RESULTS%.json}-vocab-parallel.json"
            timeout $(( $(left) > 120 ? 90 : 30 )) "$PY" benchmarks/bench_vocab_parallel.py --out "$VP_OUT" \
                2>&1 | tee -a "$LOGDIR/bench.log"
            [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
            ;;
        *) echo "unknown phase $phase (preamble, truth, tests, table, longctx, trainstep, skipzero, report, vocab_parallel)"; status=1 ;;
    esac
done

if [ $DRY -eq 0 ] && [ "$(dirname "$RESULTS")" != benchmarks/results ]; then
    for f in "$RESULTS" "${RESULTS%.json}.png" "${RESULTS%.json}.md" "${RESULTS%.json}-vocab-parallel.json" \
             "$LOGDIR"/longctx-gpu-*.json "$LOGDIR"/longctx-gpu-*.png \
             "$LOGDIR"/skip-zero-gpu-*.json "$LOGDIR"/skip-zero-gpu-*.png; do
        [ -f "$f" ] && cp "$f" benchmarks/results/
    done
fi
echo "== done in $(( $(date +%s) - START )) s, status $status"
exit $status
