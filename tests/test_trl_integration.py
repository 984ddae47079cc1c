"""FastGRPOTrainer against trl.GRPOTrainer: same seed, same losses, grad norms and metrics (and names)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

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


TRL_LOSS_OPTIONS = {
    "entropy_quantile": dict(top_entropy_quantile=0.5),
    "off_policy_mask": dict(off_policy_mask_threshold=0.001, num_iterations=2, beta=0.04),
    "entropy_bonus": dict(entropy_coef=0.05),
    # the demo's entropy is far above 0.2: a target above it turns the bonus on from the second step
    "adaptive_entropy": dict(use_adaptive_entropy=True, entropy_target=50.0, entropy_coef=0.02),
    "all": dict(
        top_entropy_quantile=0.5, off_policy_mask_threshold=0.001, num_iterations=2, beta=0.04,
        use_adaptive_entropy=True, entropy_target=50.0, entropy_coef=0.02,
    ),
}  # fmt: skip


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
@pytest.mark.parametrize("option", list(TRL_LOSS_OPTIONS))
def test_trl_loss_options_match_trl_without_fallback(model_dir, tmp_path, option, loss_type):
    options = dict(loss_type=loss_type, **TRL_LOSS_OPTIONS[option])
    _, want = train(GRPOTrainer, model_dir, tmp_path, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast, got = train(FastGRPOTrainer, model_dir, tmp_path, **options)
    assert not fast._fallback_warned and not [w for w in caught if "FastGRPOTrainer" in str(w.message)]
    assert_same_logs(want, got, what=option)


def _one_batch(trainer, seed: int) -> dict:
    """A generation batch as TRL's _generate_and_score_completions hands it to _compute_loss."""
    g = torch.Generator().manual_seed(seed)
    B, P, C, V = 4, 3, 5, trainer.model.config.vocab_size
    prompt_ids = torch.randint(0, V, (B, P), generator=g)
    completion_ids = torch.randint(0, V, (B, C), generator=g)
    completion_mask = torch.ones(B, C, dtype=torch.long)
    completion_mask[1, 3:] = 0
    with torch.no_grad():
        logp = trainer._get_per_token_logps_and_entropies(
            trainer.model,
            torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([torch.ones(B, P, dtype=torch.long), completion_mask], 1),
            C,
        )[0]
    return dict(
        prompt_ids=prompt_ids,
        prompt_mask=torch.ones(B, P, dtype=torch.long),
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        advantages=torch.randn(B, generator=g),
        num_items_in_batch=completion_mask.sum().float(),
        old_per_token_logps=logp + 0.05 * torch.randn(B, C, generator=g),
        sampling_per_token_logps=logp - 0.05 * torch.rand(B, C, generator=g),
    )


def loss_step_trainer(model_dir, out, fast_options: dict | None = None, **options) -> FastGRPOTrainer:
    """A FastGRPOTrainer whose _compute_loss the tests call directly (TRL's and ours, one batch);
    ``fast_options`` are FastGRPOTrainer's own keywords, ``options`` TRL's config."""
    defaults = dict(
        use_cpu=True, report_to=[], per_device_train_batch_size=4, num_generations=4,
        max_completion_length=5, loss_type="dapo", beta=0.04, seed=0, bf16=False,
    )  # fmt: skip
    trainer = FastGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        reward_funcs=[correct],
        args=GRPOConfig(output_dir=str(out), **{**defaults, **options}),
        train_dataset=Dataset.from_list(demo.make_rows(8, seed=1)),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        **(fast_options or {}),
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train() otherwise
    return trainer


def both_loss_steps(trainer, inputs: dict, full=lambda grad: grad.clone()) -> list[tuple]:
    """(loss, parameter gradients, logged metrics) of TRL's _compute_loss, then of ours, on ``inputs``;
    ``full`` turns a parameter's gradient into a whole tensor (FSDP2: ``full_tensor()``)."""
    results = []
    for compute in (GRPOTrainer._compute_loss, FastGRPOTrainer._compute_loss):
        trainer.model.zero_grad()
        trainer._metrics["train"].clear()
        loss = compute(trainer, trainer.model, dict(inputs))
        loss.backward()
        grads = {n: full(p.grad) for n, p in trainer.model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, {k: list(v) for k, v in trainer._metrics["train"].items()}))
    return results


