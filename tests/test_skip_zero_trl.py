"""grpo_fast_skip_zero_advantage in FastGRPOTrainer: zero-gradient completions are left out of the loss step
and the old log-prob pass; loss and gradients are those of the unskipped step and of trl.GRPOTrainer."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from grpo_fast.config import LOSS_TYPES  # noqa: E402
from grpo_fast.integrations.trl import FastGRPOTrainer  # noqa: E402
from grpo_fast.trainer import demo  # noqa: E402

from .test_trainer import one_thread  # noqa: E402,F401 - autouse fixture
from .test_trl_integration import _one_batch, loss_step_trainer, model_dir  # noqa: E402,F401

LEVELS = [
    (loss_type, level)
    for loss_type in LOSS_TYPES
    for level in ("token", "sequence")
    if not (loss_type == "vespo" and level == "sequence")  # TRL's VESPO takes token-level ratios only
]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def loss_step(trainer, inputs: dict, compute) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """(loss, parameter gradients, rows the backbone ran) of one _compute_loss + backward."""
    rows = []
    hidden = trainer._hidden

    def spy(model, input_ids, *args, **kwargs):
        rows.append(input_ids.shape[0])
        return hidden(model, input_ids, *args, **kwargs)

    trainer._hidden = spy
    trainer.model.zero_grad()
    trainer._metrics["train"].clear()
    loss = compute(trainer, trainer.model, dict(inputs))
    loss.backward()
    del trainer._hidden
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sum(rows)


def assert_same(got, want, tol: float) -> None:
    torch.testing.assert_close(got[0], want[0], rtol=tol, atol=1e-7)
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        assert rel(got[1][name], want[1][name]) <= tol, (name, rel(got[1][name], want[1][name]))


def half_zero(trainer, seed: int = 7) -> dict:
    inputs = _one_batch(trainer, seed)
    inputs["advantages"][[0, 2]] = 0.0
    return inputs


@pytest.mark.parametrize("loss_type,level", LEVELS)
def test_skipped_loss_step_equals_unskipped_and_trl(model_dir, tmp_path, loss_type, level):  # noqa: F811
    options = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.0)
    trainer = loss_step_trainer(model_dir, tmp_path, dict(grpo_fast_skip_zero_advantage=True), **options)
    inputs = half_zero(trainer)
    got = loss_step(trainer, inputs, FastGRPOTrainer._compute_loss)
    assert got[2] == 2 and trainer._metrics["train"]["skipped_completions"] == [0.5]
    trainer.grpo_fast_skip_zero_advantage = False
    unskipped = loss_step(trainer, inputs, FastGRPOTrainer._compute_loss)
    assert unskipped[2] == 4
    assert_same(got, unskipped, 1e-5)
    assert_same(got, loss_step(trainer, inputs, GRPOTrainer._compute_loss), 1e-4)


def test_per_token_advantages_skip_only_all_zero_rows(model_dir, tmp_path):  # noqa: F811
    trainer = loss_step_trainer(model_dir, tmp_path, dict(grpo_fast_skip_zero_advantage=True), beta=0.0)
    inputs = _one_batch(trainer, 8)
    adv = torch.randn(inputs["completion_ids"].shape)
    adv[0] = 0.0  # skipped
    adv[1, :3] = 0.0  # row 1 trains at its tokens 3 and 4... which its mask drops: skipped too
    adv[2, 1:] = 0.0  # one token: trains
    inputs["advantages"] = adv
    got = loss_step(trainer, inputs, FastGRPOTrainer._compute_loss)
    assert got[2] == 2
    assert_same(got, loss_step(trainer, inputs, GRPOTrainer._compute_loss), 1e-4)


@pytest.mark.parametrize(
    "options,reason",
    [
        (dict(beta=0.04), "beta > 0"),
        (dict(entropy_coef=0.01), "entropy bonus"),
        (dict(top_entropy_quantile=0.5), "top_entropy_quantile"),
    ],
)
def test_options_with_a_gradient_at_advantage_zero_skip_nothing(model_dir, tmp_path, options, reason):  # noqa: F811
    trainer = loss_step_trainer(
        model_dir, tmp_path, dict(grpo_fast_skip_zero_advantage=True), **{"beta": 0.0, **options}
    )
    inputs = half_zero(trainer)
    inputs["ref_per_token_logps"] = inputs["old_per_token_logps"] - 0.02
    with pytest.warns(UserWarning, match=f"skips nothing with .*{reason}"):
        got = loss_step(trainer, inputs, FastGRPOTrainer._compute_loss)
    assert got[2] == 4 and "skipped_completions" not in trainer._metrics["train"]
    with warnings.catch_warnings():  # said once
        warnings.simplefilter("error")
        loss_step(trainer, inputs, FastGRPOTrainer._compute_loss)


def test_auxiliary_loss_skips_nothing(model_dir, tmp_path):  # noqa: F811
    trainer = loss_step_trainer(model_dir, tmp_path, dict(grpo_fast_skip_zero_advantage=True), beta=0.0)
    trainer.aux_loss_enabled = True
    assert "auxiliary loss" in trainer._skip_blocker()


def test_a_batch_where_everything_is_skipped(model_dir, tmp_path):  # noqa: F811
    trainer = loss_step_trainer(model_dir, tmp_path, dict(grpo_fast_skip_zero_advantage=True), beta=0.0)
    inputs = _one_batch(trainer, 9)
    inputs["advantages"].zero_()
    got = loss_step(trainer, inputs, FastGRPOTrainer._compute_loss)
    assert got[2] == 1 and got[0] == 0  # one row, at weight 0
    assert all(torch.count_nonzero(g) == 0 for g in got[1].values())
    assert trainer._metrics["train"]["skipped_completions"] == [1.0]
    want = loss_step(trainer, inputs, GRPOTrainer._compute_loss)
    assert want[0] == 0 and all(torch.count_nonzero(g) == 0 for g in want[1].values())


def binary(completions, **kwargs):
    """1 or 0: exact in fp32, so TRL's advantages of an equal group are exactly 0 as well."""
    return [float(len(c) % 2) for c in completions]


