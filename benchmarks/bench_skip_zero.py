"""Skipping zero-gradient work: time with a share of the completions at advantage 0, skip off and on.

    python benchmarks/bench_skip_zero.py --out benchmarks/results/skip-zero-cpu-DATE.json
    python benchmarks/bench_skip_zero.py demo --seeds 0 1 2 --out benchmarks/results/skip-zero-demo-DATE.json

Two records:

- ``loss`` (default): ``gf.grpo_loss`` forward + backward alone (dapo, beta 0, on-policy, packed N tokens of
  16 sequences), half the sequences at advantage 0 or none, with the skip and with every row walked (the
  skip forced off); then one loss step (backbone forward, loss, backward; no generation, no optimizer) of
  FastGRPOTrainer and of the thin trainer at 0/25/50/75% completions at advantage 0, skip off and on, on the
  long-context benchmark's two models (bench_longctx.py's cases, each in a fresh process): LM-head-bound
  (vocab 151936, hidden 128, 2 layers) and backbone-bound (vocab 16384, hidden 256, 8 layers), G completions
  of one length (``--spread none``: a completion share is a token share). The skip-on FastGRPOTrainer
  gradients are compared with skip off (relative L2).
- ``demo``: the thin trainer's whole demo run (generation included, beta 0), skip off and on, per seed:
  wall time and the reward curve.

Writes the JSON record (rewritten after every case) and a PNG beside it.
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

import bench_longctx

MODELS = {
    "lm-head-bound": dict(vocab=151936, hidden=128, layers=2),
    "backbone-bound": dict(vocab=16384, hidden=256, layers=8),
}
FRACS = (0.0, 0.25, 0.5, 0.75)


def _header(args, what: str) -> dict:
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    device = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    )
    return dict(
        what=what, device=device, date=str(date.today()), commit=commit.strip(), torch=torch.__version__,
        threads=args.threads, dry_run=args.dry_run, rows=[],
    )  # fmt: skip


def summarize(record: dict) -> dict:
    """The headline ratios of a record (skip on over skip off, or over the 0% step)."""
    rows = record["rows"]
    out: dict = {}
    if "steps" in record:  # the demo record
        for skip in (False, True):
            runs = [r for r in rows if r["skip"] == skip]
            if runs:
                last = [statistics.mean(r["curve"]["reward_mean"][-50:]) for r in runs]
                out[f"skip_{'on' if skip else 'off'}"] = dict(
                    seeds=len(runs), wall_s_total=sum(r["wall_s"] for r in runs),
                    reward_last50_mean=statistics.mean(last),
                    reward_last50_sd=statistics.stdev(last) if len(last) > 1 else 0.0,
                    frac_reward_zero_std_last50=statistics.mean(
                        statistics.mean(r["curve"]["frac_reward_zero_std"][-50:]) for r in runs
                    ),
                )  # fmt: skip
        if len(out) == 2:
            out["wall_on_over_off"] = out["skip_on"]["wall_s_total"] / out["skip_off"]["wall_s_total"]
        return out
    time_of = {
        (r["case"], r.get("backend") or f"{r['model']}/{r['impl']}", r["zero_frac"], r["skip"]): r["step_s"]
        for r in rows
        if r["case"] in ("grpo_loss", "loss_step") and r.get("step_s")
    }
    for (case, what, frac, skip), t in time_of.items():
        if not skip or frac == 0.0:
            continue
        off, none = time_of.get((case, what, frac, False)), time_of.get((case, what, 0.0, False))
        key = f"{case}/{what}/{int(100 * frac)}%"
        out[key] = dict(on_over_off=t / off if off else None, on_over_0pct=t / none if none else None)
    return out


def _write(record: dict, out: Path | None, plot) -> None:
    record["summary"] = summarize(record)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        head = json.dumps({k: v for k, v in record.items() if k != "rows"}, indent=1)[:-2]
        rows = ",\n  ".join(json.dumps(r) for r in record["rows"])  # one line per row (the curves are long)
        out.write_text(f'{head},\n "rows": [\n  {rows}\n ]\n}}\n')
        plot(record, out.with_suffix(".png"))


# ----- grpo_loss alone --------------------------------------------------------------------------------
def loss_alone(args, backend: str) -> list[dict]:
    """Median (over interleaved repeats) of fwd+bwd at 0% and 50% zero-advantage sequences, skip on/off."""
    import torch

    import grpo_fast as gf
    from grpo_fast.engine import chunk_loop

    torch.manual_seed(0)
    n, h, v, seqs = args.loss_shape
    device = args.device
    hidden = torch.randn(n, h, device=device)
    weight = torch.randn(v, h, device=device) * h**-0.5
    targets = torch.randint(0, v, (n,), device=device)
    mask = torch.ones(n, device=device)
    seq_ids = torch.arange(seqs, device=device).repeat_interleave(n // seqs)
    adv = {0.0: torch.randn(seqs, device=device)}
    adv[0.5] = adv[0.0].clone()
    adv[0.5][::2] = 0.0
    cfg = gf.GRPOConfig(loss_type="dapo")
    real_split = chunk_loop.zero_split

    def run(frac: float, skip: bool) -> tuple[tuple[float, float], dict]:
        chunk_loop.zero_split = real_split if skip else (lambda zero, live=None: None)
        hd, wt = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if device == "cuda":
            torch.cuda.synchronize()
        start, cpu = time.perf_counter(), time.process_time()
        loss, _ = gf.grpo_loss(hd, wt, targets, mask, adv[frac], config=cfg, seq_ids=seq_ids, backend=backend)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        chunk_loop.zero_split = real_split
        return (time.perf_counter() - start, time.process_time() - cpu), {
            "hidden": hd.grad,
            "weight": wt.grad,
        }

    cases = [(f, s) for f in (0.0, 0.5) for s in (False, True)]
    times: dict = {c: [] for c in cases}
    cpu_times: dict = {c: [] for c in cases}
    grads: dict = {}
    for c in cases:
        run(*c)  # warm-up
    for _ in range(args.repeats):  # interleaved: a busy machine slows every case alike
        for c in cases:
            (t, cpu), grads[c] = run(*c)
            times[c].append(t)
            cpu_times[c].append(cpu)
    rows = []
    for frac, skip in cases:
        g, ref = grads[(frac, skip)], grads[(frac, False)]
        rel = {k: float((g[k] - ref[k]).norm() / ref[k].norm()) for k in g}
        rows.append(
            dict(
                case="grpo_loss",
                backend=backend,
                zero_frac=frac,
                skip=skip,
                step_s=statistics.median(times[(frac, skip)]),
                step_s_min=min(times[(frac, skip)]),
                cpu_s=statistics.median(cpu_times[(frac, skip)]),
                grad_rel_l2_vs_skip_off=rel,
            )  # fmt: skip
        )
    return rows


# ----- a loss step of the trainers ---------------------------------------------------------------------
def _trainer_pair(args, tokens: int, queue) -> None:
    """FastGRPOTrainer's or the thin trainer's (``args.step_impl``) loss step with the skip off and on, in
    this process, timed alternately: a busy machine slows both alike, and each pair gives one ratio."""
    import torch

    torch.set_num_threads(args.threads) if args.threads else None
    build = bench_longctx._trl_step if args.step_impl == "fast" else bench_longctx._thin_step
    steps = {
        skip: build(
            args.step_impl, argparse.Namespace(**{**vars(args), "skip_zero": skip}), tokens, args.device
        )
        for skip in (False, True)
    }
    times: dict = {False: [], True: []}
    cpu_times: dict = {False: [], True: []}
    for step in steps.values():
        step()  # warm-up
    for _ in range(args.iters):
        for skip, step in steps.items():
            start, cpu = time.perf_counter(), time.process_time()
            step()
            times[skip].append(time.perf_counter() - start)
            cpu_times[skip].append(time.process_time() - cpu)
    ratios = [on / off for on, off in zip(times[True], times[False], strict=True)]
    queue.put(
        {
            skip: dict(
                step_s=statistics.median(times[skip]),
                step_s_min=min(times[skip]),
                step_s_all=times[skip],
                cpu_s=statistics.median(cpu_times[skip]),
                on_over_off=statistics.median(ratios),
            )  # fmt: skip
            for skip in (False, True)
        }
    )


def _grads_case(args, tokens: int, queue) -> None:
    """The skip-on FastGRPOTrainer gradients against skip off, one batch, one model."""
    import torch
    from step_timing import trl_loss_step

    from grpo_fast.integrations.trl import FastGRPOTrainer

    torch.set_num_threads(args.threads) if args.threads else None
    out = {}
    for skip in (False, True):
        inputs = bench_longctx._batch(args, tokens, args.device)
        inputs["num_items_in_batch"] = inputs["completion_mask"].sum().float()
        model = bench_longctx._model(args, tokens, args.device)
        step = trl_loss_step(
            FastGRPOTrainer, model, inputs, tokens, args.device, grpo_fast_skip_zero_advantage=skip
        )
        step()
        out[skip] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    num = sum(float((out[True][n] - out[False][n]).square().sum()) for n in out[False])
    den = sum(float(out[False][n].square().sum()) for n in out[False])
    queue.put(dict(grad_rel_l2=(num / den) ** 0.5))


def trainer_rows(args, record: dict, out: Path | None) -> None:
    start = time.monotonic()
    for model, shape in MODELS.items():
        if args.dry_run and model != "lm-head-bound":  # the dry run checks the code: one model
            continue
        case_args = argparse.Namespace(**{**vars(args), **shape, "spread": "none"})
        if args.dry_run:
            case_args.vocab, case_args.hidden, case_args.layers = 512, 32, 2
        for frac in args.fracs:
            for impl in ("fast", "thin"):
                if args.time_limit is not None and time.monotonic() - start > args.time_limit:
                    print(f"time limit: {model} {impl} {frac} not run", flush=True)
                    continue
                one = argparse.Namespace(**{**vars(case_args), "zero_frac": frac, "step_impl": impl})
                pair = _run(_trainer_pair, one, args.tokens, args.dry_run)
                for skip in (False, True):
                    row = dict(case="loss_step", model=model, impl=impl, zero_frac=frac, skip=skip, **shape)
                    row.update(pair.get(skip, pair))
                    row.update(completions=args.completions, completion_tokens=args.tokens)
                    record["rows"].append(row)
                    print(json.dumps(row), flush=True)
                _write(record, out, plot_loss)
        one = argparse.Namespace(**{**vars(case_args), "zero_frac": 0.5})
        row = dict(case="grads", model=model, impl="fast", zero_frac=0.5, **shape)
        row.update(_run(_grads_case, one, args.tokens, args.dry_run))
        record["rows"].append(row)
        print(json.dumps(row), flush=True)
        _write(record, out, plot_loss)


def _run(target, args, tokens: int, dry_run: bool) -> dict:
    """``target(args, tokens, queue)`` in a fresh process (in this one for the dry run)."""
    if dry_run:
        queue = stdlib_queue.Queue()
        target(args, tokens, queue)
        return queue.get()
    ctx = mp.get_context("spawn")  # not fork: this process's OpenMP threads do not survive a fork
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(args, tokens, queue))
    proc.start()
    proc.join()
    return queue.get() if proc.exitcode == 0 and not queue.empty() else dict(error=f"exit {proc.exitcode}")


def plot_loss(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in record["rows"] if r["case"] == "loss_step" and r.get("step_s")]
    panels = [(m, i) for m in MODELS for i in ("fast", "thin")]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4 * (len(panels) + 1), 3.6))
    for ax, (model, impl) in zip(axes, panels, strict=False):
        for skip, style in ((False, "o--"), (True, "s-")):
            rows = [r for r in steps if r["model"] == model and r["impl"] == impl and r["skip"] == skip]
            label = "skip on" if skip else "skip off (the loss still skips rows' backward)"
            ax.plot([100 * r["zero_frac"] for r in rows], [r["step_s"] for r in rows], style, label=label)
        ax.set_title(f"{'FastGRPOTrainer' if impl == 'fast' else 'thin trainer'}\n{model}", fontsize=9)
        ax.set_xlabel("completions at advantage 0 (%)")
        ax.set_ylabel("loss step (s)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[-1]
    loss = [r for r in record["rows"] if r["case"] == "grpo_loss"]
    labels = [f"{r['backend']}\n{int(100 * r['zero_frac'])}% {'on' if r['skip'] else 'off'}" for r in loss]
    ax.bar(
        range(len(loss)),
        [r["step_s"] for r in loss],
        color=["tab:blue" if not r["skip"] else "tab:green" for r in loss],
    )
    ax.set_xticks(range(len(loss)), labels, fontsize=6)
    ax.set_title(
        "grpo_loss fwd+bwd (N={}, H={}, V={})".format(*record.get("loss_shape", [0, 0, 0])[:3]), fontsize=9
    )
    ax.set_ylabel("s")
    fig.suptitle(f"skip zero-gradient work, CPU figures: {record['device']}, {record['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----- the demo run ------------------------------------------------------------------------------------
def demo_run(args, seed: int, skip: bool) -> dict:

    from grpo_fast.trainer import TrainConfig, Trainer
    from grpo_fast.trainer.reporting import read_metrics

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig.from_dict(
            dict(
                output_dir=out,
                seed=seed,
                beta=0.0,
                skip_zero_advantage=skip,
                max_steps=args.steps,
                progress=False,
                save_every=0,
                print_completions_every=0,
                device="cpu",
            )  # fmt: skip
        )
        start, cpu = time.perf_counter(), time.process_time()
        result = Trainer(cfg).train()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        rows = read_metrics(result.metrics_path)
    keys = ("reward_mean", "frac_reward_zero_std", "skipped_completions", "step_time_s")
    return dict(
        seed=seed,
        skip=skip,
        wall_s=wall,
        cpu_s=cpu,
        curve={k: [r.get(k) for r in rows] for k in keys if k in rows[0]},
    )


def plot_demo(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_t) = plt.subplots(1, 2, figsize=(11, 3.8))
    for row in record["rows"]:
        reward = row["curve"]["reward_mean"]
        window = 20
        smooth = [sum(reward[max(0, i - window + 1) : i + 1]) / len(reward[max(0, i - window + 1) : i + 1])
                  for i in range(len(reward))]  # fmt: skip
        ax_r.plot(range(1, len(smooth) + 1), smooth, color="tab:green" if row["skip"] else "tab:blue",
                  alpha=0.7, label=f"seed {row['seed']} skip {'on' if row['skip'] else 'off'}")  # fmt: skip
    ax_r.set_xlabel("step")
    ax_r.set_ylabel("reward (20-step mean)")
    ax_r.legend(fontsize=7)
    ax_r.grid(alpha=0.3)
    seeds = sorted({r["seed"] for r in record["rows"]})
    for k, skip in enumerate((False, True)):
        walls = [
            next((r["wall_s"] for r in record["rows"] if r["seed"] == s and r["skip"] == skip), 0)
            for s in seeds
        ]
        ax_t.bar(
            [i + 0.4 * k for i in range(len(seeds))],
            walls,
            width=0.4,
            label=f"skip {'on' if skip else 'off'}",
        )
    ax_t.set_xticks([i + 0.2 for i in range(len(seeds))], [f"seed {s}" for s in seeds])
    ax_t.set_ylabel("whole run (s)")
    ax_t.legend(fontsize=8)
    fig.suptitle(
        f"demo, thin trainer, beta 0, {record['steps']} steps, CPU figures: {record['device']}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", choices=["loss", "demo"], default="loss")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--loss-shape", type=int, nargs=4, default=[4096, 256, 32768, 16], metavar=("N", "H", "V", "SEQS")
    )
    parser.add_argument("--backend", action="append", help="grpo_loss backends (default: torch, native)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed repeats of grpo_loss")
    parser.add_argument("--tokens", type=int, default=512, help="tokens of each completion (loss steps)")
    parser.add_argument("--completions", type=int, default=8)
    parser.add_argument("--iters", type=int, default=3, help="timed loss steps after a warm-up (median)")
    parser.add_argument("--fracs", type=float, nargs="+", default=list(FRACS), help="zero-advantage shares")
    parser.add_argument("--no-trainers", action="store_true", help="grpo_loss alone")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="demo steps")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument(
        "--time-limit", type=float, default=None, help="start no trainer case after this many s"
    )
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (CI)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    args.token_budget, args.spread = 2048, "none"
    if args.dry_run:
        args.device, args.loss_shape, args.tokens, args.completions = "cpu", [256, 32, 512, 8], 16, 4
        args.iters, args.repeats, args.steps, args.seeds, args.fracs = 1, 1, 2, [0], [0.0, 0.5]
    import torch

    torch.set_num_threads(args.threads)
    if args.what == "demo":
        record = _header(args, "the thin trainer's demo run, beta 0, skip_zero_advantage off and on")
        record["steps"] = args.steps
        for seed in args.seeds:
            for skip in (False, True):  # interleaved: a busy machine slows both alike
                row = demo_run(args, seed, skip)
                record["rows"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
                _write(record, args.out, plot_demo)
        return 0
    record = _header(args, "time of zero-gradient work, skip off and on (see the module docstring)")
    record["loss_shape"] = args.loss_shape
    default = ["torch", "native"] if args.device == "cpu" else ["triton", "native"]
    for backend in args.backend or default:
        for row in loss_alone(args, backend):
            record["rows"].append(row)
            print(json.dumps(row), flush=True)
        _write(record, args.out, plot_loss)
    if not args.no_trainers:
        trainer_rows(args, record, args.out)
    if args.out:
        print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