def assert_same_loss_step(want: tuple, got: tuple) -> None:
    """TRL's (loss, gradients, logs) from ``both_loss_steps`` and ours agree."""
    (want_loss, want_grads, want_logs), (got_loss, got_grads, got_logs) = want, got
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-4, atol=1e-6)
    assert want_grads.keys() == got_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-3, atol=1e-6, msg=name)
    assert want_logs.keys() == got_logs.keys()
    for key in want_logs:
        assert got_logs[key] == pytest.approx(want_logs[key], rel=1e-4, abs=1e-6, nan_ok=True), key


def with_case(trainer, inputs: dict, case: str) -> None:
    """Inputs of ``case`` in place: per-token advantages, or vLLM's importance-sampling ratio (per token,
    or per sequence with one sequence masked out by TRL's sequence_mask mode)."""
    g = torch.Generator().manual_seed(3)
    B, C = inputs["completion_ids"].shape
    if case == "token_advantages":
        inputs["advantages"] = torch.randn(B, C, generator=g)
    if case.startswith("is_"):
        trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
        shape = (B, C) if case == "is_token_truncate" else (B, 1)
        ratio = torch.exp(0.2 * torch.randn(*shape, generator=g)).clamp(max=2.0)
        if case == "is_sequence_mask":
            ratio[0] = 0.0
        inputs["importance_sampling_ratio"] = ratio * (inputs["completion_mask"] if shape[1] > 1 else 1)
        inputs["importance_sampling_ratio"] += (1 - inputs["completion_mask"]) if shape[1] > 1 else 0


@pytest.mark.parametrize(
    "case", ["plain", "token_advantages", "is_token_truncate", "is_sequence_mask", "sampling_off_policy"]
)
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "vespo"])
def test_compute_loss_inputs_match_trl(model_dir, tmp_path, case, loss_type):
    """Inputs a CPU run of TRL cannot make (vLLM's importance-sampling ratio and sampling log-probs) or only
    a subclass makes (per-token advantages): TRL's _compute_loss and ours on one trainer, one batch."""
    if loss_type == "vespo" and case == "is_sequence_mask":
        pytest.skip("TRL's VESPO takes token-level IS modes only")
    trainer = loss_step_trainer(
        model_dir,
        tmp_path,
        loss_type=loss_type,
        off_policy_mask_threshold=0.01 if case == "sampling_off_policy" else None,
    )
    inputs = _one_batch(trainer, seed=7)
    inputs["ref_per_token_logps"] = inputs["old_per_token_logps"] - 0.02
    with_case(trainer, inputs, case)
    assert_same_loss_step(*both_loss_steps(trainer, inputs))
    assert not trainer._fallback_warned


HEADS = {
    "logits_scaling": dict(logits_scaling=2.0),  # Granite: divides the logits
    "logit_scale": dict(logit_scale=1.7),  # Cohere: multiplies them
    "softcap": dict(final_logit_softcapping=3.0),  # Gemma 2: cap * tanh(logits / cap)
    "softcap+scale": dict(final_logit_softcapping=3.0, logit_scale=1.7),  # scale first, then the cap
}


def _patched_config(monkeypatch, **attrs):
    real = AutoModelForCausalLM.from_pretrained

    def patched(*a, **kw):
        model = real(*a, **kw)
        for name, value in attrs.items():
            setattr(model.config, name, value)
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", patched)


@pytest.mark.parametrize("head", list(HEADS))
def test_scaled_and_soft_capped_heads_match_trl_without_fallback(model_dir, tmp_path, monkeypatch, head):
    # TRL's fused head applies the model's logit scale and soft-cap to the loss and the old/ref log-probs;
    # grpo_fast folds them into its temperature and logit_softcap. (Qwen2's own forward, used for
    # generation by both trainers, ignores these attributes.) A small cap, so that tanh bends.
    _patched_config(monkeypatch, **HEADS[head])
    options = dict(num_iterations=2, beta=0.04, temperature=0.9)
    _, want = train(GRPOTrainer, model_dir, tmp_path, **options)
    fast, got = train(FastGRPOTrainer, model_dir, tmp_path, **options)
    assert not fast._fallback_warned
    assert (fast._gf_config.logit_softcap is not None) == ("softcap" in head)
    assert_same_logs(want, got, what=head)


