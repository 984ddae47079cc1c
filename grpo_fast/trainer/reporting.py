"""What a run shows and leaves behind: metrics.jsonl, a progress bar, sample completions, a PNG."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

import grpo_fast as gf

from ..advantages import equal_reward_groups
from .rewards import weighted_sum

if TYPE_CHECKING:
    from .distributed import Group
    from .rollout import StepBatch
    from .update import UpdateStats

METRICS_FILE, PLOT_FILE = "metrics.jsonl", "reward_kl.png"


class MetricsLog:
    """``metrics.jsonl``: one JSON object per step, flushed as it is written."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / METRICS_FILE

    def start(self, resume_step: int | None) -> None:
        """A fresh file; on resume, the lines up to the checkpoint's step (a killed run may be past it)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [] if resume_step is None else [r for r in read_metrics(self.path) if r["step"] <= resume_step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row, allow_nan=True) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut short by a kill: everything after it is unreliable
    return rows


def step_metrics(
    step: int,
    batch: StepBatch,
    stats: UpdateStats,
    reward_weights: Tensor,
    reward_names: list[str],
    group: Group,
    device: torch.device,
    start: float,
    lr: float,
    copies: int = 1,
) -> dict[str, Any]:
    """The metrics.jsonl row of a step, over all ranks; ``start`` is the step's ``time.perf_counter()``;
    ``copies``: ranks holding each row (sequence parallelism), whose counts add up to one."""
    rewards, out = batch.rewards, batch.out
    G = len(rewards) // len(batch.rows)
    reward_total = weighted_sum(rewards, reward_weights)
    equal_groups = equal_reward_groups(reward_total, G)  # advantage exactly 0 (a std's noise is not)
    completion_len = out.completion_mask.sum(1).float()
    len_sum, len_count = float(completion_len.sum()), float(completion_len.numel())
    truncated = float(out.truncated.float().sum())
    skipped = float(batch.skipped.sum()) if batch.skipped is not None else 0.0
    losses, loss_metrics = stats.losses, stats.metrics
    means = loss_metrics.means()
    if group.active:  # everything a row reports is over all ranks
        keys = sorted(loss_metrics.sums)
        packed = group.sum(
            torch.tensor(
                [
                    *losses,
                    *(loss_metrics.sums[k] for k in keys),
                    *(loss_metrics.weights[k] for k in keys),
                    loss_metrics.weight,
                    len_sum,
                    len_count,
                    truncated,
                    skipped,
                ],
                dtype=torch.float64,
            )
        ).tolist()
        losses = packed[: len(losses)]
        at = len(losses)
        loss_metrics.sums = dict(zip(keys, packed[at : at + len(keys)], strict=True))
        loss_metrics.weights = dict(zip(keys, packed[at + len(keys) : at + 2 * len(keys)], strict=True))
        loss_metrics.weight = packed[at + 2 * len(keys)]  # the metrics: added by one rank of a group
        len_sum, len_count, truncated, skipped = (x / copies for x in packed[at + 2 * len(keys) + 1 :])
        extreme_keys = sorted(loss_metrics.extremes)
        if extreme_keys:  # min / max metrics: a max over ranks of sign * value
            values = [loss_metrics.extremes[k] for k in extreme_keys]
            reduced = group.max(torch.tensor(values, dtype=torch.float64)).tolist()
            loss_metrics.extremes = dict(zip(extreme_keys, reduced, strict=True))
        means = loss_metrics.means()
    elapsed = time.perf_counter() - start
    timing = torch.tensor([elapsed, peak_memory_mb(device)], dtype=torch.float64)
    elapsed, peak_mem = group.max(timing).tolist()
    return {
        "step": step,
        "reward_mean": _nanmean(reward_total),
        "reward_std": float(gf.reference.nanstd(reward_total)),
        **{f"rewards/{name}": _nanmean(rewards[:, j]) for j, name in enumerate(reward_names)},
        "frac_reward_zero_std": float(equal_groups.float().mean()),
        "loss": sum(losses) / len(losses),
        **means,
        "grad_norm": sum(stats.grad_norms) / len(stats.grad_norms),
        "lr": lr,
        "completion_len": len_sum / len_count if group.active else float(completion_len.mean()),
        "truncated_frac": truncated / len_count if group.active else float(out.truncated.float().mean()),
        **({"skipped_completions": skipped / len_count} if batch.skipped is not None else {}),
        "tokens_per_s": len_sum / elapsed,
        "step_time_s": elapsed,
        "peak_mem_mb": peak_mem,
    }


def _nanmean(x: Tensor) -> float:
    value = torch.nanmean(x.float())
    return float(value) if not torch.isnan(value) else 0.0


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated (CUDA) or the process's peak resident memory (CPU), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def plot_metrics(metrics_path: str | Path, png_path: str | Path) -> Path | None:
    """Reward and KL over steps; None (and no file) when there is nothing to plot."""
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (ax_r, ax_k) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    reward = [r["reward_mean"] for r in rows]
    ax_r.plot(steps, reward, lw=0.8, alpha=0.5, label="reward (step)")
    window = max(1, len(rows) // 20)
    if window > 1:
        smooth = [
            sum(reward[max(0, i - window + 1) : i + 1]) / len(reward[max(0, i - window + 1) : i + 1])
            for i in range(len(reward))
        ]
        ax_r.plot(steps, smooth, lw=1.8, label=f"reward ({window}-step mean)")
    ax_r.set_ylabel("mean reward")
    ax_r.legend(loc="lower right")
    ax_r.grid(alpha=0.3)
    ax_k.plot(steps, [r.get("kl", math.nan) for r in rows], color="tab:red", lw=1)
    ax_k.set_ylabel("KL to reference")
    ax_k.set_xlabel("step")
    ax_k.grid(alpha=0.3)
    fig.suptitle(f"GRPO run: {Path(metrics_path).parent}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return Path(png_path)


def format_samples(
    step: int, prompts: list[Any], completions: list[Any], rewards: list[float], limit: int
) -> str:
    lines = [f"--- step {step}: sample completions ---"]
    for prompt, completion, reward in list(zip(prompts, completions, rewards, strict=True))[:limit]:
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        shown = prompt[-1]["content"] if isinstance(prompt, list) else prompt
        lines.append(f"  prompt: {shown!r}\n  completion: {text!r}  reward: {reward:.3f}")
    return "\n".join(lines)


class Progress:
    """A tqdm bar over steps with reward and tokens/s, or nothing when disabled."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="GRPO", unit="step", dynamic_ncols=True)

    def update(self, metrics: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(
                reward=f"{metrics['reward_mean']:.3f}",
                kl=f"{metrics['kl']:.3g}",
                tok_s=f"{metrics['tokens_per_s']:.0f}",
                refresh=False,
            )
            self.bar.update(1)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
