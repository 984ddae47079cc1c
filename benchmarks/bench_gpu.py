"""GPU benchmark of the whole GRPO loss (forward + backward) against the tools users pick today.

Phases:

- ``table``: the issue's shapes (N, H, V) in bf16, dapo, token level, with old log-probs, once with
  beta=0 and once with beta=0.04 and ref log-probs, for every implementation in one run: median ms,
  effective TFLOP/s (6*N*H*V / time), the ratio to a cuBLAS GEMM of the same shape measured in the same
  run (``3 * gemm_ms / ms``: 1.0 means the three GEMMs of forward + backward at cuBLAS speed, nothing
  else), and the peak memory above the inputs;
- ``longctx``: per implementation, the largest N that fits a memory budget (default 40 GB, inputs
  included) at H=4096, V=151936;
- ``report``: the PNG chart and the README's markdown tables, from the results file.

Every token is unmasked, so 6*N*H*V is the work each implementation must do (none may skip padding).
Results go to ``benchmarks/results/<device>-<yyyymmdd>.json`` (``--out``), rewritten after each row, so
a run cut short keeps what it measured; a re-run with the same ``--out`` resumes, skipping rows on
record. ``--time-limit`` stops starting new measurements after that many seconds.

    python benchmarks/bench_gpu.py --phase table --time-limit 500
    python benchmarks/bench_gpu.py --phase longctx
    python benchmarks/bench_gpu.py --phase report --out benchmarks/results/<file>.json
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

import torch

from grpo_fast.benchmarking import baselines as bench_baselines
from grpo_fast.benchmarking import harness as bench

ROOT = Path(__file__).resolve().parent
SHAPES = [(8192, 4096, 151936), (16384, 4096, 128256), (4096, 2048, 151936), (32768, 3584, 152064)]
BETAS = [0.0, 0.04]
IMPLS = ["reference", "trl", "liger", "torch-compile", "grpo_fast-triton", "grpo_fast-native"]
SEQ_LEN = 1024  # tokens per completion: N = B * SEQ_LEN
LONGCTX_SHAPE = (4096, 151936)


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
        data.setdefault("rows", [])
        data.setdefault("long_context", [])
        return cls(path, data)

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


def measure_row(impl: str, case: bench.BenchCase, gemm: float, iters: int) -> dict:
    """One implementation at one case: a row of the results table (``error`` set when it failed)."""
    flops = 6.0 * case.N * case.H * case.V
    row = dict(impl=impl, N=case.N, H=case.H, V=case.V, dtype=case.dtype, beta=case.beta)
    row.update(ms=None, tflops=None, gemm_ratio=None, peak_mb=None, gemm_ms=gemm)
    steps: list = []
    try:
        steps = [bench.IMPLS[impl](device_inputs(case, seed), case) for seed in range(2)]
        # warmup=2: torch.compile and autotuners compile on the first calls of each input set
        ms = bench._median_ms(steps, case.device, iters, warmup=2)
        row.update(ms=ms, tflops=flops / ms / 1e9, gemm_ratio=3.0 * gemm / ms)
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
    for n, h, v in args.shapes:
        for beta in args.betas:
            case = bench.BenchCase(
                N=n, H=h, V=v, B=max(1, n // SEQ_LEN), dtype=args.dtype, device=args.device, beta=beta
            )
            todo = [i for i in impls if not results.has_row(i, case)]
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
                row = measure_row(impl, case, gemm, args.iters)
                results.add("rows", row)
                if row.get("error"):
                    print(f"  {impl:<18} failed: {row['error'][:120]}", flush=True)
                else:
                    peak = f"{row['peak_mb']:9.0f} MB" if row["peak_mb"] is not None else "n/a"
                    print(
                        f"  {impl:<18} {row['ms']:9.2f} ms {row['tflops']:7.1f} TFLOP/s "
                        f"{100 * row['gemm_ratio']:5.1f}% of cuBLAS  peak {peak}",
                        flush=True,
                    )


# ---------------------------------------------------------------- long context


def probe_peak_bytes(impl: str, n: int, args, budget: int) -> int | None:
    """Total peak bytes (inputs included) of one step at N=n, or None when it runs out of the budget."""
    h, v = LONGCTX_SHAPE
    case = bench.BenchCase(N=n, H=h, V=v, B=max(1, n // SEQ_LEN), dtype=args.dtype, device=args.device)
    _free()
    torch.cuda.reset_peak_memory_stats()
    try:
        step = bench.IMPLS[impl](device_inputs(case, 0), case)
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    except Exception as err:
        if not _is_oom(err):
            raise
        peak = None
    finally:
        step = None  # noqa: F841 - drop the inputs before the next probe
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
    if not args.device.startswith("cuda"):
        print("long-context search needs CUDA (peak memory from the CUDA allocator): skipped")
        return
    budget = int(args.budget_gb * 1e9)
    total = torch.cuda.get_device_properties(0).total_memory
    # The allocator refuses past the budget: a run that cannot fit fails fast instead of filling the card.
    torch.cuda.set_per_process_memory_fraction(min(1.0, (budget + 2**30) / total))
    try:
        for impl in impls:
            if results.has_long(impl):
                continue
            if deadline.passed():
                print("time limit reached: stopping (re-run with the same --out to resume)", flush=True)
                return
            t0 = time.monotonic()
            try:
                n, probes = largest_fitting(
                    lambda n, impl=impl: probe_peak_bytes(impl, n, args, budget), budget, SEQ_LEN, args.max_n
                )
                row = dict(impl=impl, H=LONGCTX_SHAPE[0], V=LONGCTX_SHAPE[1], dtype=args.dtype)
                row.update(budget_gb=args.budget_gb, max_N=n, capped=n >= args.max_n, probes=probes)
            except Exception as err:
                traceback.print_exc()
                row = dict(impl=impl, H=LONGCTX_SHAPE[0], V=LONGCTX_SHAPE[1], dtype=args.dtype)
                row.update(budget_gb=args.budget_gb, max_N=None, error=f"{type(err).__name__}: {err}"[:500])
            results.add("long_context", row)
            print(f"  {impl:<18} largest N in {args.budget_gb:g} GB: {row['max_N']} "
                  f"({time.monotonic() - t0:.0f} s)", flush=True)  # fmt: skip
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


# ---------------------------------------------------------------- report


def markdown(data: dict) -> str:
    """The README's tables: speed and memory per shape, then the long-context table."""
    dtypes = ", ".join(sorted({r["dtype"] for r in data["rows"]}))
    lines = [
        f"Device: {data.get('device')}, torch {data.get('torch')}, triton {data.get('triton')}, "
        f"commit {data.get('commit')}. Forward + backward of the whole GRPO loss (dapo, token level, "
        f"old log-probs; beta=0.04 adds ref log-probs), {dtypes}, every token unmasked.",
        "",
        "| N | H | V | beta | implementation | ms | TFLOP/s | vs cuBLAS GEMM | peak MB above inputs "
        "| speed-up vs reference |",
        "|---:|---:|---:|---:|:---|---:|---:|---:|---:|---:|",
    ]
    ref = {(r["N"], r["H"], r["V"], r["beta"]): r for r in data["rows"] if r["impl"] == "reference"}
    for r in data["rows"]:
        base = ref.get((r["N"], r["H"], r["V"], r["beta"]))
        if r.get("ms") is None:
            cells = [r.get("error", "failed")[:40], "", "", "", ""]
        else:
            speed = f"{base['ms'] / r['ms']:.2f}x" if base and base.get("ms") else ""
            peak = f"{r['peak_mb']:.0f}" if r.get("peak_mb") is not None else ""
            cells = [f"{r['ms']:.1f}", f"{r['tflops']:.0f}", f"{100 * r['gemm_ratio']:.0f}%", peak, speed]
        head = f"| {r['N']} | {r['H']} | {r['V']} | {r['beta']} | {r['impl']} | "
        lines.append(head + " | ".join(cells) + " |")
    if data.get("long_context"):
        lines += ["", "| implementation | largest N in budget | H | V | budget |"]
        lines += ["|:---|---:|---:|---:|---:|"]
        for r in data["long_context"]:
            n = r.get("max_N")
            shown = "error" if n is None else (f">= {n}" if r.get("capped") else str(n))
            lines.append(f"| {r['impl']} | {shown} | {r['H']} | {r['V']} | {r['budget_gb']:g} GB |")
    return "\n".join(lines) + "\n"


