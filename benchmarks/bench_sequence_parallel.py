"""Sequence-parallel record: per-rank peak memory and time of one thin-trainer training step at growing
completion lengths, with each packed row shared by P = 1, 2, 4 processes (Ulysses attention, FSDP2 over
the P processes as the trainer runs ``parallelism: fsdp``, padding-free rows).

    python benchmarks/bench_sequence_parallel.py --lengths 1024 2048 4096 \
        --out benchmarks/results/sequence-parallel-cpu-DATE.json

The step is bench_longctx.py's thin step (the trainer's update on one prompt's G completions: forward,
dapo loss, backward; no generation, optimizer step left out) with ``sequence_parallel_size`` P. Every
case (a length and a P) runs in P fresh processes (gloo on the CPU, NCCL on CUDA, one GPU each; a P the
machine has too few GPUs for is on the record as skipped). P = 1 is one process, as a user runs it. The
model is the long-context record's backbone-bound one unless the flags say otherwise: a Qwen2 with vocab
16384, hidden 256, 8 layers, 4 heads and 2 key/value heads, sdpa attention (the Ulysses attention's inner
kernel: sdpa on each packed segment on the CPU, ``auto`` on CUDA), fp32 unless ``--bf16``.

Peak memory of a rank: on the CPU the resident set's high-water mark above what the process held before
the step; on CUDA torch's peak allocation above the allocation before it (step_timing.measure). The
record (rewritten after every case, a PNG beside it) has each rank's peak and their max, the step time
(the slowest rank's), the longest length each P keeps within ``--budget-mb`` per rank, and the ratios
peak(P)/peak(1) at the longest length P = 1 keeps within it (and at every length P = 1 was measured).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import date
from pathlib import Path

from bench_longctx import PROMPT, _thin_step, append_to, completion_lengths, largest_fits, plot_steps
from step_timing import measure

TARGETS = {2: 0.6, 4: 0.35}  # peak(P) / peak(1) per rank, at the longest length P = 1 fits


def _threads(args, world: int) -> int:
    """Threads per process on the CPU: ``--threads``, or the cores shared out."""
    return args.threads or max(1, (os.cpu_count() or 1) // world)


def _rank(rank: int, world: int, init: str, args, tokens: int, queue) -> None:
    """One rank of a case: its step's peak memory and median time on ``queue``; the process then ends at
    once (gloo's threads may abort an interpreter's teardown on a loaded machine, as tests/spawn.py says)."""
    code = 0
    try:
        import torch
        import torch.distributed as dist

        os.environ["LOCAL_RANK"] = str(rank)  # the trainer's device: cuda:LOCAL_RANK
        if args.device == "cuda":
            torch.cuda.set_device(rank)
        else:
            torch.set_num_threads(_threads(args, world))
        if world > 1:
            backend = "nccl" if args.device == "cuda" else "gloo"
            dist.init_process_group(backend, init_method=f"file://{init}", rank=rank, world_size=world)
        options = dict(sequence_parallel_size=world, parallelism="fsdp")
        step = _thin_step("thin-padding-free", args, tokens, args.device, **options)
        times, peak = measure(step, args.device, args.iters, warmup_in_peak=True)  # the warm-up counts
        queue.put(dict(rank=rank, step_s=statistics.median(times), peak_mb=round(peak, 1)))
        if world > 1:
            dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        code = 1
    queue.close()
    queue.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_case(args, tokens: int, world: int) -> dict:
    """``{peak_mb_ranks, peak_mb, step_s}`` of one case in ``world`` fresh processes, or ``{error}``."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = str(Path(tmp) / "rendezvous")
        procs = [ctx.Process(target=_rank, args=(r, world, init, args, tokens, queue)) for r in range(world)]
        for p in procs:
            p.start()
        results: list[dict] = []
        while any(p.is_alive() for p in procs):
            while not queue.empty():
                results.append(queue.get())
            if any(p.exitcode not in (None, 0) for p in procs):  # the others would wait in a collective
                for p in procs:
                    if p.is_alive():
                        p.terminate()
            time.sleep(0.2)
        for p in procs:
            p.join()
        while not queue.empty():
            results.append(queue.get())
    codes = [p.exitcode for p in procs]
    if any(codes) or len(results) != world:  # out of memory (killed) or a crash: on the record as such
        return dict(peak_mb=None, step_s=None, error=f"exit codes {codes}")
    results.sort(key=lambda r: r["rank"])
    peaks = [r["peak_mb"] for r in results]
    return dict(peak_mb_ranks=peaks, peak_mb=max(peaks), step_s=max(r["step_s"] for r in results))


def ratios(rows: list[dict], budget_mb: float) -> dict:
    """peak(P) / peak(1) per rank: at the longest length P = 1 keeps within the budget (``at_tokens``;
    None when it fits none), and at every length where both were measured (``by_length``)."""
    peaks = {(r["P"], r["completion_tokens"]): r["peak_mb"] for r in rows if r.get("peak_mb")}
    by_length: dict[str, dict[str, float]] = {}
    for (p, tokens), peak in sorted(peaks.items()):
        if p > 1 and (1, tokens) in peaks:
            by_length.setdefault(str(tokens), {})[str(p)] = round(peak / peaks[(1, tokens)], 3)
    at = largest_fits(rows, budget_mb, key="P").get("1")
    at_fit = by_length.get(str(at), {})
    meets = {str(p): at_fit[str(p)] <= target for p, target in TARGETS.items() if str(p) in at_fit}
    return dict(at_tokens=at, at_fit=at_fit, by_length=by_length, targets=TARGETS, meets_targets=meets)


