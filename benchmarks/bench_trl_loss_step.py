"""One loss step (``_compute_loss`` + backward) of trl.GRPOTrainer and FastGRPOTrainer, with and without
old log-probs: time and peak memory, each case in a fresh process.

    python benchmarks/bench_trl_loss_step.py --completion-tokens 1024 --out benchmarks/results/x.json

The model is a Qwen2 with a real vocabulary (151936) and a small backbone (hidden 128, 2 layers), so the
LM head is what the step spends its time and memory on, as in long-completion training. With old log-probs
(``num_iterations > 1``) FastGRPOTrainer takes TRL's per-sequence clip metrics from the loss pass, with no
second LM-head pass. On the CPU the peak is the process's resident set above what
it held before the step; on CUDA, torch's peak allocation.
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
from datetime import date
from pathlib import Path

from step_timing import measure, trl_loss_step


def _case(impl: str, with_old: bool, tokens: int, completions: int, iters: int, device: str, queue) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOTrainer

    from grpo_fast.integrations.trl import FastGRPOTrainer

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=151936, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=tokens + 64,
        tie_word_embeddings=True,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config).to(device)
    g = torch.Generator().manual_seed(1)
    B, P = completions, 16
    inputs = dict(
        prompt_ids=torch.randint(0, 151936, (B, P), generator=g),
        prompt_mask=torch.ones(B, P, dtype=torch.long),
        completion_ids=torch.randint(0, 151936, (B, tokens), generator=g),
        completion_mask=torch.ones(B, tokens, dtype=torch.long),
        advantages=torch.randn(B, generator=g),
    )
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum().float()
    if with_old:
        inputs["old_per_token_logps"] = -10.0 + 0.1 * torch.randn(B, tokens, generator=g)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    cls = FastGRPOTrainer if impl == "fast" else GRPOTrainer
    step = trl_loss_step(cls, model, inputs, tokens, device)
    times, peak = measure(step, device, iters, warmup_in_peak=False)
    queue.put(dict(impl=impl, old_logp=with_old, step_s=statistics.median(times), peak_mb=peak))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--completion-tokens", type=int, default=1024)
    parser.add_argument("--completions", type=int, default=4)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--impl", action="append", choices=["trl", "fast"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    for impl in args.impl or ["fast", "trl"]:
        for with_old in (False, True):
            queue = ctx.Queue()
            proc = ctx.Process(
                target=_case,
                args=(
                    impl,
                    with_old,
                    args.completion_tokens,
                    args.completions,
                    args.iters,
                    args.device,
                    queue,
                ),
            )
            proc.start()
            row = queue.get()
            proc.join()
            rows.append(row)
            print(json.dumps(row), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    import torch
    import trl

    cpu = f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    record = dict(
        what="one loss step (_compute_loss + backward), dapo, fp32",
        device=args.device if args.device == "cuda" else cpu,
        date=str(date.today()),
        commit=commit.strip(),
        torch=torch.__version__,
        trl=trl.__version__,
        shape=dict(
            completions=args.completions,
            completion_tokens=args.completion_tokens,
            vocab=151936,
            hidden=128,
            layers=2,
        ),  # fmt: skip
        iters=args.iters,
        rows=rows,
    )
    fast = {r["old_logp"]: r["step_s"] for r in rows if r["impl"] == "fast"}
    if len(fast) == 2:
        record["fast_old_over_no_old"] = fast[True] / fast[False]
        print(f"FastGRPOTrainer: with old log-probs / without = {record['fast_old_over_no_old']:.3f}")
    if args.out:
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
