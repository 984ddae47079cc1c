"""A training step to time, and its time and peak memory, for the benchmark scripts that run one case per
process."""

from __future__ import annotations

import resource
import tempfile
import time
from collections.abc import Callable
from typing import Any


def rss_mb() -> float:
    """This process's resident set now (MB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def measure(
    step: Callable[[], None], device: str, iters: int, warmup_in_peak: bool
) -> tuple[list[float], float]:
    """Seconds of each of ``iters`` timed calls of ``step`` after one warm-up call, and the peak memory (MB)
    above what the process held before: torch's peak allocation on CUDA, the resident set's high-water
    mark on the CPU. ``warmup_in_peak``: the start is taken before the warm-up, so its memory counts."""
    import torch

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    if not warmup_in_peak:
        step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_mb()
    if warmup_in_peak:
        step()
        sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return times, peak


def trl_loss_step(
    cls: type, model: Any, inputs: dict, tokens: int, device: str, bf16: bool = False, **trainer_kwargs: Any
) -> Callable[[], None]:
    """One loss step (``_compute_loss`` + backward, dapo, no reference) of TRL's GRPOTrainer or a subclass
    (``cls``) on ``inputs``, a batch as TRL's generation hands it over with G = its rows."""
    from datasets import Dataset
    from trl import GRPOConfig

    from grpo_fast.trainer import demo

    completions = inputs["completion_ids"].shape[0]
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out, use_cpu=device == "cpu", report_to=[], per_device_train_batch_size=completions,
            num_generations=completions, max_completion_length=tokens, bf16=bf16, beta=0.0,
            gradient_checkpointing=False, loss_type="dapo",
        )  # fmt: skip
        trainer = cls(
            model=model,
            reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
            args=config,
            train_dataset=Dataset.from_list(demo.make_rows(8, seed=1)),
            processing_class=demo.build_tokenizer(),
            **trainer_kwargs,
        )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1

    def step() -> None:
        trainer.model.zero_grad(set_to_none=True)
        trainer._compute_loss(trainer.model, dict(inputs)).backward()

    return step
