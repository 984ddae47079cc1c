"""``grpo-fast bench``: the GRPO loss implementations side by side, as a table (and JSON on request)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from ..benchmarking import baselines as bench_baselines
from ..benchmarking import harness as bench
from ..config import LOSS_TYPES
from ..engine.validation import device_type


class BadArgs(Exception):
    """A bad command-line value: one line on stderr, exit status 2 (argparse's convention)."""


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
    parser.add_argument("--loss-type", default="dapo", choices=LOSS_TYPES)
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
                raise BadArgs(f"--shape takes N,H,V as three integers, got {text!r}") from None
            if min(n, h, v) < 1:
                raise BadArgs(f"--shape N,H,V must all be >= 1, got {text!r}")
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
            raise BadArgs(f"N={c.N} must be a multiple of --batch={c.B}")
    return cases


def _check_args(args: argparse.Namespace) -> str:
    """The device to run on, after every value has been checked (before anything runs)."""
    import torch

    if args.iters < 1:
        raise BadArgs(f"--iters must be >= 1, got {args.iters}")
    if args.batch < 1:
        raise BadArgs(f"--batch must be >= 1, got {args.batch}")
    if not math.isfinite(args.beta) or args.beta < 0:
        raise BadArgs(f"--beta must be a finite number >= 0, got {args.beta}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    kind = device_type(device)
    if kind is None:
        raise BadArgs(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise BadArgs("--device cuda asked for, but torch sees no CUDA device")
    if args.json:
        path = Path(args.json)
        parent = path.parent if str(path.parent) else Path(".")
        if path.is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK):
            raise BadArgs(f"--json {args.json!r} cannot be written (checked before the run)")
    return device


def run(args: argparse.Namespace) -> int:
    try:
        device = _check_args(args)
        cases = _cases(args, device)
        impls = args.impl or [i for i in bench.IMPLS if bench_baselines.runnable(i, device)]
        blocked = [i for i in impls if not bench_baselines.runnable(i, device)]
        if blocked:
            raise BadArgs(
                f"--impl {', '.join(blocked)} cannot run on {device} here (needs CUDA or a library)"
            )
    except BadArgs as err:
        print(f"grpo-fast bench: error: {err}", file=sys.stderr)
        return 2
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