def chart(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if r.get("ms") is not None]
    cases = sorted({(r["N"], r["H"], r["V"], r["beta"]) for r in data["rows"]})
    present = list(dict.fromkeys(r["impl"] for r in data["rows"]))
    impls = [i for i in IMPLS if i in present] + [i for i in present if i not in IMPLS]
    panels = 3 if data.get("long_context") else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5))
    width = 0.8 / max(len(impls), 1)
    for k, impl in enumerate(impls):
        by_case = {(r["N"], r["H"], r["V"], r["beta"]): r for r in rows if r["impl"] == impl}
        xs = [i + k * width for i in range(len(cases))]
        speed = [100 * by_case[c]["gemm_ratio"] if c in by_case else 0.0 for c in cases]
        memory = [(by_case[c]["peak_mb"] or 0.0) / 1024 if c in by_case else 0.0 for c in cases]
        axes[0].bar(xs, speed, width, label=impl)
        axes[1].bar(xs, memory, width, label=impl)
    labels = [f"{n // 1024}k x {h} x {v // 1000}k\nbeta={b}" for n, h, v, b in cases]
    for ax, title in zip(axes[:2], ("speed: % of cuBLAS GEMM rate (3 GEMMs)", "peak GiB above inputs"),
                         strict=True):  # fmt: skip
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], labels, fontsize=7)
        ax.set_title(title)
    if any(r["peak_mb"] and r["peak_mb"] > 0 for r in rows):  # NaN on CPU smoke runs
        axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    if panels == 3:
        longs = [r for r in data["long_context"] if r.get("max_N")]
        axes[2].barh([r["impl"] for r in longs], [r["max_N"] / 1024 for r in longs])
        budget = data["long_context"][0]["budget_gb"]
        h, v = LONGCTX_SHAPE
        axes[2].set_title(f"largest N (k tokens) in {budget:g} GB, H={h}, V={v}")
    dtypes = ", ".join(sorted({r["dtype"] for r in data["rows"]}))
    fig.suptitle(f"GRPO loss, forward + backward, {data.get('device')}, {dtypes}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phase", choices=["table", "longctx", "report", "all"], default="all")
    p.add_argument("--out", type=Path, help="results JSON (default: results/<device>-<date>.json)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(bench.DTYPES))
    p.add_argument("--impl", action="append", help="implementations (default: every one that can run)")
    p.add_argument("--shape", action="append", metavar="N,H,V", help="default: the issue's four shapes")
    p.add_argument("--beta", action="append", type=float, help="default: 0 and 0.04")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--budget-gb", type=float, default=40.0)
    p.add_argument("--max-n", type=int, default=2**21, help="largest N the long-context search tries")
    p.add_argument("--time-limit", type=float, default=None, help="seconds; then stop starting new work")
    args = p.parse_args(argv)
    args.shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape] if args.shape else SHAPES
    args.betas = args.beta or BETAS
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = environment()
    out = args.out or default_out(env["device"])
    results = Results.open(out, env)
    if args.impl:
        unknown = [i for i in args.impl if i not in bench.IMPLS]
        if unknown:
            raise SystemExit(f"unknown implementations {unknown}; known: {sorted(bench.IMPLS)}")
        impls = args.impl
    else:
        impls = [i for i in IMPLS if i in bench.IMPLS and bench_baselines.runnable(i, args.device)]
    deadline = Deadline(args.time_limit)
    print(f"{env['device']}, torch {env['torch']}, triton {env['triton']}: {impls} -> {out}", flush=True)
    if args.phase in ("table", "all"):
        run_table(args, results, impls, deadline)
    if args.phase in ("longctx", "all"):
        run_longctx(args, results, impls, deadline)
    if args.phase in ("report", "all") and results.data["rows"]:
        out.with_suffix(".md").write_text(markdown(results.data))
        chart(results.data, out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
