#!/usr/bin/env bash
# The GPU session's one command: carried wheels, the build, the GPU tests and the benchmark.
#
#   benchmarks/run_gpu.sh [PHASE ...]      PHASE: tests, vocab_parallel, table, longctx, report
#                                          (default: all five, in that order)
#
# On the dev machine first: benchmarks/fetch_wheels.sh (TRL and liger-kernel into .whl/), then run this
# on the GPU machine with .whl carried. Everything is written under $OUT when set (the device tool
# brings $OUT back): tests.log, bench.log and the results <device>-<date>.json/.png/.md. Results also go
# to benchmarks/results/. The whole run keeps within RUN_BUDGET seconds (default 540: one device call);
# the benchmark stops starting new measurements when the budget is spent, and a re-run with the partial
# JSON copied back into benchmarks/results/ resumes where it stopped:
#   benchmarks/run_gpu.sh table longctx report
#
# Environment: RUN_BUDGET (s), GRPO_FAST_NO_CUDA (default 0: the native CUDA kernels are built, for
# this GPU's architecture only unless TORCH_CUDA_ARCH_LIST says otherwise, so their GPU tests run; set 1
# to skip them and save the compile time), GRPO_FAST_COMMIT (recorded in the results), BENCH_ARGS
# (extra arguments for bench_gpu.py, e.g. "--iters 3").
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
START=$(date +%s)
BUDGET=${RUN_BUDGET:-540}
left() { echo $((BUDGET - ($(date +%s) - START))); }
LOGDIR=${OUT:-benchmarks/results}
mkdir -p "$LOGDIR" benchmarks/results
PHASES=("$@")
[ ${#PHASES[@]} -eq 0 ] && PHASES=(tests vocab_parallel table longctx report)
PY=${PYTHON:-python3}
status=0

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed"; exit 1; }
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
"$PY" -c "import torch, triton, grpo_fast.kernels; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"

RESULTS=${RESULTS:-$(cd benchmarks && "$PY" -c "import bench_gpu, grpo_fast.benchmarking.harness as b; print(bench_gpu.default_out(b.environment()['device']))")}
echo "results: $RESULTS"

for phase in "${PHASES[@]}"; do
    echo "== $phase ($(left) s left)"
    case $phase in
        tests)
            # Every GPU-marked test, then the Triton tests (natively on the GPU) and the AOT compile check.
            timeout $(( $(left) > 60 ? $(left) - 30 : 30 )) "$PY" -m pytest -q -ra -m gpu tests \
                2>&1 | tee "$LOGDIR/tests.log"
            [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
            timeout $(( $(left) > 60 ? $(left) - 30 : 30 )) "$PY" -m pytest -q -ra \
                tests/test_triton_ops.py tests/test_triton_compile.py 2>&1 | tee -a "$LOGDIR/tests.log"
            [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
            ;;
        vocab_parallel)
            # Overhead of grpo_loss(process_group=...) over NCCL with one rank vs the plain path.
            VP_OUT="${RESULTS%.json}-vocab-parallel.json"
            timeout $(( $(left) > 120 ? 90 : 30 )) "$PY" benchmarks/bench_vocab_parallel.py --out "$VP_OUT" \
                2>&1 | tee -a "$LOGDIR/bench.log"
            [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
            [ -n "${OUT:-}" ] && [ -f "$VP_OUT" ] && cp "$VP_OUT" "$OUT/"
            ;;
        table|longctx)
            "$PY" benchmarks/bench_gpu.py --phase "$phase" --out "$RESULTS" --time-limit $(( $(left) - 60 )) \
                ${BENCH_ARGS:-} 2>&1 | tee -a "$LOGDIR/bench.log"
            [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
            ;;
        report)
            "$PY" benchmarks/bench_gpu.py --phase report --out "$RESULTS" 2>&1 | tee -a "$LOGDIR/bench.log"
            ;;
        *) echo "unknown phase $phase (tests, vocab_parallel, table, longctx, report)"; status=1 ;;
    esac
done

if [ -n "${OUT:-}" ]; then
    for f in "$RESULTS" "${RESULTS%.json}.png" "${RESULTS%.json}.md"; do
        [ -f "$f" ] && cp "$f" "$OUT/"
    done
fi
echo "== done in $(( $(date +%s) - START )) s, status $status"
exit $status
