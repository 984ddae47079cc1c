#!/usr/bin/env bash
# The GPU session's one command: carried wheels, the build, then the phases of the GPU record, each in its
# own time box, within one 10-minute device call.
#
#   benchmarks/run_gpu.sh [--cpu-dry-run] [PHASE ...]
#       PHASE, in the default order (the record first, the test suite with what is left):
#         preamble   versions, per-shape cuBLAS GEMM times, copy bandwidth, the fp32-output GEMM tried
#         truth      every loss family on both GPU backends against an fp64 reference (short)
#         table      the speed/memory table: the record; every row in its own time box (ROW_LIMIT)
#         longctx    the largest N within 40 GB for grpo_fast triton and TRL
#         trainstep  benchmarks/bench_longctx.py: one GRPO training step of TRL, FastGRPOTrainer and the
#                    thin trainer at growing completion lengths, into longctx-gpu-<date>.json and .png
#         skipzero   benchmarks/bench_skip_zero.py: grpo_loss alone and a loss step of FastGRPOTrainer and
#                    the thin trainer with 0/25/50/75% of the completions at advantage 0, skip off and on,
#                    into skip-zero-gpu-<date>.json and .png
#         seqpar     benchmarks/gpu_seqpar.py: the Ulysses attention's CUDA kernels (flex, flash varlen when
#                    installed) against sdpa with the block-diagonal mask, fp32 and bf16, forward and
#                    backward, into ulysses-kernels-gpu-<date>.json; then bench_sequence_parallel.py (P > 1
#                    only with P GPUs, else recorded as skipped) into sequence-parallel-gpu-<date>.json
#         tests      the GPU tests, then the Triton tests natively, with the time that is left
#         report     the Markdown table and the PNG chart from the record
#       vocab_parallel (the NCCL overhead of the vocab-parallel path) runs only when named.
#
# Time: the run keeps within RUN_BUDGET seconds (default 540 of the 600 a device call may take; the build
# counts). Each phase runs under `timeout` for its box (KIT_BOX_<phase> overrides; seconds), or for what is
# left less REPORT_RESERVE for the report when that is less; tests get whatever is left. A phase that
# reaches its box is stopped (the benchmark stops starting measurements a few seconds before, so what it
# measured is saved) and recorded as cut. The record, $OUT/<device>-<date>.json, is rewritten after every
# measurement and gets one entry per phase in "phases" ({phase, status: ok|cut|failed|skipped, seconds,
# limit_s, missing_packages, note}), so a run that is killed still returns what it measured and says how
# far it got; a re-run with the same file resumes where it stopped. tests.log and bench.log lie next to
# it; a copy of the record lands in benchmarks/results/ too.
#
# Exit status: 0 every phase ok; 1 a phase failed; 3 none failed but one was cut or skipped for time.
#
# --cpu-dry-run: every phase on CPU tensors at tiny shapes (fp32; Triton under TRITON_INTERPRET=1, TRL
# and Liger on the CPU), no wheels, no build (the checkout's environment as is), boxes three times as
# long (an interpreter on a shared CPU). CI runs it (tests/test_gpu_kit.py), so the GPU run cannot die on
# a script bug. Its record says dry_run: true and measures nothing worth keeping.
#
# On the dev machine first: benchmarks/fetch_wheels.sh (TRL, liger-kernel, datasets and what they need
# beyond the image, into .whl/), then run this on the GPU machine with .whl carried. A phase whose
# packages are missing says which (and its record lists them under missing_packages).
#
# Environment: RUN_BUDGET (s), KIT_BOX_<phase> (s), ROW_LIMIT (s per table row), REPORT_RESERVE (s),
# GRPO_FAST_NO_CUDA (default 0: the native CUDA kernels are built for this GPU's architecture only unless
# TORCH_CUDA_ARCH_LIST says otherwise; 1 skips them), GRPO_FAST_COMMIT (recorded in the results when git
# is not there), BENCH_ARGS (extra arguments for bench_gpu.py).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
START=$(date +%s)
DRY=0
if [ "${1:-}" = "--cpu-dry-run" ]; then
    DRY=1
    shift
