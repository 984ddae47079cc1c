"""``FastGRPOTrainer(grpo_fast_padding_free=True)`` against trl.GRPOTrainer's padded steps: the
loss step on ragged batches (left-padded prompts, right-padded completions), the old/reference log-prob
pass, whole training runs (a MoE model too), and models that cannot pack refused by name."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from transformers import AutoModelForCausalLM  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

from grpo_fast.integrations.trl import FastGRPOTrainer  # noqa: E402

from . import test_trl_integration as base  # noqa: E402
from .test_trainer import one_thread  # noqa: E402,F401 - autouse fixture
from .test_trl_integration import (
    _one_batch,
    assert_same_logs,
    assert_same_loss_step,
    both_loss_steps,
    correct,
    loss_step_trainer,
    train,
    with_case,
)  # noqa: E402

model_dir, moe_dir = base.model_dir, base.moe_dir  # the tiny Qwen2 and Mixtral directories (fixtures)


class PaddingFree(FastGRPOTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, grpo_fast_padding_free=True, **kwargs)


def ragged_batch(trainer, seed: int) -> dict:
    """``_one_batch`` with left-padded prompts of 1-3 tokens and completions of 1-5 tokens."""
    inputs = _one_batch(trainer, seed)
    inputs["prompt_mask"] = torch.tensor([[0, 0, 1], [1, 1, 1], [0, 1, 1], [0, 0, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    inputs["completion_mask"] = mask
    inputs["num_items_in_batch"] = mask.sum().float()
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    with torch.no_grad():  # TRL's own padded pass: old log-probs of these rows as TRL scores them
        logp = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, ids, torch.cat([inputs["prompt_mask"], mask], 1), 5
        )[0]
    g = torch.Generator().manual_seed(seed)
    inputs["old_per_token_logps"] = logp + 0.05 * torch.randn(*mask.shape, generator=g)
    inputs["sampling_per_token_logps"] = logp - 0.05 * torch.rand(*mask.shape, generator=g)
    inputs["ref_per_token_logps"] = inputs["old_per_token_logps"] - 0.02
    return inputs


@pytest.mark.parametrize(
    "case", ["plain", "token_advantages", "is_token_truncate", "is_sequence_mask", "off_policy"]
)
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_padding_free_loss_step_matches_trls_padded_step(model_dir, tmp_path, case, loss_type):
    trainer = loss_step_trainer(
        model_dir,
        tmp_path,
        loss_type=loss_type,
        off_policy_mask_threshold=0.01 if case == "off_policy" else None,
        entropy_coef=0.01,
    )
    trainer.grpo_fast_padding_free = True
    inputs = ragged_batch(trainer, seed=5)
    with_case(trainer, inputs, case)
    assert_same_loss_step(*both_loss_steps(trainer, inputs))
    assert not trainer._fallback_warned


def test_padding_free_logprob_pass_matches_trls(model_dir, tmp_path):
    trainer = loss_step_trainer(model_dir, tmp_path)
    inputs = ragged_batch(trainer, seed=2)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    trainer.model.eval()
    with torch.no_grad():
        want = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, ids, am, 5, 3, True)
        trainer.grpo_fast_padding_free = True
        got = trainer._get_per_token_logps_and_entropies(trainer.model, ids, am, 5, 3, True)
    keep = inputs["completion_mask"] != 0
    for g, w in zip(got[:2], want[:2], strict=True):
        torch.testing.assert_close(g[keep], w[keep], rtol=1e-5, atol=1e-5)
        assert (g[~keep] == 0).all()


@pytest.mark.parametrize(
    "options", [dict(loss_type="dapo", beta=0.04, num_iterations=2), dict(loss_type="grpo")]
)
def test_padding_free_training_matches_trl(model_dir, tmp_path, options):
    _, want = train(GRPOTrainer, model_dir, tmp_path, **options)
    fast, got = train(PaddingFree, model_dir, tmp_path, **options)
    assert fast.grpo_fast_padding_free and not fast._fallback_warned
    assert_same_logs(want, got, what="padding-free")


def test_padding_free_moe_matches_trl(moe_dir, tmp_path):
    """The auxiliary loss over the packed batch's real tokens, as TRL's over its attention mask."""
    _, want = train(GRPOTrainer, moe_dir, tmp_path, loss_type="dapo")
    fast, got = train(PaddingFree, moe_dir, tmp_path, loss_type="dapo")
    assert fast.aux_loss_enabled and "aux_loss" in got[0]
    assert_same_logs(want, got, what="padding-free moe")


def test_models_that_cannot_pack_are_refused(model_dir, tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig

    from grpo_fast.trainer import demo

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(ValueError, match="linear_attention"):
        FastGRPOTrainer(
            model=model,
            reward_funcs=[correct],
            args=GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], num_generations=4),
            train_dataset=Dataset.from_list(demo.make_rows(8, seed=1)),
            grpo_fast_padding_free=True,
        )
    with pytest.raises(TypeError, match="grpo_fast_padding_free must be a bool"):
        FastGRPOTrainer(model=model, reward_funcs=[correct], grpo_fast_padding_free="yes")
