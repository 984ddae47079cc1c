"""The GPU run: preamble, fp64 truth, the speed/memory table and the long-context search, on the record.

Phases (``--phase``; ``all`` runs them in this order):

- ``preamble``: versions, the same-run cuBLAS GEMM rate and device copy bandwidth (:mod:`gpu_model`);
- ``truth``: every loss family on both GPU backends against an fp64 reference (:mod:`gpu_truth`);
- ``table``: the issue's shapes (N, H, V), dapo, token level, old log-probs, beta 0 and 0.04: grpo_fast's
  rows first (native, triton, and Triton's no-grad log-probs: tile path vs fused GEMM kernel), then TRL
  1.16's path, Liger's ``LigerFusedLinearGRPOLoss``, and torch.compile of the torch chunk pass at the
  first shape. Rows ``{impl, N, H, V, dtype, beta, ms, tflops, gemm_ratio, peak_mb, chunk_rows,
  predicted_ms}``: ``gemm_ratio`` is ``flops / ms`` over the same-shape cuBLAS GEMM's rate, measured in
  the same run; ``predicted_ms`` the roofline model's figure (:func:`gpu_model.predicted_ms`);
- ``longctx``: for two implementations, the largest N that fits a memory budget (default 40 GB, inputs
  included) at H=4096, V=151936, each search bounded by the run's deadline;
- ``report``: the Markdown tables and the PNG chart (:mod:`gpu_report`), from the results file.

Every token is unmasked, so 6*N*H*V is the work each implementation must do (none may skip padding).
Results go to ``--out`` (default ``results/<device>-<yyyymmdd>.json``), rewritten after every
measurement, so a run cut short keeps what it measured; a re-run with the same ``--out`` resumes,
skipping what is on record. ``--time-limit`` stops starting new measurements after that many seconds.
``--dry-run`` rehearses every phase on CPU tensors at tiny shapes (fp32; Triton under
``TRITON_INTERPRET=1``, TRL and Liger on CPU): CI runs it, so the GPU run cannot die on a script bug.

    python benchmarks/bench_gpu.py --time-limit 420 --out $OUT/h200-20261202.json
    TRITON_INTERPRET=1 python benchmarks/bench_gpu.py --dry-run --out /tmp/dry.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
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

from grpo_fast.benchmarking import baselines as bench_baselines
from grpo_fast.benchmarking import harness as bench

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
LONGCTX_IMPLS = ("grpo_fast-triton", "trl")
PREAMBLE_COPY_MB = 1024
TRUTH_SHAPE = (2, 1024, 2048, 151936)  # (B, T, H, V): the real vocabulary, an fp64 truth in seconds
# --dry-run: the same phases at tiny shapes on the CPU.
DRY = dict(
    shapes=[(64, 24, 301), (96, 40, 517)],
    truth=(2, 37, 67, 1013),
    preamble=(64, 64, 1024),
    copy_mb=16,
    longctx=(24, 301),
    seq_len=16,
)


def device_inputs(case: bench.BenchCase, seed: int) -> dict:
    """bench.make_inputs's batch, drawn on the device (fast at these sizes), every token unmasked."""
    dtype, device = bench.DTYPES[case.dtype], torch.device(case.device)
    gen = torch.Generator(device=device).manual_seed(seed)
    B, T = case.B, case.T

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    inputs = dict(
        hidden=randn(B, T, case.H, scale=0.5).requires_grad_(True),
        weight=randn(case.V, case.H, scale=case.H**-0.5).requires_grad_(True),
        targets=torch.randint(0, case.V, (B, T), generator=gen, device=device),
        mask=torch.ones(B, T, dtype=torch.bool, device=device),
        advantages=torch.randn(B, generator=gen, device=device),
    )
    base = -math.log(case.V)  # a random model's log-probs; old/ref a little off so ratios vary
    if case.with_old:
        inputs["old_logp"] = base + 0.1 * torch.randn(B, T, generator=gen, device=device)
    if case.beta:
        inputs["ref_logp"] = base + 0.1 * torch.randn(B, T, generator=gen, device=device)
    return inputs


def gemm_ms(case: bench.BenchCase, iters: int) -> float:
    dtype, device = bench.DTYPES[case.dtype], torch.device(case.device)
    a = torch.randn(case.N, case.H, device=device, dtype=dtype)
    b = torch.randn(case.V, case.H, device=device, dtype=dtype)
    return bench._median_ms([lambda: torch.mm(a, b.t())], case.device, iters, warmup=2)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


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


