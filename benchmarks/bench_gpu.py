"""The GPU run: preamble, fp64 truth, the speed/memory table and the long-context search, on the record.

Phases (``--phase``; ``all`` runs them in this order):

- ``preamble``: versions, per table shape the same-run cuBLAS GEMM times (the full GEMM and one tile's
  three GEMMs), the device copy bandwidth and whether the fp32-output GEMM runs (:mod:`gpu_model`);
- ``truth``: every loss family on both GPU backends against an fp64 reference (:mod:`gpu_truth`);
- ``table``: the issue's shapes (N, H, V), dapo, token level, old log-probs, beta 0 and 0.04: grpo_fast's
  rows first (:data:`IMPLS`: native, triton, and Triton's no-grad log-probs: tile path vs fused GEMM
  kernel), then TRL 1.16's path, Liger's ``LigerFusedLinearGRPOLoss``, and torch.compile of the torch chunk
  pass at the first shape. Rows ``{impl, N, H, V, dtype, beta, ms, tflops, gemm_ratio, peak_mb,
  chunk_rows, predicted_ms, model}``: ``gemm_ratio`` is ``flops / ms`` over the same-shape cuBLAS GEMM's
  rate, measured in the same run; ``model`` the model's terms (:func:`gpu_model.predict`) and
  ``predicted_ms`` their sum; ``fp32_out_gemm`` (grpo_fast's half-precision loss rows on CUDA) whether the
  dW accumulation's fp32-output GEMM ran. Each row runs in its own time box (``--row-limit``): one that
  overruns is on the record as cut (``cut: true``) and the table goes on;
- ``longctx``: for two implementations, the largest N that fits a memory budget (:mod:`gpu_longctx`);
- ``report``: the Markdown tables and the PNG chart (:mod:`gpu_report`), from the results file.

Every token is unmasked, so 6*N*H*V is the work each implementation must do (none may skip padding).
Results go to ``--out`` (default ``results/<device>-<yyyymmdd>.json``), rewritten after every
measurement, so a run cut short keeps what it measured; a re-run with the same ``--out`` resumes,
skipping what is on record. ``--time-limit`` stops starting new measurements after that many seconds; the
exit status is then 3 (cut) when something was left, 0 when all is on record. ``--dry-run`` rehearses
every phase on CPU tensors at tiny shapes (fp32; Triton under ``TRITON_INTERPRET=1``, TRL and Liger on
CPU): CI runs it, so the GPU run cannot die on a script bug.

    python benchmarks/bench_gpu.py --time-limit 420 --out $OUT/h200-20261202.json
    TRITON_INTERPRET=1 python benchmarks/bench_gpu.py --dry-run --out /tmp/dry.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gpu_model
import gpu_report
import gpu_truth
import torch
from gpu_common import Deadline, OverTime, device_inputs, free, is_oom, time_box
from gpu_longctx import run_longctx

from grpo_fast.benchmarking import baselines as bench_baselines
from grpo_fast.benchmarking import harness as bench
from grpo_fast.engine import gradients

ROOT = Path(__file__).resolve().parent
SHAPES = [(8192, 4096, 151936), (16384, 4096, 128256), (4096, 2048, 151936), (32768, 3584, 152064)]
BETAS = [0.0, 0.04]
# The table's order: grpo_fast first, then what users run today; torch-compile at the first shape only.
IMPLS = [
    "grpo_fast-native",
    "grpo_fast-triton",
    "grpo_fast-triton-invariant",
    "grpo_fast-triton-logprobs",
    "grpo_fast-triton-logprobs-fused",
    "trl",
    "liger",
    "torch-compile",
]
FIRST_SHAPE_ONLY = ("torch-compile",)
SEQ_LEN = 1024  # tokens per completion: N = B * SEQ_LEN
LONGCTX_SHAPE = (4096, 151936)
PREAMBLE_COPY_MB = 1024
# Seconds one table row may take (build, warm-up incl. compilation, timing, peak): then it is cut.
ROW_LIMIT = 45.0
TRUTH_SHAPE = (2, 1024, 2048, 151936)  # (B, T, H, V): the real vocabulary, an fp64 truth in seconds
# --dry-run: the same phases at tiny shapes on the CPU.
DRY = dict(
    shapes=[(64, 24, 301), (96, 40, 517)],
    truth=(2, 37, 67, 1013),
    copy_mb=16,
    row_limit=120.0,
    longctx=(24, 301),
    seq_len=16,
)


def gemm_ms(case: bench.BenchCase, iters: int) -> float:
    dtype, device = bench.DTYPES[case.dtype], torch.device(case.device)
    a = torch.randn(case.N, case.H, device=device, dtype=dtype)
    b = torch.randn(case.V, case.H, device=device, dtype=dtype)
    return bench._median_ms([lambda: torch.mm(a, b.t())], case.device, iters, warmup=2)


def peak_above_inputs_mb(step: Callable[[], None], device: str) -> float | None:
    if not device.startswith("cuda"):
        step()
        return None  # CPU runs are smoke tests (bench.peak_mb measures CPU memory in a fresh process)
    return bench.cuda_peak_above_mb(step)


@dataclass
class Results:
    """The results file: environment, table rows and long-context rows; saved after every change."""

    path: Path
    data: dict = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path, env: dict) -> Results:
        data = json.loads(path.read_text()) if path.exists() else {}
        data.update({k: v for k, v in env.items() if k not in data or not data[k]})
        data.setdefault("preamble", {})
        data.setdefault("truth", [])
        data.setdefault("rows", [])
        data.setdefault("long_context", [])
        data.setdefault("phases", [])  # run_gpu.sh's records of each phase (benchmarks/gpu_phases.py)
        return cls(path, data)

    def has_truth(self, entry: dict) -> bool:
        return any(
            (t["config"], t["backend"], t["dtype"]) == (entry["config"], entry["backend"], entry["dtype"])
            for t in self.data["truth"]
        )

    def has_row(self, impl: str, case: bench.BenchCase) -> bool:
        key = (impl, case.N, case.H, case.V, case.dtype, case.beta)
        fields = ("impl", "N", "H", "V", "dtype", "beta")
        return any(tuple(r[k] for k in fields) == key for r in self.data["rows"])

    def has_long(self, impl: str) -> bool:
        return any(r["impl"] == impl for r in self.data["long_context"])

    def add(self, kind: str, row: dict) -> None:
        self.data[kind].append(row)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.path)


def environment() -> dict:
    env = bench.environment()
    env["commit"] = os.environ.get("GRPO_FAST_COMMIT") or env.get("commit") or "unknown"
    return env


def default_out(device_name: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    return ROOT / "results" / f"{slug}-{time.strftime('%Y%m%d')}.json"


def measure_row(
    impl: str, case: bench.BenchCase, gemm: float, iters: int, pre: dict, limit: float | None = None
) -> dict:
    """One implementation at one case: a row of the results table (``error`` set when it failed; ``cut``
    too when it ran past its ``limit`` seconds)."""
    flops = gpu_model.flops(impl, case.N, case.H, case.V)
    rows = gpu_model.chunk_rows(impl, case.N, case.V, case.dtype, case.device)
    row = dict(impl=impl, N=case.N, H=case.H, V=case.V, dtype=case.dtype, beta=case.beta)
    row.update(ms=None, tflops=None, gemm_ratio=None, peak_mb=None, gemm_ms=gemm, chunk_rows=rows)
    t0 = time.monotonic()
    steps: list = []
    try:
        with time_box(limit):
            steps = [bench.IMPLS[impl](device_inputs(case, seed), case) for seed in range(2)]
            # warmup=2: torch.compile and autotuners compile on the first calls of each input set
            ms = bench._median_ms(steps, case.device, iters, warmup=2)
            # gemm_ratio: this step's FLOP rate over the same-shape forward GEMM's (2NHV in gemm ms).
            ratio = flops / (2.0 * case.N * case.H * case.V) * gemm / ms
            row.update(ms=ms, tflops=flops / ms / 1e9, gemm_ratio=ratio)
            row["peak_mb"] = peak_above_inputs_mb(steps[0], case.device)
    except OverTime as err:
        row.update(ms=None, tflops=None, gemm_ratio=None, cut=True, error=f"cut: {err}")
    except Exception as err:  # one failing implementation must not stop the run
        row["error"] = "OOM" if is_oom(err) else f"{type(err).__name__}: {err}"[:500]
        if not is_oom(err):
            traceback.print_exc()
    finally:
        del steps
        free()
    row["seconds"] = round(time.monotonic() - t0, 1)
    fp32_out = None
    if impl.startswith("grpo_fast") and rows and case.device.startswith("cuda") and case.dtype != "float32":
        # After the run: the dW accumulator turns the flag off the first time the fp32-output GEMM fails.
        fp32_out = row["fp32_out_gemm"] = bool(gradients.FP32_OUT_GEMM["cuda"])
    if pre:
        terms = gpu_model.predict(impl, case.N, case.H, case.V, case.dtype, rows, pre, fp32_out)
        row["model"] = terms
        row["predicted_ms"] = sum(terms.values())
    else:
        row["predicted_ms"] = None
    return row


def run_table(args, results: Results, impls: list[str], deadline: Deadline) -> bool:
    """Every (shape, beta, implementation) not on record yet, each in its time box; True when all are on
    record (False: the deadline stopped it first)."""
    pre = results.data.get("preamble") or {}
    for k, (n, h, v) in enumerate(args.shapes):
        for beta in args.betas:
            case = bench.BenchCase(
                N=n, H=h, V=v, B=max(1, n // args.seq_len), dtype=args.dtype, device=args.device, beta=beta
            )
            here = [i for i in impls if k == 0 or i not in FIRST_SHAPE_ONLY]
            todo = [i for i in here if not results.has_row(i, case)]
            if not todo:
                continue
            measured = (pre.get("gemms") or {}).get(gpu_model.shape_key(n, h, v))
            gemm = measured["full_ms"] if measured else None
            for impl in todo:
                if deadline.passed():
                    print("time limit reached: stopping (re-run with the same --out to resume)", flush=True)
                    return False
                if gemm is None:  # the preamble did not measure this shape: now, once
                    gemm = gemm_ms(case, args.iters)
                    print(f"N={n} H={h} V={v}: cuBLAS GEMM {gemm:.2f} ms", flush=True)
                row = measure_row(impl, case, gemm, args.iters, pre, args.row_limit)
                results.add("rows", row)
                _print_row(row)
    return True


def _print_row(row: dict) -> None:
    head = f"  N={row['N']} beta={row['beta']} {row['impl']:<31}"
    if row.get("error"):
        print(f"{head} failed: {row['error'][:120]}", flush=True)
        return
    peak = f"{row['peak_mb']:9.0f} MB" if row["peak_mb"] is not None else "n/a"
    model = f"{row['predicted_ms']:9.2f}" if row["predicted_ms"] is not None else "      n/a"
    print(
        f"{head} {row['ms']:9.2f} ms (model {model}) {row['tflops']:7.1f} TFLOP/s "
        f"{100 * row['gemm_ratio']:5.1f}% of cuBLAS  peak {peak}",
        flush=True,
    )


# ---------------------------------------------------------------- command line


PHASES = ("preamble", "truth", "table", "longctx", "report")
CUT = 3  # the exit status when the time limit left work undone (run_gpu.sh records the phase as cut)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phase", action="append", choices=[*PHASES, "all"], help="default: all, in order")
    p.add_argument("--out", type=Path, help="results JSON (default: results/<device>-<date>.json)")
    p.add_argument("--device", default=None, help="default: cuda when available (cpu with --dry-run)")
    p.add_argument("--dtype", default=None, choices=sorted(bench.DTYPES), help="default: bfloat16")
    p.add_argument("--impl", action="append", help="implementations (default: every one that can run)")
    p.add_argument("--shape", action="append", metavar="N,H,V", help="default: the issue's four shapes")
    p.add_argument("--beta", action="append", type=float, help="default: 0 and 0.04")
    p.add_argument("--iters", type=int, default=None, help="timed calls per median (default 5; 2 dry)")
    p.add_argument("--budget-gb", type=float, default=None, help="long-context budget (default 40)")
    p.add_argument("--max-n", type=int, default=None, help="largest N the long-context search tries")
    p.add_argument("--time-limit", type=float, default=None, help="seconds; then stop starting new work")
    p.add_argument("--row-limit", type=float, default=None, help="seconds per table row (45; 120 dry)")
    p.add_argument("--dry-run", action="store_true", help="every phase on CPU tensors at tiny shapes")
    args = p.parse_args(argv)
    dry = args.dry_run
    args.phases = (
        PHASES if not args.phase or "all" in args.phase else tuple(x for x in PHASES if x in args.phase)
    )
    args.device = args.device or ("cpu" if dry or not torch.cuda.is_available() else "cuda")
    # The interpreter's tl.dot is wrong in bf16: the CPU rehearsal runs in fp32.
    args.dtype = args.dtype or ("float32" if dry else "bfloat16")
    args.iters = args.iters or (2 if dry else 5)
    args.budget_gb = args.budget_gb or (0.01 if dry else 40.0)
    args.seq_len = DRY["seq_len"] if dry else SEQ_LEN
    args.max_n = args.max_n or (64 * args.seq_len if dry else 2**21)
    args.longctx_shape = DRY["longctx"] if dry else LONGCTX_SHAPE
    args.truth_shape = DRY["truth"] if dry else TRUTH_SHAPE
    args.row_limit = args.row_limit or (DRY["row_limit"] if dry else ROW_LIMIT)
    args.copy_mb = DRY["copy_mb"] if dry else PREAMBLE_COPY_MB
    shapes = DRY["shapes"] if dry else SHAPES
    args.shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape] if args.shape else shapes
    args.betas = args.beta or BETAS
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = environment()
    out = args.out or default_out(env["device"])
    results = Results.open(out, {**env, "dry_run": args.dry_run})
    if args.impl:
        unknown = [i for i in args.impl if i not in bench.IMPLS]
        if unknown:
            raise SystemExit(f"unknown implementations {unknown}; known: {sorted(bench.IMPLS)}")
        impls = args.impl
    else:
        impls = [i for i in IMPLS if bench_baselines.runnable(i, args.device, dry_run=args.dry_run)]
        absent = {i: bench_baselines.missing_modules(i) for i in IMPLS if i not in impls}
        results.data["not_run"] = {i: f"needs {', '.join(m)}" for i, m in absent.items() if m}
        for impl, why in results.data["not_run"].items():
            print(f"{impl}: not run, {why} (benchmarks/fetch_wheels.sh carries it)", flush=True)
    deadline = Deadline(args.time_limit)
    print(f"{env['device']}, torch {env['torch']}, triton {env['triton']}: {impls} -> {out}", flush=True)
    complete = True
    if "preamble" in args.phases and not results.data["preamble"]:
        pre = gpu_model.preamble(args.device, args.dtype, args.shapes, args.copy_mb, args.iters)
        results.data["preamble"] = pre
        results.save()
        print(
            f"preamble: GEMM {pre['gemm']['tflops']:.1f} TFLOP/s, copy {pre['copy']['gbs']:.0f} GB/s, "
            f"fp32-output GEMM {pre['fp32_out_gemm']}",
            flush=True,
        )
    if "truth" in args.phases:

        def add(entry: dict) -> None:
            if not results.has_truth(entry):
                results.add("truth", entry)

        complete &= gpu_truth.run_truth(args.device, args.dtype, args.truth_shape, add, deadline.passed)
    if "table" in args.phases:
        complete &= run_table(args, results, impls, deadline)
    if "longctx" in args.phases:
        complete &= run_longctx(args, results, impls, deadline)
    if "report" in args.phases and results.data["rows"]:
        gpu_report.write(results.data, out, IMPLS)
        print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")
    return 0 if complete else CUT


if __name__ == "__main__":
    sys.exit(main())
