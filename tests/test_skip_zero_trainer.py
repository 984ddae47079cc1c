"""skip_zero_advantage in the thin trainer: completions with a gradient of exactly 0 are left out of the
policy's forward/backward and the old log-probs, and the update is that of the unskipped step."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor

import grpo_fast as gf
from grpo_fast.advantages import equal_reward_groups
from grpo_fast.config import LOSS_TYPES
from grpo_fast.trainer import Trainer
from grpo_fast.trainer.reporting import read_metrics

from .spawn import spawn
from .test_trainer import one_thread, tiny  # noqa: F401 - autouse fixture

TIMING = {"tokens_per_s", "step_time_s", "peak_mem_mb"}


class HalfEqualTrainer(Trainer):
    """Rewards by a completion's row in the step: the second group of every two gets one reward for all its
    completions (advantage 0), the first group distinct ones. ``constant=True``: every group is equal."""

    constant = False
    forward_rows = 0  # rows of the policy's loss passes
    logprob_rows = 0  # rows of the no-grad log-prob passes

    def rewards(self, rows, out, select: Tensor | None = None) -> Tensor:
        n = out.completion_ids.shape[0]
        ids = torch.arange(n) if select is None else select.cpu()
        G = self.cfg.num_generations
        equal = torch.ones(n, dtype=torch.bool) if self.constant else (ids // G) % 2 == 1
        return torch.where(equal, 0.7, (ids % G).float() * 0.25).unsqueeze(1)

    def policy_loss(self, rows, *args, **kwargs):
        self.forward_rows += rows.completion_ids.shape[0]
        return super().policy_loss(rows, *args, **kwargs)

    def logprobs(self, model, out, passes):
        self.logprob_rows += sum(len(p) for p in passes)
        return super().logprobs(model, out, passes)


def one_update(tmp_path, skip: bool, constant: bool = False, **options):
    """(batch, stats, flat weights) of the first step's updates."""
    cls = type("T", (HalfEqualTrainer,), {"constant": constant})
    values = dict(
        num_iterations=2, gradient_accumulation_steps=2, skip_zero_advantage=skip, weight_decay=0.1, beta=0.0
    )
    trainer = cls(tiny(tmp_path / str(skip), **{**values, **options}))
    torch.manual_seed(0)
    batch = trainer.build_batch()
    stats = trainer.update(batch)
    weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    return trainer, batch, stats, weights


def assert_same_update(got, want) -> None:
    (_, _, stats, weights), (_, _, want_stats, want_weights) = got, want
    torch.testing.assert_close(
        torch.tensor(stats.losses), torch.tensor(want_stats.losses), rtol=1e-5, atol=1e-8
    )
    torch.testing.assert_close(
        torch.tensor(stats.grad_norms), torch.tensor(want_stats.grad_norms), rtol=1e-5, atol=1e-8
    )
    torch.testing.assert_close(weights, want_weights, rtol=0, atol=1e-6)


LEVELS = [
    (loss_type, level)
    for loss_type in LOSS_TYPES
    for level in ("token", "sequence")
    if not (loss_type == "vespo" and level == "sequence")  # TRL's VESPO takes token-level ratios only
]


@pytest.mark.parametrize("loss_type,level", LEVELS)
def test_skipped_update_equals_the_full_one(tmp_path, loss_type, level):
    options = dict(loss_type=loss_type, importance_sampling_level=level)
    got = one_update(tmp_path, True, **options)
    want = one_update(tmp_path, False, **options)
    trainer, batch, _, _ = got
    G = trainer.cfg.num_generations
    assert batch.skipped.tolist() == [False] * G + [True] * G and want[1].skipped is None
    # The equal group runs no forward, in the updates (2 iterations) or the old log-probs.
    assert trainer.forward_rows == 2 * G and trainer.logprob_rows == G
    assert want[0].forward_rows == 4 * G and want[0].logprob_rows == 2 * G
    torch.testing.assert_close(batch.old[:G], want[1].old[:G], rtol=1e-5, atol=1e-6)
    assert_same_update(got, want)


@pytest.mark.parametrize(
    "options,reason",
    [
        (dict(beta=0.04), "beta > 0"),
        (dict(entropy_coef=0.01), "entropy bonus"),
        (dict(top_entropy_quantile=0.5), "top_entropy_quantile"),
    ],
)
def test_options_with_a_gradient_at_advantage_zero_skip_nothing(tmp_path, options, reason):
    with pytest.warns(UserWarning, match=f"skip_zero_advantage skips nothing with .*{reason}"):
        trainer, batch, _, _ = one_update(tmp_path, True, **options)
    assert not batch.skipped.any()
    assert trainer.forward_rows == 2 * 2 * trainer.cfg.num_generations
    with warnings.catch_warnings():  # said once
        warnings.simplefilter("error")
        trainer.build_batch()


