"""The GPU kit's ``seqpar`` phase: the Ulysses attention's inner kernels on CUDA, then the sequence-parallel
benchmark.

    python benchmarks/gpu_seqpar.py --out KERNELS.json --bench-out SEQPAR.json [--time-limit S] [--dry-run]

(a) Kernels: flex attention (compiled) and, when ``flash_attn`` imports, FlashAttention's varlen kernel, on
one packed row of several segments (the whole sequence and a rank's share of the heads, GQA), fp32 and
bf16 (flash: bf16 only), forward and backward, each against fp64 sdpa with the explicit block-diagonal
mask; sdpa with that mask in the same dtype is measured beside it, and a kernel passes when its error is
within twice sdpa's (plus a small floor). Times: median forward and forward + backward in ms, the segment
layout built once (the trainer builds it once per forward, for every layer). (b) bench_sequence_parallel.py
at P = 1, 2, 4 with the time that is left: P > 1 only with P GPUs (NCCL), else on its record as skipped.

``--dry-run``: the CPU at tiny shapes, fp32, flex eager (forward only: it has no backward on the CPU),
then the benchmark's dry run; measures nothing worth keeping. Exit status: 1 a kernel disagrees, 3 cut by
the time limit, else 0.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from datetime import date
from pathlib import Path

import bench_sequence_parallel
from step_timing import measure

GPU_SEGMENTS, CPU_SEGMENTS = (1000, 37, 2048, 1011), (5, 11, 3, 13)  # one packed row, odd lengths
FLOOR = {"float32": 1e-5, "bfloat16": 2e-3}  # relative error any kernel may have whatever sdpa's is


def packed_positions(segments: tuple[int, ...], device: str):
    """``[1, S]`` positions restarting at 0 for each segment."""
    import torch

    return torch.cat([torch.arange(n) for n in segments]).unsqueeze(0).to(device)


def _rel(x, ref) -> float:
    return float((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _run(kernel: str, q, k, v, grad, layout, backward: bool):
    """Output and (with ``backward``) the gradients of q, k, v of ``kernel`` on fresh leaves of q, k, v."""
    from grpo_fast.integrations.ulysses_kernels import attend

    leaves = [x.detach().requires_grad_(backward) for x in (q, k, v)]
    out = attend(kernel, *leaves, layout, None, 0.0, None)
    if not backward:
        return out.detach(), None
    out.backward(grad.to(out.dtype))
    return out.detach(), [x.grad for x in leaves]


def _errors(got, truth) -> dict[str, float]:
    out, grads = got
    errors = {"out": _rel(out, truth[0])}
    if grads is not None:
        for name, g, t in zip(("dq", "dk", "dv"), grads, truth[1], strict=True):
            errors[name] = _rel(g, t)
    return errors


def _median_ms(fn, device: str, iters: int) -> float:
    """Median milliseconds of ``iters`` calls after a warm-up (which compiles): step_timing.measure's."""
    return round(statistics.median(measure(fn, device, iters, warmup_in_peak=False)[0]) * 1e3, 3)


def check_kernels(device: str, dry_run: bool, time_limit: float | None, iters: int = 5) -> list[dict]:
    """One row per (kernel, dtype): errors against fp64, sdpa's errors, ok, times."""
    import torch

    from grpo_fast.integrations.ulysses_kernels import SegmentLayout, flash_available

    start = time.monotonic()
    if device != "cuda":  # eager flex is the point on the CPU: it says it is slow
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    segments = CPU_SEGMENTS if dry_run else GPU_SEGMENTS
    heads, kv_heads, dim = (4, 2, 16) if dry_run else (8, 2, 64)
    size = sum(segments)
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (
        torch.randn(1, h, size, dim, generator=g, dtype=torch.float64).to(device)
        for h in (heads, kv_heads, kv_heads, heads)
    )
    grad = grad.transpose(1, 2)  # the kernels return [B, S, H, D]
    layout = SegmentLayout(packed_positions(segments, device))
    truth = _run("sdpa", q, k, v, grad, layout, backward=True)
    kernels = ["flex"] + (["flash"] if device == "cuda" and flash_available() else [])
    dtypes = [torch.float32] if dry_run or device != "cuda" else [torch.float32, torch.bfloat16]
    rows = []
    for kernel in kernels:
        for dtype in dtypes:
            name = str(dtype).removeprefix("torch.")
            row = dict(kernel=kernel, dtype=name, segments=list(segments), heads=heads, kv_heads=kv_heads)
            row["dim"] = dim
            if kernel == "flash" and dtype == torch.float32:
                continue  # FlashAttention runs fp16/bf16 only
            if time_limit is not None and time.monotonic() - start > time_limit:
                rows.append(dict(row, ok=None, skipped="time limit"))
                continue
            backward = device == "cuda"  # eager flex on the CPU has no backward
            inputs = [x.to(dtype) for x in (q, k, v)]
            kernel_layout = SegmentLayout(layout.positions)  # its own mask / block mask / cu_seqlens
            try:
                errors = _errors(_run(kernel, *inputs, grad, kernel_layout, backward), truth)
                reference = _errors(_run("sdpa", *inputs, grad, layout, backward), truth)
                ok = all(errors[key] <= 2 * reference[key] + FLOOR[name] for key in errors)
                row.update(ok=ok, rel_err={k: float(f"{e:.3g}") for k, e in errors.items()})
                row["sdpa_rel_err"] = {k: float(f"{e:.3g}") for k, e in reference.items()}
                for label, which, lay in (("", kernel, kernel_layout), ("sdpa_", "sdpa", layout)):
                    for suffix, back in (("fwd_ms", False), ("fwd_bwd_ms", True))[: 1 + backward]:
                        call = functools.partial(_run, which, *inputs, grad, lay, back)
                        row[label + suffix] = _median_ms(call, device, iters)
            except Exception as err:  # on the record, and the phase fails
                row.update(ok=False, error=f"{type(err).__name__}: {err}"[:500])
            if not backward:
                row["note"] = "forward only: eager flex has no backward on the CPU"
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the kernels' record (JSON)")
    parser.add_argument("--bench-out", type=Path, required=True, help="bench_sequence_parallel.py's record")
    parser.add_argument("--time-limit", type=float, default=None, help="start nothing after this many s")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    start = time.monotonic()
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    half = None if args.time_limit is None else args.time_limit / 2
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    try:
        import flash_attn

        flash = flash_attn.__version__
    except ImportError:
        flash = None
    record = dict(
        what="Ulysses inner attention kernels on a packed row against fp64 sdpa with the block-diagonal mask",
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        date=str(date.today()),
        commit=commit.strip() or os.environ.get("GRPO_FAST_COMMIT", ""),
        torch=torch.__version__,
        flash_attn=flash,
        dry_run=args.dry_run,
        rows=check_kernels(device, args.dry_run, half),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}", flush=True)
    if args.dry_run:
        bench = ["--dry-run"]
    else:  # the backbone-bound model at lengths one GPU holds; P > 1 needs as many GPUs
        bench = ["--device", device, "--bf16", "--lengths", "8192", "16384", "--budget-mb", "40960"]
    if args.time_limit is not None:
        left = args.time_limit - (time.monotonic() - start)
        # Each case runs in fresh processes, to its end: none starts in the last third.
        bench += ["--time-limit", str(max(0.0, left * 2 / 3))]
    status = bench_sequence_parallel.main([*bench, "--out", str(args.bench_out)])
    if any(row.get("ok") is False for row in record["rows"]):
        return 1
    return 3 if status == 3 or any(row.get("skipped") for row in record["rows"]) else status


if __name__ == "__main__":
    sys.exit(main())