class Deadline:
    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def passed(self) -> bool:
        return self.end is not None and time.monotonic() > self.end


def measure_row(impl: str, case: bench.BenchCase, gemm: float, iters: int, pre: dict) -> dict:
    """One implementation at one case: a row of the results table (``error`` set when it failed)."""
    flops = gpu_model.flops(impl, case.N, case.H, case.V)
    rows = gpu_model.chunk_rows(impl, case.N, case.V, case.dtype, case.device)
    row = dict(impl=impl, N=case.N, H=case.H, V=case.V, dtype=case.dtype, beta=case.beta)
    row.update(ms=None, tflops=None, gemm_ratio=None, peak_mb=None, gemm_ms=gemm, chunk_rows=rows)
    row["predicted_ms"] = (
        gpu_model.predicted_ms(impl, case.N, case.H, case.V, case.dtype, rows, pre) if pre else None
    )
    steps: list = []
    try:
        steps = [bench.IMPLS[impl](device_inputs(case, seed), case) for seed in range(2)]
        # warmup=2: torch.compile and autotuners compile on the first calls of each input set
        ms = bench._median_ms(steps, case.device, iters, warmup=2)
        # gemm_ratio: this step's FLOP rate over the same-shape forward GEMM's (2NHV in gemm ms).
        row.update(
            ms=ms, tflops=flops / ms / 1e9, gemm_ratio=flops / (2.0 * case.N * case.H * case.V) * gemm / ms
        )
        row["peak_mb"] = peak_above_inputs_mb(steps[0], case.device)
    except Exception as err:  # one failing implementation must not stop the run
        row["error"] = "OOM" if _is_oom(err) else f"{type(err).__name__}: {err}"[:500]
        if not _is_oom(err):
            traceback.print_exc()
    finally:
        del steps
        _free()
    return row


def run_table(args, results: Results, impls: list[str], deadline: Deadline) -> None:
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
            if deadline.passed():
                print("time limit reached: stopping (re-run with the same --out to resume)", flush=True)
                return
            gemm = gemm_ms(case, args.iters)
            print(f"N={n} H={h} V={v} beta={beta}: cuBLAS GEMM {gemm:.2f} ms", flush=True)
            for impl in todo:
                if deadline.passed():
                    print("time limit reached: stopping (re-run with the same --out to resume)", flush=True)
                    return
                row = measure_row(impl, case, gemm, args.iters, pre)
                results.add("rows", row)
                if row.get("error"):
                    print(f"  {impl:<18} failed: {row['error'][:120]}", flush=True)
                else:
                    peak = f"{row['peak_mb']:9.0f} MB" if row["peak_mb"] is not None else "n/a"
                    model = f"{row['predicted_ms']:9.2f}" if row["predicted_ms"] is not None else "      n/a"
                    print(
                        f"  {impl:<31} {row['ms']:9.2f} ms (model {model}) {row['tflops']:7.1f} TFLOP/s "
                        f"{100 * row['gemm_ratio']:5.1f}% of cuBLAS  peak {peak}",
                        flush=True,
                    )


# ---------------------------------------------------------------- long context


class OutOfTime(Exception):
    """The run's deadline passed in the middle of a long-context search."""