fi
BUDGET=${RUN_BUDGET:-540}
REPORT_RESERVE=${REPORT_RESERVE:-20}
left() { echo $((BUDGET - ($(date +%s) - START))); }
LOGDIR=${OUT:-benchmarks/results}
mkdir -p "$LOGDIR" benchmarks/results
PHASES=("$@")
[ ${#PHASES[@]} -eq 0 ] && PHASES=(preamble truth table longctx trainstep skipzero seqpar tests report)
PY=${PYTHON:-python3}
case $PY in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac  # the phases cd around

box() {  # a phase's time box in seconds: KIT_BOX_<phase>, or its default (x3 in the dry run)
    local var="KIT_BOX_$1" b
    case $1 in
        preamble) b=30 ;; truth) b=60 ;; table) b=240 ;; longctx) b=45 ;; trainstep) b=60 ;; skipzero) b=60 ;;
        seqpar) b=45 ;;
        tests) b=100000 ;; report) b=20 ;; vocab_parallel) b=90 ;; *) b=60 ;;
    esac
    [ $DRY -eq 1 ] && [ "$1" != tests ] && b=$((b * 3))
    echo "${!var:-$b}"
}

if [ $DRY -eq 1 ]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    # This checkout's grpo_fast, whichever one the environment has installed (the phases run from
    # benchmarks/, where an editable install of another checkout would win).
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
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

failed=0
cut=0
mark() {  # phase status seconds limit [note]: the phase's entry in the record
    "$PY" benchmarks/gpu_phases.py mark "$RESULTS" "$@" >/dev/null || echo "could not record phase $1"
    echo "== $1: $2 after $3 s (box $4 s)${5:+: $5}"
    case $2 in failed) failed=1 ;; cut|skipped) cut=1 ;; esac
}

run_boxed() {  # phase limit log command...: the command under `timeout limit`, then the phase's record
    local phase=$1 limit=$2 log=$3 t0 rc status note=""
    shift 3
    t0=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=ok ;;
        3) status=cut note="stopped at its time limit: what it measured is on the record, the rest is not" ;;
        124|137) status=cut note="killed at its time box" ;;
        *) status=failed note="exit status $rc" ;;
    esac
    mark "$phase" $status $(( $(date +%s) - t0 )) "$limit" "$note"
}

