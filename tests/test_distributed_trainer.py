"""Data-parallel training: 2 gloo processes, with DDP and with FSDP2, give the metrics and weights of
1 process on the same batch, and their checkpoints resume in 1 process.

Sampling is made comparable by seeding each completion from (step, its index in the step's batch),
so a completion is the same whichever rank draws it; everything after sampling (reward gathering,
group advantages, the global token count, loss shares, DDP's averaging or FSDP2's sharding, global
metrics, one checkpoint written by rank 0) is the trainer's own code. Ranks rendezvous through a
file in tmp_path.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import Tensor

from grpo_fast.trainer import TrainConfig, Trainer, demo
from grpo_fast.trainer.checkpoint import WEIGHTS, checkpoints
from grpo_fast.trainer.distributed import Layout
from grpo_fast.trainer.generation import Rollout
from grpo_fast.trainer.reporting import read_metrics

from .spawn import spawn
from .test_trainer import one_thread  # noqa: F401 - autouse fixture

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"tokens_per_s", "step_time_s", "peak_mem_mb"}
PARALLELISMS = ("ddp", "fsdp")
CASES = {
    # dapo: the global token count; 2 updates per batch (old log-probs, clipping); KL to a reference.
    "dapo": dict(loss_type="dapo", num_iterations=2, gradient_accumulation_steps=2, beta=0.04),
    # per-sequence means and GSPO's sequence-level ratio metrics; groups split across ranks.
    "grpo": dict(loss_type="grpo", importance_sampling_level="sequence", gradient_accumulation_steps=2),
    # a token mean per micro-batch; the whole batch in one micro-batch, 4 completions per rank.
    "bnpo": dict(loss_type="bnpo", num_iterations=2, epsilon=0.05, mask_truncated_completions=True),
    # packed ragged rows (RaggedRowTrainer) in passes of <= 6 tokens, which split a micro-batch
    # differently on 1 and 2 processes (FSDP2: a rank with one row of a 3-row micro-batch runs an empty
    # pass to match the other's two); an entropy bonus kept a token mean over each micro-batch.
    "packed": dict(
        loss_type="dapo",
        padding_free=True,
        max_tokens_per_microbatch=6,
        gradient_accumulation_steps=3,
        entropy_coef=0.05,
    ),
}


class RowSeededTrainer(Trainer):
    """Each completion drawn from its own seed: the same rows give the same completions on any rank."""

    def generate(
        self, prompt_ids: Tensor, prompt_mask: Tensor, conversational: bool, rows: Tensor
    ) -> Rollout:
        # Each FSDP2 forward is a collective: every rank makes as many generate calls as the busiest one.
        most = len(rows)
        if self.sharded:
            most = int(self.group.max(torch.tensor([float(len(rows))], dtype=torch.float64))[0])
        parts = []
        for i, row in enumerate(rows.tolist()):
            torch.manual_seed(1_000 * self.step + row)
            parts.append(
                super().generate(prompt_ids[i : i + 1], prompt_mask[i : i + 1], conversational, rows)
            )
        for _ in range(most - len(rows)):
            super().generate(prompt_ids[:1], prompt_mask[:1], conversational, rows)
        width = max(p.completion_ids.shape[1] for p in parts)
        pad = self.tokenizer.pad_token_id

        def right_pad(x: Tensor, value: int) -> Tensor:
            return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

        return Rollout(
            prompt_ids,
            prompt_mask,
            torch.cat([right_pad(p.completion_ids, pad) for p in parts]),
            torch.cat([right_pad(p.completion_mask, 0) for p in parts]),
            torch.cat([p.truncated for p in parts]),
            [c for p in parts for c in p.completions],
        )


class RaggedRowTrainer(RowSeededTrainer):
    """Row r's completion cut to 1 + r % 4 tokens: ranks hold different token counts, so token-budget
    passes differ in number (FSDP2 pads them) and in size."""

    def generate(
        self, prompt_ids: Tensor, prompt_mask: Tensor, conversational: bool, rows: Tensor
    ) -> Rollout:
        out = super().generate(prompt_ids, prompt_mask, conversational, rows)
        keep = (1 + rows % 4).unsqueeze(1).to(out.completion_mask.device)
        columns = torch.arange(out.completion_mask.shape[1], device=keep.device)
        mask = out.completion_mask * (columns < keep)
        return Rollout(
            out.prompt_ids, out.prompt_mask, out.completion_ids, mask, out.truncated, out.completions
        )


TRAINERS = {"packed": RaggedRowTrainer}


def config(run_dir: Path, **overrides) -> TrainConfig:
    values = dict(
        output_dir=str(run_dir),
        max_steps=2,
        prompts_per_step=2,
        num_generations=4,
        learning_rate=1e-2,
        progress=False,
        print_completions_every=0,
        save_every=0,
        device="cpu",
    )
    return TrainConfig.from_dict({**values, **overrides})


def _worker(rank: int, world: int, init_file: str, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for parallelism in PARALLELISMS:
            for name, options in CASES.items():
                run_dir = Path(root) / parallelism / name
                cls = TRAINERS.get(name, RowSeededTrainer)
                trainer = cls(config(run_dir, parallelism=parallelism, **options))
                assert trainer.group.world == world
                assert (trainer.ddp is not None) == (parallelism == "ddp") and trainer.sharded != (
                    parallelism == "ddp"
                )
                trainer.train()
                if parallelism == "fsdp":  # each rank holds a shard of each parameter
                    p = next(trainer.model.parameters())
                    assert p.to_local().shape[0] < p.shape[0], name
                    continue
                # DDP kept the replicas equal.
                flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
                copies = [torch.empty_like(flat) for _ in range(world)]
                dist.all_gather(copies, flat)
                assert all(torch.equal(c, copies[0]) for c in copies), name
        _resume_and_failures(Path(root), rank)
        dist.barrier()  # both ranks tear the group down together, none while another still reads results
    finally:
        dist.destroy_process_group()


_calls: list[int] = []


def _fails_once_on_rank_1(prompts, completions, answer, **kwargs):
    _calls.append(1)
    if dist.get_rank() == 1 and len(_calls) == 2:
        raise RuntimeError("grader offline")
    return demo.reward(prompts, completions, answer)


def _resume_and_failures(root: Path, rank: int) -> None:
    """Real sampling (seeded per step and rank): 2 steps + resume == 3 steps; a reward failing on one
    rank skips the step on every rank."""
    Trainer(config(root / "straight", max_steps=3)).train()
    Trainer(config(root / "cut", max_steps=2)).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a resume that changes options may say so; not what this checks
        assert Trainer(config(root / "cut", max_steps=3)).train(resume=True).steps == 3
    result = Trainer(config(root / "flaky"), reward_funcs=[_fails_once_on_rank_1]).train()
    assert result.steps == 2 and len(_calls) == 3
    if rank == 0:
        straight, cut = (read_metrics(root / d / "metrics.jsonl") for d in ("straight", "cut"))
        strip = [{k: v for k, v in r.items() if k not in TIMING} for r in straight]
        assert [{k: v for k, v in r.items() if k not in TIMING} for r in cut] == strip
        assert [r["step"] for r in read_metrics(root / "flaky" / "metrics.jsonl")] == [1, 2]


def _final_weights(run_dir: Path) -> dict[str, Tensor]:
    (last,) = checkpoints(run_dir)  # written once, by rank 0
    return load_file(last / WEIGHTS)


def _assert_rows_close(got: list[dict], want: list[dict], what: str) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want], what
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys(), what
        for key in w.keys() - TIMING:
            want = pytest.approx(w[key], rel=1e-4, abs=1e-6, nan_ok=True)  # clip extremes: NaN without any
            assert g[key] == want, (what, g["step"], key, g[key], w[key])


def test_layout_splits_each_micro_batch_across_ranks():
    layout = Layout.build(8, 2, world=2, rank=1)
    assert [m.tolist() for m in layout.micro] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layout.local.tolist() == [2, 3, 6, 7] and layout.counts() == [4, 4]
    assert [m.tolist() for m in layout.local_micro()] == [[0, 1], [2, 3]]
    uneven = Layout.build(10, 1, world=3, rank=0)
    assert uneven.counts() == [4, 3, 3] and uneven.rank_rows(2).tolist() == [7, 8, 9]
    single = Layout.build(6, 4, world=1, rank=0)
    assert [m.tolist() for m in single.local_micro()] == [m.tolist() for m in torch.arange(6).tensor_split(4)]
    with pytest.raises(ValueError, match="at least one completion per process"):
        Layout.build(8, 4, world=4, rank=0)


def test_two_processes_match_one_on_the_same_global_batch(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    multi = tmp_path / "two"
    spawn(_worker, args=(2, str(tmp_path / "rendezvous"), str(multi)), nprocs=2)
    for name, options in CASES.items():
        single = TRAINERS.get(name, RowSeededTrainer)(config(tmp_path / "one" / name, **options))
        single.train()
        want = read_metrics(tmp_path / "one" / name / "metrics.jsonl")
        ref = _final_weights(tmp_path / "one" / name)
        for parallelism in PARALLELISMS:
            what = f"{parallelism} {name}"
            got = read_metrics(multi / parallelism / name / "metrics.jsonl")
            assert len(got) == 2 and all(math.isfinite(r["loss"]) for r in got), what
            _assert_rows_close(got, want, what)
            if name == "dapo":
                assert got[-1]["kl"] > 0 and any(r["clip_ratio"] > 0 or r["grad_norm"] > 0 for r in got)
            weights = _final_weights(multi / parallelism / name)
            assert weights.keys() == ref.keys(), what
            for key in ref:
                torch.testing.assert_close(weights[key], ref[key], rtol=1e-4, atol=2e-5, msg=f"{what}: {key}")

    # A 2-process checkpoint (DDP or FSDP2) resumes in 1 process: step 3 is that of a 3-step run.
    name, options = "dapo", CASES["dapo"]
    straight = RowSeededTrainer(config(tmp_path / "straight", max_steps=3, **options))
    straight.train()
    for parallelism in PARALLELISMS:
        resumed_dir = tmp_path / "resumed" / parallelism
        shutil.copytree(multi / parallelism / name, resumed_dir)
        resumed = RowSeededTrainer(config(resumed_dir, max_steps=3, **options))  # more steps: a safe change
        assert resumed.train(resume=True).steps == 3
        _assert_rows_close(
            read_metrics(resumed_dir / "metrics.jsonl"),
            read_metrics(tmp_path / "straight" / "metrics.jsonl"),
            f"resume from {parallelism}",
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_cli(tmp_path):
    """``torchrun -m grpo_fast.cli train --parallelism fsdp``: the CLI joins the group, shards the model,
    rank 0 alone writes and prints."""
    run_dir = tmp_path / "run"
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"),
        *("--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}"),
        *("-m", "grpo_fast.cli", "train", "--output-dir", str(run_dir), "--device", "cpu"),
        *("--max-steps", "2", "--save-every", "1", "--prompts-per-step", "2", "--num-generations", "4"),
        *("--no-progress", "--print-completions-every", "1", "--parallelism", "fsdp"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.count("grpo-fast train: model demo") == 1, done.stdout  # printed by rank 0 only
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2]
    assert [p.name for p in checkpoints(run_dir)] == ["checkpoint-000001", "checkpoint-000002"]
    assert not list(run_dir.glob(".checkpoint-*")) and (run_dir / "reward_kl.png").is_file()
