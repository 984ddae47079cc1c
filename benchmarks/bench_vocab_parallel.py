"""GPU overhead of the vocab-parallel path: grpo_loss with ``process_group=`` (NCCL, world size 1) vs plain.

With one rank every all-reduce is a real NCCL call on the whole (unsharded) head, so the difference
is the cost of the path itself: the per-chunk partial statistics, their all-reduces and the dH
all-reduce. Forward+backward, bf16, dapo, token level, old and ref log-probs, medians of
``triton.testing.do_bench`` over rotated inputs; the two are measured alternately in one process.

    python benchmarks/bench_vocab_parallel.py                 # N, H, V = 8192, 4096, 151936
    python benchmarks/bench_vocab_parallel.py --shape 4096,2048,151936 --out results.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

import grpo_fast as gf
from grpo_fast.benchmarking.harness import environment

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import default_out  # noqa: E402 - a sibling script, not a package


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, seed: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(n, h, device="cuda", dtype=dtype, generator=g)
    targets = torch.randint(0, v, (1, n), device="cuda", generator=g)
    logp = -torch.rand(1, n, device="cuda", generator=g) * 8
    return dict(
        hidden=hidden.view(1, n, h).requires_grad_(True),
        targets=targets,
        mask=torch.ones(1, n, device="cuda", dtype=torch.long),
        advantages=torch.randn(1, device="cuda", generator=g),
        old_logp=logp + 0.1 * torch.randn(1, n, device="cuda", generator=g),
        ref_logp=logp + 0.1 * torch.randn(1, n, device="cuda", generator=g),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8192,4096,151936", help="N,H,V")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--backend", default="auto")
    parser.add_argument(
        "--out", type=Path, help="JSON (default: results/<device>-<date>-vocab-parallel.json)"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available() or not dist.is_nccl_available():
        print("bench_vocab_parallel needs a CUDA GPU and NCCL", file=sys.stderr)
        return 2
    from triton.testing import do_bench

    n, h, v = (int(x) for x in args.shape.split(","))
    dtype = getattr(torch, args.dtype)
    cfg = gf.GRPOConfig(loss_type="dapo", beta=0.04, epsilon_high=0.28)
    weight = (torch.randn(v, h, device="cuda", dtype=dtype) * h**-0.5).requires_grad_(True)
    inputs = [make_inputs(n, h, v, dtype, seed) for seed in range(3)]  # rotated: no cache-warm repeats
    turn = [0]

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl", init_method=f"file://{tmp}/rendezvous", rank=0, world_size=1)
        try:

            def step(group) -> None:
                b = inputs[turn[0] % len(inputs)]
                turn[0] += 1
                loss, _ = gf.grpo_loss(
                    b["hidden"],
                    weight,
                    b["targets"],
                    b["mask"],
                    b["advantages"],
                    b["old_logp"],
                    b["ref_logp"],
                    config=cfg,
                    backend=args.backend,
                    process_group=group,
                )
                loss.backward()
                b["hidden"].grad = weight.grad = None

            times: dict[str, list[float]] = {"plain": [], "vocab_parallel": []}
            for _ in range(3):  # alternate, so drift in clocks hits both alike
                for name, group in (("plain", None), ("vocab_parallel", dist.group.WORLD)):
                    times[name].append(
                        do_bench(lambda g=group: step(g), warmup=5, rep=200, return_mode="median")
                    )
        finally:
            dist.destroy_process_group()

    ms = {k: sorted(t)[len(t) // 2] for k, t in times.items()}
    overhead = ms["vocab_parallel"] / ms["plain"] - 1
    print(
        f"N={n} H={h} V={v} {args.dtype}: plain {ms['plain']:.2f} ms, vocab-parallel (NCCL, 1 rank) "
        f"{ms['vocab_parallel']:.2f} ms, overhead {overhead * 100:+.1f}%"
    )
    env = environment()
    base = default_out(env["device"])
    out = args.out or base.with_name(f"{base.stem}-vocab-parallel.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [dict(impl=k, N=n, H=h, V=v, dtype=args.dtype, beta=cfg.beta, ms=m) for k, m in ms.items()]
    out.write_text(json.dumps({**env, "rows": rows, "overhead": overhead}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