def probe_peak_bytes(impl: str, n: int, args, budget: int, deadline: Deadline) -> int | None:
    """Total peak bytes (inputs included) of one step at N=n, or None when it runs out of the budget.

    On the CPU (``--dry-run``) the step runs (the code path is what is rehearsed) and the bytes are the
    inputs' own: the CUDA allocator is what measures peaks."""
    if deadline.passed():
        raise OutOfTime
    h, v = args.longctx_shape
    case = bench.BenchCase(N=n, H=h, V=v, B=max(1, n // args.seq_len), dtype=args.dtype, device=args.device)
    _free()
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        inputs = device_inputs(case, 0)
        step = bench.IMPLS[impl](inputs, case)
        step()
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = sum(t.numel() * t.element_size() for t in inputs.values() if torch.is_tensor(t))
    except Exception as err:
        if not _is_oom(err):
            raise
        peak = None
    finally:
        inputs = step = None  # noqa: F841 - drop the inputs before the next probe
        _free()
    return peak if peak is not None and peak <= budget else None


def largest_fitting(probe: Callable[[int], int | None], budget: int, step: int, cap: int) -> tuple[int, list]:
    """Largest multiple of `step`, at most `cap`, whose probe fits (0 if none); also the probes made,
    as [N, peak bytes or None].

    Peak memory is affine in N once the chunking is fixed, so two probes predict the answer, and two more
    confirm it (it fits, one step more does not). Where the model is off, the bracket found is bisected.
    """
    log: list = []

    def fits(n: int) -> bool:
        peak = probe(n)
        log.append([n, peak])
        return peak is not None

    down = lambda x: int(x) // step * step  # noqa: E731
    lo, hi = 0, None  # lo fits (0: nothing yet); hi does not (None: unknown)
    for n in (8 * step, 16 * step):
        if n > cap:
            break
        if not fits(n):
            hi = n
            break
        lo = n
    if hi is None and len(log) == 2:
        (n1, p1), (n2, p2) = log
        slope = max((p2 - p1) / (n2 - n1), 1.0)
        guess = min(cap, down(n2 + (budget - p2) / slope))
        if guess > lo:
            if fits(guess):
                lo = guess
            else:
                hi = guess
        while hi is None and lo < cap and len(log) < 12:  # confirm one step more fails; grow if it fits
            n = min(cap, lo + step if len(log) <= 3 else max(lo + step, down(lo * 1.25)))
            if fits(n):
                lo = n
            else:
                hi = n
    if hi is None:  # everything tried fits: the cap (or the first probes) bound the answer
        return lo, log
    while hi - lo > step and len(log) < 24:
        mid = down((lo + hi) // 2)
        if mid <= lo:
            break
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, log


def run_longctx(args, results: Results, impls: list[str], deadline: Deadline) -> None:
    budget = int(args.budget_gb * 1e9)
    cuda = args.device.startswith("cuda")
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        # The allocator refuses past the budget: a run that cannot fit fails fast instead of filling the card.
        torch.cuda.set_per_process_memory_fraction(min(1.0, (budget + 2**30) / total))
    h, v = args.longctx_shape
    try:
        for impl in [i for i in LONGCTX_IMPLS if i in impls]:
            if results.has_long(impl):
                continue
            if deadline.passed():
                print("time limit reached: stopping (re-run with the same --out to resume)", flush=True)
                return
            t0 = time.monotonic()
            row = dict(impl=impl, H=h, V=v, dtype=args.dtype, budget_gb=args.budget_gb, dry_run=not cuda)
            try:
                n, probes = largest_fitting(
                    lambda n, impl=impl: probe_peak_bytes(impl, n, args, budget, deadline),
                    budget,
                    args.seq_len,
                    args.max_n,
                )
                row.update(max_N=n, capped=n >= args.max_n, probes=probes)
            except OutOfTime:
                row.update(max_N=None, error="the run's time limit passed during the search")
            except Exception as err:
                traceback.print_exc()
                row.update(max_N=None, error=f"{type(err).__name__}: {err}"[:500])
            results.add("long_context", row)
            print(f"  {impl:<18} largest N in {args.budget_gb:g} GB: {row['max_N']} "
                  f"({time.monotonic() - t0:.0f} s)", flush=True)  # fmt: skip
    finally:
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0)


# ---------------------------------------------------------------- command line


PHASES = ("preamble", "truth", "table", "longctx", "report")


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
    args.preamble_shape = DRY["preamble"] if dry else None
    args.copy_mb = DRY["copy_mb"] if dry else PREAMBLE_COPY_MB
    shapes = DRY["shapes"] if dry else SHAPES
    args.shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape] if args.shape else shapes
    args.preamble_shape = args.preamble_shape or args.shapes[0]
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
    deadline = Deadline(args.time_limit)
    print(f"{env['device']}, torch {env['torch']}, triton {env['triton']}: {impls} -> {out}", flush=True)
    if "preamble" in args.phases and not results.data["preamble"]:
        pre = gpu_model.preamble(args.device, args.dtype, args.preamble_shape, args.copy_mb, args.iters)
        results.data["preamble"] = pre
        results.save()
        print(
            f"preamble: GEMM {pre['gemm']['tflops']:.1f} TFLOP/s, copy {pre['copy']['gbs']:.0f} GB/s",
            flush=True,
        )
    if "truth" in args.phases:

        def add(entry: dict) -> None:
            if not results.has_truth(entry):
                results.add("truth", entry)

        gpu_truth.run_truth(args.device, args.dtype, args.truth_shape, add, deadline.passed)
    if "table" in args.phases:
        run_table(args, results, impls, deadline)
    if "longctx" in args.phases:
        run_longctx(args, results, impls, deadline)
    if "report" in args.phases and results.data["rows"]:
        gpu_report.write(results.data, out, IMPLS)
        print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