def plot(record: dict, path: Path) -> None:
    shape = record["shape"]
    title = (
        f"one thin-trainer step, Ulysses over P ranks (FSDP2, padding-free), {shape['completions']} "
        f"completions; Qwen2 vocab {shape['vocab']}, hidden {shape['hidden']}, {shape['layers']} layers, "
        f"{record['dtype']}; {record['device']}"
    )
    sizes = sorted({r["P"] for r in record["rows"]})
    series = {f"P={p}": [r for r in record["rows"] if r["P"] == p] for p in sizes}
    plot_steps(record, path, series, "peak memory per rank, max over ranks (MB)", "budget per rank", title)


def _device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}"
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4], help="P values")
    parser.add_argument("--completions", type=int, default=4)
    parser.add_argument("--spread", choices=["uniform", "none"], default="uniform")
    parser.add_argument("--iters", type=int, default=1, help="timed steps after the warm-up (median)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--budget-mb", type=float, default=2048.0, help="per-rank budget for 'largest fits'")
    parser.add_argument("--threads", type=int, default=None, help="per process (CPU; default cores / P)")
    parser.add_argument("--time-limit", type=float, default=None, help="start no case after this many s")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, P = 1 and 2 (CI)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--append", action="store_true", help="keep --out's rows, measure what is missing")
    args = parser.parse_args(argv)
    if any(p < 1 for p in args.sizes) or any(n < 1 for n in args.lengths):
        parser.error("--sizes and --lengths must be positive")
    if args.dry_run:
        args.device, args.lengths, args.sizes, args.iters = "cpu", [48], [1, 2], 1
        args.vocab, args.hidden, args.layers = 512, 32, 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    record = dict(
        what="one thin-trainer step (forward, dapo loss, backward; no generation, no optimizer step) with "
        "each packed row shared by P processes: Ulysses attention, FSDP2, padding-free",
        device=_device_name(args.device),
        date=str(date.today()),
        commit=commit.strip() or os.environ.get("GRPO_FAST_COMMIT", ""),
        torch=torch.__version__,
        dtype="bf16 autocast" if args.bf16 else "fp32",
        length_spread=args.spread,
        shape=dict(
            completions=args.completions,
            prompt_tokens=PROMPT,
            vocab=args.vocab,
            hidden=args.hidden,
            layers=args.layers,
            heads=4,
            kv_heads=2,
            attention="sdpa",
            ulysses_kernel="segments (sdpa per packed segment, causal)" if args.device == "cpu" else "auto",
        ),
        parallelism="fsdp",
        padding_free=True,
        threads_per_process={str(p): _threads(args, p) for p in args.sizes} if args.device == "cpu" else None,
        peak_memory="CPU: resident set above the process's before the step; CUDA: torch's peak allocation",
        iters=args.iters,
        budget_mb=args.budget_mb,
        dry_run=args.dry_run,
        rows=[],
    )
    if args.append and args.out and args.out.exists():
        old = append_to(record, args.out)
        record["threads_per_process"] = {**(old.get("threads_per_process") or {}),
                                         **(record["threads_per_process"] or {})} or None  # fmt: skip
    done = {(r["P"], r["completion_tokens"]) for r in record["rows"] if r.get("peak_mb") is not None}
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    cut = False
    for tokens in args.lengths:
        lengths = completion_lengths(tokens, args.completions, args.spread)
        for size in args.sizes:
            if (size, tokens) in done:
                continue
            row = dict(P=size, completion_tokens=tokens, completion_lengths=lengths)
            if args.device == "cuda" and size > gpus:
                row.update(peak_mb=None, step_s=None, skipped=f"needs {size} GPUs ({gpus} here)")
            elif args.time_limit is not None and time.monotonic() - start > args.time_limit:
                print(f"time limit: P={size} at {tokens} not run", flush=True)
                cut = True
                continue
            else:
                row.update(run_case(args, tokens, size))
            record["rows"] = [r for r in record["rows"] if (r["P"], r["completion_tokens"]) != (size, tokens)]
            record["rows"].append(row)
            record["largest_fits"] = largest_fits(record["rows"], args.budget_mb, key="P")
            record["ratios"] = ratios(record["rows"], args.budget_mb)
            print(json.dumps(row), flush=True)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(record, indent=1) + "\n")
    if args.out:
        try:
            plot(record, args.out.with_suffix(".png"))
            print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
        except ImportError as err:  # a bare image without matplotlib: the record without its chart
            print(f"wrote {args.out}; no chart: {err.name or err} is missing", flush=True)
    print(f"longest completion within {args.budget_mb} MB per rank:", json.dumps(record.get("largest_fits")))
    print("peak(P) / peak(1):", json.dumps(record.get("ratios")))
    return 3 if cut else 0  # 3: cut by the time limit (run_gpu.sh records the phase as cut)


if __name__ == "__main__":
    sys.exit(main())