def test_unsupported_head_falls_back_to_trl_with_one_warning(model_dir, tmp_path, monkeypatch):
    # A negative logit scale cannot fold into a (positive) temperature: those steps run TRL's code, said once.
    _patched_config(monkeypatch, logit_scale=-1.0)
    _, want = train(GRPOTrainer, model_dir, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, got = train(FastGRPOTrainer, model_dir, tmp_path)
    messages = [str(w.message) for w in caught if "FastGRPOTrainer" in str(w.message)]
    assert len(messages) == 1 and "scales its logits (by -1.0)" in messages[0]
    assert_same_logs(want, got)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    """A tiny Mixtral (4 experts, 2 per token) with the demo's tokenizer: TRL's MoE auxiliary loss is on."""
    from transformers import MixtralConfig, MixtralForCausalLM

    path = tmp_path_factory.mktemp("tiny-mixtral")
    tokenizer = demo.build_tokenizer()
    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=32, router_aux_loss_coef=0.02, output_router_logits=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = MixtralForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_moe_auxiliary_loss_matches_trl_without_fallback(moe_dir, tmp_path, loss_type):
    _, want = train(GRPOTrainer, moe_dir, tmp_path, loss_type=loss_type)
    fast, got = train(FastGRPOTrainer, moe_dir, tmp_path, loss_type=loss_type)
    assert fast.aux_loss_enabled and not fast._fallback_warned
    assert "aux_loss" in got[0]
    assert_same_logs(want, got, what="moe")


class _BatchInvariant(FastGRPOTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, grpo_fast_batch_invariant=True, **kwargs)


def test_old_logprobs_come_from_grpo_fast_and_on_policy_ratio_is_one(model_dir, tmp_path, monkeypatch):
    """bf16, GSPO's epsilons (3e-4 / 4e-4): old log-probs from TRL's own pass used to make 12.5% of
    sequences clipped on freshly sampled data; from gf.selective_logprobs (the loss pass's numerics) the
    first update's ratio is exactly 1."""
    import grpo_fast.integrations.trl as fast_trl

    trl_pass = []
    real_trl = GRPOTrainer._get_per_token_logps_and_entropies

    def trl_spy(*args, **kwargs):
        trl_pass.append(1)
        return real_trl(*args, **kwargs)

    seen = []
    real_loss = fast_trl.gf.grpo_loss

    def loss_spy(*args, **kwargs):
        loss, metrics = real_loss(*args, **kwargs)
        seen.append({k: float(v) for k, v in metrics.items()})
        return loss, metrics

    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", trl_spy)
    monkeypatch.setattr(fast_trl.gf, "grpo_loss", loss_spy)
    options = dict(
        bf16=True, num_iterations=2, beta=0.04, importance_sampling_level="sequence", loss_type="grpo",
        epsilon=3e-4, epsilon_high=4e-4, max_steps=1,
    )  # fmt: skip
    train(_BatchInvariant, model_dir, tmp_path, **options)
    assert trl_pass == []  # old and reference log-probs: grpo_fast's pass
    first = seen[0]  # first update, first micro-batch: the policy has not moved yet
    assert first["ratio_not_one"] == 0.0 and first["clip_ratio_region"] == 0.0


def test_trl_outside_the_verified_range_is_refused_then_allowed_with_one_warning(
    model_dir, tmp_path, monkeypatch
):
    import trl

    from grpo_fast.integrations import trl_version

    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.raises(RuntimeError, match=r"verified with TRL .*1\.16.*grpo_fast_allow_untested_trl=True"):
        loss_step_trainer(model_dir, tmp_path / "refused")
    monkeypatch.setattr(trl_version, "_untested_trl_warned", False)
    allow = {"grpo_fast_allow_untested_trl": True}
    with pytest.warns(UserWarning, match="outside its verified range") as record:
        trainer = loss_step_trainer(model_dir, tmp_path / "allowed", fast_options=allow)
        loss_step_trainer(model_dir, tmp_path / "again", fast_options=allow)
    assert sum("verified range" in str(w.message) for w in record) == 1
    inputs = _one_batch(trainer, seed=0)
    inputs["ref_per_token_logps"] = inputs["old_per_token_logps"] - 0.02
    assert_same_loss_step(*both_loss_steps(trainer, inputs))


def test_trl_without_the_overridden_methods_is_refused_by_name(monkeypatch):
    from grpo_fast.integrations import trl_version

    trl_version.check_trl_version(allow_untested=False, version="1.16.0")
    monkeypatch.delattr(GRPOTrainer, "_get_per_token_logps_and_entropies")
    with pytest.raises(RuntimeError, match="GRPOTrainer._get_per_token_logps_and_entropies"):
        trl_version.check_trl_version(allow_untested=True, version="1.18.0")
    with pytest.raises(TypeError, match="grpo_fast_allow_untested_trl must be a bool"):
        FastGRPOTrainer(model=None, grpo_fast_allow_untested_trl="yes")
