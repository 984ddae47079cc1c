"""Long-context record: one training step's peak memory and time at growing completion lengths, for
trl.GRPOTrainer, FastGRPOTrainer (padded and padding-free) and the thin trainer (padded, padding-free, and
padding-free in passes of a token budget), each case in a fresh process.

    python benchmarks/bench_longctx.py --lengths 512 1024 2048 4096 \
        --out benchmarks/results/longctx-cpu-DATE.json

The step is what a GRPO update spends on its batch: the backbone's forward, the loss and the backward over
G completions of one prompt (dapo, no old log-probs, fp32 unless ``--bf16``), without generation and
without the optimizer (both the same for every implementation). TRL and FastGRPOTrainer run
``_compute_loss`` + backward on the batch TRL's generation hands it; the thin trainer runs its update
(every pass of the batch) with the optimizer step left out.

Lengths have a spread, as reasoning completions do: with ``--spread uniform`` completion i of G is
``L * (1/16 + (15/16) * i / (G - 1))`` tokens (a padded batch is then about 47% padding), the longest
exactly L; ``--spread none`` gives every completion L tokens. The model is a Qwen2 with a real vocabulary
(151936) and a small backbone (hidden 128, 2 layers, sdpa attention) unless ``--hidden``/``--layers`` say
otherwise. Peak memory: on the CPU the resident set above what the process held before the first step; on
CUDA, torch's peak allocation above the allocation before it. Writes the JSON record (rows ``{impl,
completion_tokens, length_spread, peak_mb, step_s}``, rewritten after every case) and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue as stdlib_queue
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from step_timing import measure, trl_loss_step

IMPLS = ("trl", "fast", "fast-padding-free", "thin", "thin-padding-free", "thin-padding-free-budget")
VOCAB, PROMPT = 151936, 64


def completion_lengths(tokens: int, completions: int, spread: str) -> list[int]:
    if spread == "none" or completions == 1:
        return [tokens] * completions
    low = max(1, tokens // 16)
    return [round(low + (tokens - low) * i / (completions - 1)) for i in range(completions)]


def _model(args, tokens: int, device: str):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=tokens + PROMPT + 8, tie_word_embeddings=True,
        attn_implementation="sdpa", pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return Qwen2ForCausalLM(config).to(device)


def _batch(args, tokens: int, device: str) -> dict:
    """Left-padded prompts of PROMPT - 12 to PROMPT tokens, completions of the spread's lengths."""
    import torch

    g = torch.Generator().manual_seed(1)
    B = args.completions
    lengths = torch.tensor(completion_lengths(tokens, B, args.spread))
    prompt_len = torch.tensor([PROMPT - (i % 4) * PROMPT // 16 for i in range(B)])
    batch = dict(
        prompt_ids=torch.randint(2, args.vocab, (B, PROMPT), generator=g),
        prompt_mask=(torch.arange(PROMPT) >= PROMPT - prompt_len.unsqueeze(1)).long(),
        completion_ids=torch.randint(2, args.vocab, (B, tokens), generator=g),
        completion_mask=(torch.arange(tokens) < lengths.unsqueeze(1)).long(),
        advantages=torch.randn(B, generator=g),
    )
    batch["advantages"][: round(getattr(args, "zero_frac", 0.0) * B)] = 0.0  # groups of equal rewards
    return {k: v.to(device) for k, v in batch.items()}


def _trl_step(impl: str, args, tokens: int, device: str):
    from trl import GRPOTrainer

    from grpo_fast.integrations.trl import FastGRPOTrainer

    cls = GRPOTrainer if impl == "trl" else FastGRPOTrainer
    extra = {"grpo_fast_padding_free": True} if impl == "fast-padding-free" else {}
    if impl != "trl" and getattr(args, "skip_zero", False):
        extra["grpo_fast_skip_zero_advantage"] = True
    inputs = _batch(args, tokens, device)
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum().float()
    return trl_loss_step(cls, _model(args, tokens, device), inputs, tokens, device, args.bf16, **extra)


def _thin_step(impl: str, args, tokens: int, device: str, **options):
    """The thin trainer's update on the batch, optimizer step left out; ``options``: more TrainConfig
    fields (bench_sequence_parallel.py's ``sequence_parallel_size`` and ``parallelism``)."""
    import torch

    from grpo_fast.trainer import TrainConfig, Trainer, demo
    from grpo_fast.trainer.distributed import Layout
    from grpo_fast.trainer.generation import Rollout
    from grpo_fast.trainer.rollout import StepBatch

    tokenizer = demo.build_tokenizer()
    budget = args.token_budget if impl.endswith("budget") else None
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig.from_dict(
            dict(
                output_dir=out,
                device=device,
                loss_type="dapo",
                beta=0.0,
                max_completion_length=tokens,
                num_generations=args.completions,
                prompts_per_step=1,
                progress=False,
                bf16=args.bf16,
                padding_free="padding-free" in impl,
                max_tokens_per_microbatch=budget,
                save_every=0,
                print_completions_every=0,
                num_threads=torch.get_num_threads(),
                skip_zero_advantage=getattr(args, "skip_zero", False),
                **options,
            )  # fmt: skip
        )
        trainer = Trainer(cfg, model=_model(args, tokens, device), tokenizer=tokenizer)
    trainer._optimizer_step = lambda: trainer.optimizer.zero_grad(set_to_none=True) or 0.0  # not measured
    b = _batch(args, tokens, device)
    n = args.completions
    rows = Rollout(
        b["prompt_ids"], b["prompt_mask"], b["completion_ids"], b["completion_mask"],
        torch.zeros(n, dtype=torch.bool, device=device), [""] * n,
    )  # fmt: skip
    layout = Layout.build(n, 1, 1, 0)
    micro = [index.to(device) for index in layout.local_micro()]
    skipped, chunks = trainer.plan_passes(rows, micro, b["advantages"])
    batch = StepBatch(
        [], rows, [], layout, torch.zeros(n, 1), b["advantages"], b["completion_mask"], micro, chunks,
        None, None, skipped,
    )  # fmt: skip

    def step() -> None:
        trainer.update(batch)

    return step


def _case(impl: str, args, tokens: int, queue) -> None:
    import torch

    device = args.device
    torch.set_num_threads(args.threads) if args.threads else None
    step = (_trl_step if impl in ("trl", "fast", "fast-padding-free") else _thin_step)(
        impl, args, tokens, device
    )
    # The warm-up's memory counts: the peak is the peak.
    times, peak = measure(step, device, args.iters, warmup_in_peak=True)
    queue.put(dict(step_s=statistics.median(times), peak_mb=round(peak, 1)))


class _InProcess:
    """The dry run's stand-in for a process: runs the case here."""

    exitcode = 0

    def __init__(self, impl: str, args, tokens: int, queue) -> None:
        self.run = lambda: _case(impl, args, tokens, queue)

    def start(self) -> None:
        self.run()

    def join(self) -> None:
        pass


def append_to(record: dict, out: Path) -> dict:
    """--append: ``record`` takes the rows of the record at ``out`` (measured with the same settings, else
    SystemExit) and both commits; returns that old record."""
    old = json.loads(out.read_text())
    same = ("shape", "length_spread", "dtype", "device")
    if any(old.get(k) != record[k] for k in same):
        raise SystemExit(f"--append: {out} was measured with other settings ({', '.join(same)})")
    record["rows"] = old["rows"]
    if old["commit"] != record["commit"]:
        record["commit"] = f"{old['commit']}+{record['commit']}"
    return old


def largest_fits(rows: list[dict], budget_mb: float, key: str = "impl") -> dict[str, int | None]:
    """Per ``row[key]`` (an implementation, a process count), the longest measured completion length whose
    peak kept within the budget (None: none did)."""
    out: dict[str, int | None] = {}
    for row in rows:
        name = str(row[key])
        fits = row.get("peak_mb") is not None and row["peak_mb"] <= budget_mb
        best = out.get(name)
        out[name] = max(best or 0, row["completion_tokens"]) if fits else best
    return out


def plot_steps(
    record: dict,
    path: Path,
    series: dict[str, list[dict]],
    memory: str,
    budget: str,
    title: str,
    title_size: int = 9,
) -> None:
    """Peak memory and step time against the completion length, one line per ``series`` entry (its rows),
    the record's ``budget_mb`` as a dashed line labelled ``budget``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, speed) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, rows in series.items():
        rows = sorted(  # --append adds lengths in any order
            (r for r in rows if r.get("peak_mb") is not None), key=lambda r: r["completion_tokens"]
        )
        if not rows:
            continue
        x = [r["completion_tokens"] for r in rows]
        mem.plot(x, [r["peak_mb"] for r in rows], marker="o", label=label)
        speed.plot(x, [r["step_s"] for r in rows], marker="o", label=label)
    if record.get("budget_mb"):
        mem.axhline(record["budget_mb"], color="grey", linestyle="--", linewidth=1, label=budget)
    for ax, label in ((mem, memory), (speed, "step time (s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"longest completion (tokens; spread: {record['length_spread']})")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    mem.legend(fontsize=8)
    fig.suptitle(title, fontsize=title_size)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(record: dict, path: Path) -> None:
    shape = record["shape"]
    title = (
        f"one GRPO step, {shape['completions']} completions; Qwen2 vocab {shape['vocab']}, hidden "
        f"{shape['hidden']}, {shape['layers']} layers, {record['dtype']}; {record['device']}"
    )
    series = {impl: [r for r in record["rows"] if r["impl"] == impl] for impl in IMPLS}
    plot_steps(record, path, series, "peak memory above start (MB)", "budget", title, title_size=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--completions", type=int, default=4)
    parser.add_argument("--spread", choices=["uniform", "none"], default="uniform")
    parser.add_argument("--impl", action="append", choices=IMPLS, help="default: all")
    parser.add_argument("--iters", type=int, default=1, help="timed steps after the warm-up (median)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (TRL's bf16=True)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--token-budget", type=int, default=2048, help="thin-padding-free-budget's passes")
    parser.add_argument("--budget-mb", type=float, default=1024.0, help="memory budget for 'largest fits'")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--time-limit", type=float, default=None, help="start no case after this many s")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (CI)")
    parser.add_argument("--zero-frac", type=float, default=0.0, help="completions at advantage 0")
    parser.add_argument("--skip-zero", action="store_true", help="skip_zero_advantage (fast and thin)")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--append",
        action="store_true",
        help="keep --out's rows (same settings), measure only what is missing",
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.lengths, args.vocab, args.hidden, args.iters = "cpu", [48], 512, 32, 1
        args.token_budget = 96
    start = time.monotonic()
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    missing = None
    try:
        import datasets  # noqa: F401 - TRL's trainer needs it (and it pyarrow, pandas, dill, ...)
        import trl

        trl_version = trl.__version__
    except ImportError as err:  # the bare GPU image: TRL and datasets come from the carried wheels
        trl_version, missing = None, err.name or str(err)
    device = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    )
    record = dict(
        what="one GRPO step on G completions: forward, dapo loss, backward (no generation, no optimizer)",
        device=device,
        date=str(date.today()),
        commit=commit.strip() or os.environ.get("GRPO_FAST_COMMIT", ""),
        torch=torch.__version__,
        trl=trl_version,
        dtype="bf16 autocast" if args.bf16 else "fp32",
        length_spread=args.spread,
        shape=dict(
            completions=args.completions,
            prompt_tokens=PROMPT,
            vocab=args.vocab,
            hidden=args.hidden,
            layers=args.layers,
            attention="sdpa",
            token_budget=args.token_budget,
        ),  # fmt: skip
        iters=args.iters,
        budget_mb=args.budget_mb,
        dry_run=args.dry_run,
        rows=[],
    )
    if args.append and args.out and args.out.exists():
        append_to(record, args.out)
    done = {(r["impl"], r["completion_tokens"]) for r in record["rows"]}
    impls = [i for i in IMPLS if i in (args.impl or IMPLS)]
    if trl_version is None:
        impls = [i for i in impls if not i.startswith(("trl", "fast"))]
        record["missing_package"] = missing
        print(f"TRL's trainer cannot be imported ({missing} is missing; benchmarks/fetch_wheels.sh carries "
              "it): only the thin trainer is measured", flush=True)  # fmt: skip
    cut = False
    ctx = mp.get_context("spawn")
    for tokens in args.lengths:
        lengths = completion_lengths(tokens, args.completions, args.spread)
        for impl in impls:
            if (impl, tokens) in done:
                continue
            if args.time_limit is not None and time.monotonic() - start > args.time_limit:
                print(f"time limit: {impl} at {tokens} not run", flush=True)
                cut = True
                continue
            if args.dry_run:  # in this process: the dry run checks the code, not the memory
                queue = stdlib_queue.Queue()
                proc = _InProcess(impl, args, tokens, queue)
            else:
                queue = ctx.Queue()
                proc = ctx.Process(target=_case, args=(impl, args, tokens, queue))
            proc.start()
            proc.join()
            row = dict(
                impl=impl,
                completion_tokens=tokens,
                length_spread=args.spread,
                completion_lengths=lengths,
                padding=round(1 - sum(lengths) / (tokens * len(lengths)), 3),
            )
            if proc.exitcode == 0 and not queue.empty():
                row.update(queue.get())
            else:  # out of memory (killed) or a crash: on the record as such
                row.update(peak_mb=None, step_s=None, error=f"exit code {proc.exitcode}")
            record["rows"].append(row)
            record["largest_fits"] = largest_fits(record["rows"], args.budget_mb)
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
    print("largest completion length within", args.budget_mb, "MB:", json.dumps(record.get("largest_fits")))
    return 3 if cut else 0  # 3: cut by the time limit (run_gpu.sh records the phase as cut)


if __name__ == "__main__":
    sys.exit(main())
