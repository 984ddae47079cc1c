"""FastGRPOTrainer against trl.GRPOTrainer: same seed, same losses, grad norms and metrics (and names)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")  # TRL's trainer needs it; the bare GPU image does not have it

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from grpo_fast.integrations.trl import FastGRPOTrainer  # noqa: E402
from grpo_fast.trainer import demo  # noqa: E402

from .test_trainer import one_thread  # noqa: E402,F401 - autouse fixture

# Wall-clock metrics differ run to run; everything else is compared.
TIMING = ("step_time",)


def correct(prompts, completions, answer, **kwargs):
    return demo.reward(prompts, completions, answer)


def length(completions, **kwargs):
    return [len(c) / 10 for c in completions]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen2")
    demo.save_pretrained(str(path))
    return str(path)


def train(cls, model_dir, tmp_path, **options):
    """A few steps of ``cls`` (TRL's trainer or ours) on the demo task; options override TRL's config."""
    defaults = dict(
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        max_steps=3,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        num_generations=4,
        max_completion_length=4,
        logging_steps=1,
        seed=0,
        bf16=False,
        learning_rate=1e-2,
        epsilon_high=0.28,
        gradient_checkpointing=False,
    )
    args = GRPOConfig(output_dir=str(Path(tmp_path) / cls.__name__), **{**defaults, **options})
    trainer = cls(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        reward_funcs=[correct, length],
        args=args,
        train_dataset=Dataset.from_list(demo.make_rows(16, seed=1)),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    trainer.train()
    return trainer, [h for h in trainer.state.log_history if "loss" in h]


def assert_same_logs(trl_logs, fast_logs, steps=3, what=""):
    assert len(trl_logs) == len(fast_logs) == steps
    for want, got in zip(trl_logs, fast_logs, strict=True):
        assert want.keys() == got.keys(), f"TRL's metric names must be kept {what}"
        for key, value in want.items():
            if isinstance(value, float) and key not in TIMING:
                assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (what, key, got[key], value)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo", "bnpo"])
def test_same_losses_and_grad_norms_as_trl(model_dir, tmp_path, loss_type, beta, level):
    # Two updates per batch with beta > 0: old log-probs, ratios != 1 and clipping take part too.
    options = dict(
        loss_type=loss_type, beta=beta, importance_sampling_level=level, num_iterations=2 if beta else 1
    )
    _, want = train(GRPOTrainer, model_dir, tmp_path, **options)
    fast, got = train(FastGRPOTrainer, model_dir, tmp_path, **options)
    assert not fast._fallback_warned
    assert_same_logs(want, got)


@pytest.mark.parametrize("loss_type", ["cispo", "sapo", "luspo"])
def test_other_loss_types_match_trl(model_dir, tmp_path, loss_type):
    # TRL's default gradient checkpointing on: the hidden-states forward must work through it too.
    options = dict(loss_type=loss_type, num_iterations=2, beta=0.04, gradient_checkpointing=True)
    _, want = train(GRPOTrainer, model_dir, tmp_path, **options)
    _, got = train(FastGRPOTrainer, model_dir, tmp_path, **options)
    assert_same_logs(want, got)


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_vespo_matches_trl_without_fallback(model_dir, tmp_path, beta):
    # Two updates per batch: old log-probs differ from the policy's, so phi(w) != 1 and the gamma weights
    # (with non-default k and lambda) shape the gradient; vespo/phi_seq_mean is compared as TRL logs it.
    options = dict(
        loss_type="vespo",
        num_iterations=2,
        beta=beta,
        vespo_k_pos=1.5,
        vespo_lambda_pos=2.5,
        vespo_k_neg=2.5,
        vespo_lambda_neg=1.5,
    )
    _, want = train(GRPOTrainer, model_dir, tmp_path, **options)
    fast, got = train(FastGRPOTrainer, model_dir, tmp_path, **options)
    assert not fast._fallback_warned and fast._gf_config.loss_type == "vespo"
    assert fast._gf_config.vespo_lambda_neg == 1.5
    assert "vespo/phi_seq_mean" in got[0]
    assert_same_logs(want, got)


def test_loss_step_never_takes_trls_logprob_path(model_dir, tmp_path, monkeypatch):
    calls = []
    original = GRPOTrainer._get_per_token_logps_and_entropies

    def spy(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", spy)
    train(FastGRPOTrainer, model_dir, tmp_path)  # beta 0, one iteration: no old/ref pass either
    assert calls == []


def test_unsupported_option_falls_back_to_trl_with_one_warning(model_dir, tmp_path):
    options = dict(top_entropy_quantile=0.5)
    _, want = train(GRPOTrainer, model_dir, tmp_path, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, got = train(FastGRPOTrainer, model_dir, tmp_path, **options)
    messages = [str(w.message) for w in caught if "FastGRPOTrainer" in str(w.message)]
    assert len(messages) == 1 and "top_entropy_quantile < 1" in messages[0]
    assert_same_logs(want, got)
