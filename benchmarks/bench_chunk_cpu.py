"""CPU benchmark of the per-chunk pass alone: native (grpo_fast._C) against the plain torch ops.

Times the row-wise softmax work the chunk loop runs on each ``[C, V]`` logits tile, without the GEMMs
around it: ``stats`` and ``grad_`` alone, ``grad_`` with the entropy-gradient term (``ent_coef``), and
``stats + grad_``, the whole per-chunk pass (statistics, then dlogits in place; the per-token GRPO math
between them runs on ``[C]`` vectors and is not timed here). Each timed call gets a fresh copy of the tile
(the copy is not timed). C defaults to the chunk size the loss itself picks for V on the CPU.

    python benchmarks/bench_chunk_cpu.py                      # C = auto, V = 65536, fp32, 2 threads
    python benchmarks/bench_chunk_cpu.py --vocab 151936 --dtype bfloat16 --threads 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from grpo_fast.backends.native_ops import NativeChunkOps
from grpo_fast.backends.torch_ops import TorchChunkOps
from grpo_fast.engine.tile_size import auto_chunk_size

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
    rows = args.rows or auto_chunk_size(1 << 20, vocab, dtype, torch.device("cpu"), TorchChunkOps.fp32_temps)
    gen = torch.Generator().manual_seed(0)
    tile = (torch.randn(rows, vocab, generator=gen) * 2).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    temperature = args.temperature
    lse, _, entropy = TorchChunkOps().stats(tile.clone(), targets, temperature)
    g = torch.randn(rows, generator=gen)
    e = 0.01 * torch.randn(rows, generator=gen)

    def pass_(ops, x, ent):
        lse, _, entropy = ops.stats(x, targets, temperature)
        terms = dict(ent_coef=e, entropy=entropy) if ent else {}
        return ops.grad_(x, targets, lse, g, temperature, **terms)

    print(
        f"per-chunk pass on the CPU: tile [{rows}, {vocab}] {args.dtype}, {args.threads} threads, "
        f"median of {args.iters} (torch {torch.__version__})"
    )
    print(f"{'pass':<22} {'torch ms':>10} {'native ms':>10} {'speed-up':>9} {'native GB/s':>12}")
    # (name, call, passes over the tile the native pass must make: reads + writes)
    for name, call, passes in (
        ("stats", lambda ops, x: ops.stats(x, targets, temperature), 1),
        ("grad_", lambda ops, x: ops.grad_(x, targets, lse, g, temperature), 2),
        (
            "grad_ +entropy",
            lambda ops, x: ops.grad_(x, targets, lse, g, temperature, ent_coef=e, entropy=entropy),
            2,
        ),
        ("stats + grad_", lambda ops, x: pass_(ops, x, ent=False), 3),
        ("stats + grad_ +entropy", lambda ops, x: pass_(ops, x, ent=True), 3),
    ):
        ms = {
            ops.name: median_ms(lambda x, ops=ops, call=call: call(ops, x), tile, args.iters)
            for ops in (TorchChunkOps(), NativeChunkOps())
        }
        gbs = passes * tile.numel() * tile.element_size() / (ms["native"] * 1e-3) / 1e9
        print(
            f"{name:<22} {ms['torch']:>10.2f} {ms['native']:>10.2f} "
            f"{ms['torch'] / ms['native']:>8.2f}x {gbs:>12.1f}"
        )


if __name__ == "__main__":
    main()