def test_a_batch_where_everything_is_skipped(tmp_path):
    got = one_update(tmp_path, True, constant=True)
    want = one_update(tmp_path, False, constant=True)
    trainer, batch, stats, _ = got
    assert batch.skipped.all() and trainer.forward_rows == trainer.logprob_rows == 0
    assert stats.losses == [0.0, 0.0]
    assert_same_update(got, want)  # AdamW's weight decay and moments move the weights as unskipped
    means = stats.metrics.means()
    assert math.isnan(means["entropy"]) and math.isnan(means["kl"])


def test_metrics_of_a_run(tmp_path):
    trainer = HalfEqualTrainer(tiny(tmp_path, max_steps=2, beta=0.0))
    assert trainer.cfg.skip_zero_advantage  # on by default
    rows = read_metrics(trainer.train().metrics_path)
    assert [r["skipped_completions"] for r in rows] == [0.5, 0.5]
    assert [r["frac_reward_zero_std"] for r in rows] == [0.5, 0.5]
    off = HalfEqualTrainer(tiny(tmp_path / "off", max_steps=2, beta=0.0, skip_zero_advantage=False))
    off_rows = read_metrics(off.train().metrics_path)
    assert all("skipped_completions" not in r for r in off_rows)
    for got, want in zip(rows, off_rows, strict=True):
        for key in ("loss", "grad_norm", "reward_mean", "frac_reward_zero_std"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-8), key


def test_all_skipped_run_logs_and_finishes(tmp_path):
    cls = type("T", (HalfEqualTrainer,), {"constant": True})
    rows = read_metrics(cls(tiny(tmp_path, max_steps=2, beta=0.0)).train().metrics_path)
    assert [r["skipped_completions"] for r in rows] == [1.0, 1.0]
    assert all(r["loss"] == 0.0 and math.isnan(r["entropy"]) for r in rows)


def test_resume_mid_run_with_skipping(tmp_path):
    run = dict(num_iterations=2, beta=0.0)
    straight = HalfEqualTrainer(tiny(tmp_path / "straight", max_steps=3, **run))
    want = read_metrics(straight.train().metrics_path)
    HalfEqualTrainer(tiny(tmp_path / "cut", max_steps=2, **run)).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # max_steps 2 -> 3 is reported
        resumed = HalfEqualTrainer(tiny(tmp_path / "cut", max_steps=3, **run))
        got = read_metrics(resumed.train(resume=True).metrics_path)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert strip(got) == strip(want)
    assert all(r["skipped_completions"] == 0.5 for r in got)


def test_equal_rewards_are_exactly_zero_advantage_groups():
    rewards = torch.tensor([0.7] * 8 + [0.7] * 7 + [0.7000001] + [float("nan"), 1.0, 1.0, float("nan")] * 2)
    assert float(rewards[:8].std()) > 1e-8  # a float32 std of equal rewards is not 0
    assert equal_reward_groups(rewards, 8).tolist() == [True, False, True]
    adv = gf.group_advantages(rewards, 8)
    assert (adv[:8] == 0).all() and (adv[16:] == 0).all() and (adv[8:16] != 0).any()


# ----- several processes: a rank that skips everything ---------------------------------------------------
def _rank_worker(rank: int, world: int, init_file: str, root: str) -> None:
    import torch.distributed as dist

    from .test_distributed_trainer import RowSeededTrainer, config

    class RankSkips(HalfEqualTrainer, RowSeededTrainer):
        """Rows 4-7 of each step (all of rank 1's) form a group of equal rewards."""

        def build_batch(self):
            batch = super().build_batch()
            self.all_skipped = getattr(self, "all_skipped", []) + [bool(batch.skipped.all())]
            return batch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for parallelism in ("ddp", "fsdp"):
            trainer = RankSkips(config(Path(root) / parallelism, parallelism=parallelism, **RANK_CASE))
            trainer.train()
            assert trainer.all_skipped == [rank == 1] * 2, (rank, trainer.all_skipped)
        dist.barrier()
    finally:
        dist.destroy_process_group()


RANK_CASE = dict(loss_type="grpo", beta=0.0, num_iterations=2)


@pytest.mark.slow  # two gloo processes, DDP then FSDP2, and a 1-process reference: ~30-70 s here
def test_a_rank_that_skips_everything_takes_part_in_every_collective(tmp_path):
    import os

    from .test_distributed_trainer import RowSeededTrainer, _assert_rows_close, _final_weights, config

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    spawn(_rank_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path / "two")), nprocs=2)
    single = type("S", (HalfEqualTrainer, RowSeededTrainer), {})(config(tmp_path / "one", **RANK_CASE))
    single.train()
    want = read_metrics(tmp_path / "one" / "metrics.jsonl")
    assert [r["skipped_completions"] for r in want] == [0.5, 0.5]
    for parallelism in ("ddp", "fsdp"):
        _assert_rows_close(read_metrics(tmp_path / "two" / parallelism / "metrics.jsonl"), want, parallelism)
        got, ref = _final_weights(tmp_path / "two" / parallelism), _final_weights(tmp_path / "one")
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=2e-5, msg=f"{parallelism}: {key}")
