"""CPU benchmark of the per-chunk pass alone: native (grpo_fast._C) against the plain torch ops.

Times the row-wise softmax work the chunk loop runs on each ``[C, V]`` logits tile, without the GEMMs
around it: ``token_pass_`` (stats + per-token GRPO terms + dlogits in place, the token-level loss's
only per-chunk call), ``stats`` and ``grad_``. Each timed call gets a fresh copy of the tile (the copy
is not timed). C defaults to the chunk size the loss itself picks for V on the CPU.

    python benchmarks/bench_chunk_cpu.py                      # C = auto, V = 65536, fp32, 2 threads
    python benchmarks/bench_chunk_cpu.py --vocab 151936 --dtype bfloat16 --threads 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import grpo_fast as gf
from grpo_fast.chunk_ops import TorchChunkOps
from grpo_fast.chunking import auto_chunk_size
from grpo_fast.native_ops import NativeChunkOps

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def median_ms(fn, tile: torch.Tensor, iters: int) -> float:
    times = []
    for i in range(iters + 1):
        work = tile.clone()
        t0 = time.perf_counter()
        fn(work)
        if i:  # the first call warms up
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=None, help="C (default: the loss's CPU chunk size)")
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    dtype, vocab = DTYPES[args.dtype], args.vocab
    rows = args.rows or auto_chunk_size(1 << 20, vocab, dtype, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    tile = (torch.randn(rows, vocab, generator=gen) * 2).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    base = -float(torch.log(torch.tensor(float(vocab))))
    old = base + 0.1 * torch.randn(rows, generator=gen)
    ref = base + 0.1 * torch.randn(rows, generator=gen)
    adv = torch.randn(rows, generator=gen)
    w = torch.full((rows,), 1.0 / rows)
    lse = TorchChunkOps().stats(tile.clone(), targets, args.temperature)[0]
    g = torch.randn(rows, generator=gen)
    cfg = gf.GRPOConfig(loss_type="dapo", epsilon_high=0.28, beta=0.04, temperature=args.temperature)

    print(
        f"per-chunk pass on the CPU: tile [{rows}, {vocab}] {args.dtype}, {args.threads} threads, "
        f"median of {args.iters} (torch {torch.__version__})"
    )
    print(f"{'pass':<12} {'torch ms':>10} {'native ms':>10} {'speed-up':>9} {'native GB/s':>12}")
    for name, call in (
        ("token_pass_", lambda ops, x: ops.token_pass_(x, targets, old, ref, adv, w, cfg)),
        ("stats", lambda ops, x: ops.stats(x, targets, args.temperature)),
        ("grad_", lambda ops, x: ops.grad_(x, targets, lse, g, args.temperature)),
    ):
        ms = {
            ops.name: median_ms(lambda x, ops=ops, call=call: call(ops, x), tile, args.iters)
            for ops in (TorchChunkOps(), NativeChunkOps())
        }
        # Bytes the native pass must move: token_pass_ reads the tile twice and writes it once.
        passes = {"token_pass_": 3, "stats": 1, "grad_": 2}[name]
        gbs = passes * tile.numel() * tile.element_size() / (ms["native"] * 1e-3) / 1e9
        print(
            f"{name:<12} {ms['torch']:>10.2f} {ms['native']:>10.2f} "
            f"{ms['torch'] / ms['native']:>8.2f}x {gbs:>12.1f}"
        )


if __name__ == "__main__":
    main()