def make_trainer(
    cls, path: str, out, reward=binary, batch: int = 8, steps: int = 2, save_steps: int | None = None, **fast
):
    """A small TRL-configured trainer of ``cls`` on the demo rows: two iterations a batch, beta 0."""
    saving = dict(save_strategy="no") if save_steps is None else dict(save_steps=save_steps)
    args = GRPOConfig(
        output_dir=str(out), use_cpu=True, report_to=[], disable_tqdm=True, max_steps=steps,
        per_device_train_batch_size=batch, gradient_accumulation_steps=2, num_generations=4,
        max_completion_length=4, logging_steps=1, seed=0, bf16=False, learning_rate=1e-2, beta=0.0,
        num_iterations=2, gradient_checkpointing=False, **saving,
    )  # fmt: skip
    return cls(
        model=AutoModelForCausalLM.from_pretrained(path),
        reward_funcs=[reward],
        args=args,
        train_dataset=Dataset.from_list(demo.make_rows(16, seed=1)),
        processing_class=AutoTokenizer.from_pretrained(path),
        **fast,
    )


def logged(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "loss" in h]


def train(cls, path: str, out, reward=binary, batch: int = 8, **fast_options) -> list[dict]:
    trainer = make_trainer(cls, path, out, reward, batch, **fast_options)
    trainer.train()
    return logged(trainer)


def test_training_run_matches_trl(model_dir, tmp_path):  # noqa: F811
    """Whole steps (generation, rewards, the deferred old log-prob pass, two iterations per batch): the
    same losses and gradient norms as TRL's; equal groups are skipped and counted exactly."""
    want = train(GRPOTrainer, model_dir, tmp_path / "trl")
    got = train(FastGRPOTrainer, model_dir, tmp_path / "fast", grpo_fast_skip_zero_advantage=True)
    assert len(want) == len(got) == 2
    for w, g in zip(want, got, strict=True):
        assert w.keys() <= g.keys()
        for key in {"loss", "grad_norm", "reward", "frac_reward_zero_std"} & w.keys():
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), key
    assert got[0]["skipped_completions"] == got[0]["frac_reward_zero_std"] > 0


# ----- two processes: one skips everything ---------------------------------------------------------------
def equal_on_rank_1(completions, **kwargs):
    """Rank 1's completions (two whole groups: TRL gives each process whole prompts) all score 1."""
    import torch.distributed as dist

    return [1.0] * len(completions) if dist.get_rank() == 1 else binary(completions)


def _rank_worker(rank: int, init_file: str, path: str, out: str) -> None:
    from .test_trl_distributed import WORLD, _join

    _join(rank, init_file)
    try:
        kw = dict(reward=equal_on_rank_1, batch=4)
        want = train(GRPOTrainer, path, f"{out}/trl", **kw)
        got = train(FastGRPOTrainer, path, f"{out}/fast", grpo_fast_skip_zero_advantage=True, **kw)
        assert len(want) == len(got) == 2
        for w, g in zip(want, got, strict=True):
            for key in {"loss", "grad_norm", "reward", "frac_reward_zero_std"} & w.keys():
                assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), (rank, key)
        assert all(g["skipped_completions"] >= 1 / WORLD for g in got)  # rank 1's half, at least
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()


def test_a_process_that_skips_everything_matches_trl(tmp_path):
    from .test_trl_distributed import spawn_with_model

    spawn_with_model(_rank_worker, tmp_path)


def test_resume_mid_run_with_skipping(model_dir, tmp_path):  # noqa: F811
    """A run saved after step 2 and resumed logs steps 3 and 4 as the straight run does (each generation
    batch serves two steps: num_iterations=2, so a checkpoint between them would regenerate in TRL too)."""

    def run(out, **extra) -> tuple[FastGRPOTrainer, list[dict]]:
        trainer = make_trainer(
            FastGRPOTrainer, model_dir, out, steps=4, save_steps=2, grpo_fast_skip_zero_advantage=True
        )
        trainer.train(**extra)
        return trainer, logged(trainer)

    _, straight = run(tmp_path / "straight")
    checkpoint = str(tmp_path / "straight" / "checkpoint-2")
    _, resumed = run(tmp_path / "straight", resume_from_checkpoint=checkpoint)
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] == [1, 2, 3, 4]
    for got, want in zip(resumed[2:], straight[2:], strict=True):
        for key in ("loss", "grad_norm", "skipped_completions"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
