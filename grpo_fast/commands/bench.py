"""``grpo-fast bench``: the GRPO loss implementations side by side, as a table (and JSON on request)."""

from __future__ import annotations

import argparse
import json
import sys

from ..benchmarking import baselines as bench_baselines
from ..benchmarking import harness as bench


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--dtype",
        choices=sorted(bench.DTYPES),
        default=None,
        help="default: bfloat16 on CUDA, float32 on the CPU",
    )
    parser.add_argument(
        "--shape",
        action="append",
        metavar="N,H,V",
        help="tokens, hidden size, vocabulary; repeat for several (default: one per device)",
    )
    parser.add_argument("--batch", type=int, default=4, help="sequences the N tokens are split into (B)")
    parser.add_argument("--beta", type=float, default=0.0, help="KL coefficient (adds ref log-probs)")
    parser.add_argument("--loss-type", default="dapo")
    parser.add_argument(
        "--impl",
        action="append",
        choices=sorted(bench.IMPLS),
        help="implementations to run (default: all that can run on the device; TRL, Liger, "
        "torch-compile and grpo_fast-triton need CUDA)",
    )
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per implementation (median)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows and the environment as JSON")


def _cases(args: argparse.Namespace, device: str) -> list[bench.BenchCase]:
    if not args.shape:
        base = bench.default_cases(device, args.dtype)
    else:
        base = []
        for text in args.shape:
            try:
                n, h, v = (int(x) for x in text.split(","))
            except ValueError:
                raise SystemExit(f"--shape takes N,H,V as three integers, got {text!r}") from None
            base.append(
                bench.BenchCase(
                    N=n,
                    H=h,
                    V=v,
                    device=device,
                    dtype=args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"),
                )
            )
    cases = [bench.with_options(c, B=args.batch, beta=args.beta, loss_type=args.loss_type) for c in base]
    for c in cases:
        if c.N % c.B:
            raise SystemExit(f"N={c.N} must be a multiple of --batch={c.B}")
    return cases


def run(args: argparse.Namespace) -> int:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    cases = _cases(args, device)
    impls = args.impl or [i for i in bench.IMPLS if bench_baselines.runnable(i, device)]
    blocked = [i for i in impls if not bench_baselines.runnable(i, device)]
    if blocked:
        raise SystemExit(f"--impl {', '.join(blocked)} cannot run on {device} here (needs CUDA or a library)")
    env = bench.environment()
    print(f"grpo-fast bench on {env['device']}, torch {env['torch']}, {env['date']}", flush=True)
    rows = bench.run(
        cases,
        impls,
        iters=args.iters,
        progress=lambda msg: print(f"  running {msg} ...", file=sys.stderr, flush=True),
    )
    print(bench.format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**env, "rows": [r.__dict__ for r in rows]}, f, indent=2)
        print(f"wrote {args.json}")
    return 0