for i in "${!PHASES[@]}"; do
    phase=${PHASES[$i]}
    reserve=0
    for later in "${PHASES[@]:$((i + 1))}"; do [ "$later" = report ] && reserve=$REPORT_RESERVE; done
    b=$(box "$phase")
    limit=$(( $(left) - reserve ))
    [ "$b" -lt "$limit" ] && limit=$b
    echo "== $phase (box $b s, $limit s given, $(left) s left)"
    missing=$("$PY" benchmarks/gpu_phases.py missing "$phase")
    [ -n "$missing" ] && echo "$phase: missing packages: $missing (benchmarks/fetch_wheels.sh carries them)"
    if [ "$limit" -lt 5 ]; then
        mark "$phase" skipped 0 "$limit" "no time left"
        continue
    fi
    case $phase in
        preamble|truth|table|longctx|report)
            # The benchmark stops starting new work 10 s before the box, so it saves and exits itself.
            run_boxed "$phase" "$limit" "$LOGDIR/bench.log" "$PY" benchmarks/bench_gpu.py "${DRY_ARGS[@]}" \
                --phase "$phase" --out "$RESULTS" --time-limit $(( limit > 20 ? limit - 10 : limit / 2 )) \
                ${ROW_LIMIT:+--row-limit "$ROW_LIMIT"} ${BENCH_ARGS:-}
            ;;
        tests)
            # The GPU tests: every gpu-marked test, then the Triton tests natively on the GPU (the CPU-only
            # compile tests run in CI). The dry run collects and runs the gpu-marked ones (they skip).
            triton_ops=""
            [ $DRY -eq 0 ] && triton_ops="tests/test_triton_ops.py"
            run_boxed tests "$limit" "$LOGDIR/tests.log" bash -c '
                "$0" -m pytest -q -ra -m gpu -p no:cacheprovider tests; rc=$?
                if [ -n "$1" ]; then "$0" -m pytest -q -ra -p no:cacheprovider "$1" || rc=1; fi
                exit $rc' "$PY" "$triton_ops"
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
            # No case starts after two thirds of the box: each runs in a fresh process, to its end.
            run_boxed trainstep "$limit" "$LOGDIR/bench.log" "$PY" benchmarks/bench_longctx.py "${LC_ARGS[@]}" \
                --time-limit $(( limit * 2 / 3 )) --out "$LC_OUT"
            ;;
        skipzero)
            if [ $DRY -eq 1 ]; then
                SZ_OUT="$LOGDIR/skip-zero-cpu-dry.json"
                SZ_ARGS=(--dry-run)
            else
                SZ_OUT="$LOGDIR/skip-zero-gpu-$(date +%Y%m%d).json"
                SZ_ARGS=(--device cuda --bf16 --loss-shape 16384 4096 151936 64 --tokens 2048 --iters 3)
            fi
            run_boxed skipzero "$limit" "$LOGDIR/bench.log" "$PY" benchmarks/bench_skip_zero.py "${SZ_ARGS[@]}" \
                --time-limit $(( limit * 2 / 3 )) --out "$SZ_OUT"
            ;;
        seqpar)
            if [ $DRY -eq 1 ]; then
                SP_OUT="$LOGDIR/sequence-parallel-cpu-dry.json"
                SP_KERNELS="$LOGDIR/ulysses-kernels-cpu-dry.json"
            else
                SP_OUT="$LOGDIR/sequence-parallel-gpu-$(date +%Y%m%d).json"
                SP_KERNELS="$LOGDIR/ulysses-kernels-gpu-$(date +%Y%m%d).json"
            fi
            run_boxed seqpar "$limit" "$LOGDIR/bench.log" "$PY" benchmarks/gpu_seqpar.py "${DRY_ARGS[@]}" \
                --time-limit $(( limit * 2 / 3 )) --out "$SP_KERNELS" --bench-out "$SP_OUT"
            ;;
        vocab_parallel)
            if [ $DRY -eq 1 ]; then
                mark vocab_parallel skipped 0 "$limit" "needs CUDA and NCCL: not in the dry run"
                continue
            fi
            run_boxed vocab_parallel "$limit" "$LOGDIR/bench.log" "$PY" benchmarks/bench_vocab_parallel.py \
                --out "${RESULTS%.json}-vocab-parallel.json"
            ;;
        *)
            echo "unknown phase $phase (preamble, truth, table, longctx, trainstep, skipzero, seqpar, tests, report, vocab_parallel)"
            failed=1
            ;;
    esac
done

if [ $DRY -eq 0 ] && [ "$(dirname "$RESULTS")" != benchmarks/results ]; then
    for f in "$RESULTS" "${RESULTS%.json}.png" "${RESULTS%.json}.md" "${RESULTS%.json}-vocab-parallel.json" \
             "$LOGDIR"/longctx-gpu-*.json "$LOGDIR"/longctx-gpu-*.png \
             "$LOGDIR"/skip-zero-gpu-*.json "$LOGDIR"/skip-zero-gpu-*.png \
             "$LOGDIR"/sequence-parallel-gpu-*.json "$LOGDIR"/sequence-parallel-gpu-*.png \
             "$LOGDIR"/ulysses-kernels-gpu-*.json; do
        [ -f "$f" ] && cp "$f" benchmarks/results/
    done
fi
status=0
[ $cut -eq 1 ] && status=3
[ $failed -eq 1 ] && status=1
echo "== done in $(( $(date +%s) - START )) s, status $status"
exit $status
