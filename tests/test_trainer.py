"""The thin trainer: config, data, rewards, masks, the loss on a real HF model, bad input, the demo."""

from __future__ import annotations

import ast
import dataclasses
import graphlib
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import grpo_fast as gf
from grpo_fast import cli
from grpo_fast.integrations.hf import completion_hidden, lm_head
from grpo_fast.trainer import RewardError, TrainConfig, Trainer, demo
from grpo_fast.trainer.checkpoint import latest_checkpoint
from grpo_fast.trainer.cli import config_from_args
from grpo_fast.trainer.config import CHOICES, allowed_types, field_types, option_name
from grpo_fast.trainer.data import PromptSampler, load_prompts
from grpo_fast.trainer.generation import completion_mask
from grpo_fast.trainer.models import load_model_and_tokenizer
from grpo_fast.trainer.reporting import read_metrics
from grpo_fast.trainer.rewards import load_reward, score
from grpo_fast.trainer.update import cosine_schedule

REQUIRED_METRICS = {
    "step",
    "reward_mean",
    "reward_std",
    "loss",
    "kl",
    "entropy",
    "clip_ratio",
    "completion_len",
    "tokens_per_s",
    "peak_mem_mb",
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster, and far faster on a busy 2-core machine; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(tmp_path, **overrides) -> TrainConfig:
    """The demo, shrunk to a few fast steps."""
    values = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        prompts_per_step=2,
        num_generations=4,
        progress=False,
        print_completions_every=0,
        save_every=0,
    )
    return TrainConfig.from_dict({**values, **overrides})


# ----- config ---------------------------------------------------------------------------------------
def test_config_unknown_key_is_named_with_a_suggestion(tmp_path):
    with pytest.raises(ValueError, match="unknown option 'learning_rat'.*did you mean 'learning_rate'"):
        TrainConfig.from_dict({"learning_rat": 1e-3})
    path = tmp_path / "c.yaml"
    path.write_text("model: demo\nbogus_option: 3\n")
    with pytest.raises(ValueError, match=r"c\.yaml: unknown option 'bogus_option'"):
        TrainConfig.from_yaml(path)


def test_config_types_and_values_are_checked(tmp_path):
    with pytest.raises(TypeError, match="'max_steps' must be int"):
        TrainConfig.from_dict({"max_steps": "ten"})
    with pytest.raises(TypeError, match="'progress' must be bool"):
        TrainConfig.from_dict({"progress": 1})
    with pytest.raises(ValueError, match="loss_type must be one of"):
        TrainConfig.from_dict({"loss_type": "ppo"})
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        TrainConfig.from_dict({"num_generations": 1})
    with pytest.raises(ValueError, match="reward_weights has 1 values for 2 rewards"):
        TrainConfig.from_dict({"rewards": ["a:b", "c:d"], "reward_weights": [1.0]})
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1e-5\n")  # YAML 1.1 reads this as a string; accepted as a float
    assert TrainConfig.from_yaml(path).learning_rate == 1e-5
    path.write_text("- not\n- a mapping\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        TrainConfig.from_yaml(path)


def test_config_demo_preset_applies_only_to_the_demo_and_yields_to_explicit_values():
    demo_cfg = TrainConfig.from_dict({})
    assert demo_cfg.model == "demo" and demo_cfg.dataset == "demo" and demo_cfg.output_dir == "runs/demo"
    assert TrainConfig.from_dict({"learning_rate": 0.5}).learning_rate == 0.5
    real = TrainConfig.from_dict({"model": "some/model", "dataset": "x.jsonl", "rewards": ["m:f"]})
    assert real.learning_rate == 1e-6 and real.output_dir == "runs/grpo"


def test_config_exposes_every_loss_option():
    cfg = TrainConfig.from_dict(
        {
            "loss_type": "dr_grpo",
            "epsilon": 0.1,
            "epsilon_high": 0.3,
            "delta": 2.0,
            "beta": 0.1,
            "importance_sampling_level": "sequence",
            "use_bias_correction_kl": False,
            "sapo_temperature_pos": 0.5,
            "sapo_temperature_neg": 0.6,
            "temperature": 0.7,
            "max_completion_length": 5,
        }
    )
    assert cfg.loss_config() == gf.GRPOConfig(
        loss_type="dr_grpo",
        epsilon_low=0.1,
        epsilon_high=0.3,
        delta=2.0,
        beta=0.1,
        importance_sampling_level="sequence",
        temperature=0.7,
        max_completion_length=5,
        use_bias_correction_kl=False,
        sapo_temperature_pos=0.5,
        sapo_temperature_neg=0.6,
    )


def _non_default(option: str) -> object:
    """A valid value of a loss option other than its default, from its type and choices."""
    default = getattr(TrainConfig(), option)
    scalars, _ = allowed_types(field_types()[option])
    if option in CHOICES:
        return next(c for c in reversed(CHOICES[option]) if c != default)
    if bool in scalars:
        return not default
    if float in scalars:  # a fraction in (0, 1] (top_entropy_quantile) goes down, not up
        return default / 2 if default == 1.0 else (default or 0.0) + 0.5
    if int in scalars:
        return (default or 0) + 1
    return default


def test_every_grpo_config_field_is_an_option_that_reaches_the_loss(tmp_path):
    """A field added to GRPOConfig is a YAML key and a --flag, and loss_config() passes it on unchanged."""
    want = {f.name: _non_default(option_name(f.name)) for f in dataclasses.fields(gf.GRPOConfig) if f.init}
    options = {option_name(name): value for name, value in want.items()}
    expected = gf.GRPOConfig(**want)
    assert TrainConfig.from_dict(options).loss_config() == expected
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(options))
    assert TrainConfig.from_yaml(path).loss_config() == expected
    argv = ["train"]
    for option, value in options.items():
        flag = "--" + option.replace("_", "-")
        argv += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
    assert config_from_args(cli.build_parser().parse_args(argv)).loss_config() == expected
    nullable = [o for o in options if type(None) in allowed_types(field_types()[o])[0]]
    argv = ["train", *(arg for o in nullable for arg in ("--" + o.replace("_", "-"), "none"))]
    cfg = config_from_args(cli.build_parser().parse_args(argv))
    # "none" reaches GRPOConfig as None (which it may resolve: epsilon_high=None is epsilon_low).
    resolved = {n: getattr(gf.GRPOConfig(**{n: None}), n) for n in want if option_name(n) in nullable}
    assert nullable and all(getattr(cfg.loss_config(), n) == v for n, v in resolved.items())


def test_trainer_modules_import_no_cycle():
    """No module of the trainer imports (at the top or inside a function) one that imports it back."""
    graph = {}
    for path in Path(demo.__file__).parent.glob("*.py"):
        graph[path.stem] = {
            name
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) and node.level == 1
            for name in ([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        }
    list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError naming the cycle


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    f = cosine_schedule(warmup=4, total=20, min_ratio=0.1)
    assert f(0) == pytest.approx(0.2) and f(3) == pytest.approx(0.8) and f(4) == pytest.approx(1.0)
    assert f(12) == pytest.approx(0.55) and f(20) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)


# ----- data -----------------------------------------------------------------------------------------
def test_jsonl_errors_name_the_line_counted_from_one(tmp_path):
    """A JSONL file's errors name the line an editor shows (blank lines counted); other sources a row."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"\n')
    with pytest.raises(ValueError, match=r"d\.jsonl, line 2 is not valid JSON"):
        load_prompts(str(path))
    path.write_text('{"prompt": "a"}\n\n{"question": "b"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl, line 3 has no 'prompt' field \(it has: question\)"):
        load_prompts(str(path))
    path.write_text('{"prompt": ""}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl, line 1: the prompt is empty"):
        load_prompts(str(path))
    listed = tmp_path / "d.json"
    listed.write_text('[{"prompt": "a"}, {"question": "b"}]')
    with pytest.raises(ValueError, match=r"d\.json, row 2 has no 'prompt' field"):
        load_prompts(str(listed))
    with pytest.raises(ValueError, match=r"the prompt list, row 1: the prompt is empty"):
        load_prompts([" "])
    path.write_text('{"prompt": 5}\n')
    with pytest.raises(ValueError, match="must be a non-empty string or a list of chat messages"):
        load_prompts(str(path))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_prompts(str(tmp_path / "missing.jsonl"))


def test_json_list_files_and_rows_with_different_fields(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"prompt": "a", "x": 1}, {"prompt": "b", "y": 2}]')
    data = load_prompts(str(path))
    assert data.columns([data[0], data[1]]) == {"x": [1, None], "y": [None, 2]}
    path.write_text('{"prompt": "a"}')
    with pytest.raises(ValueError, match="must hold a list of rows"):
        load_prompts(str(path))


def test_prompt_sources_lists_and_datasets():
    from datasets import Dataset

    data = load_prompts(["hi", {"prompt": "yo", "answer": 1}])
    assert data[0] == {"prompt": "hi"} and data.columns([data[1]]) == {"answer": [1]}
    ds = load_prompts(Dataset.from_list([{"q": "x", "a": 1}]), prompt_column="q")
    assert ds.prompts() == ["x"] and ds[0]["a"] == 1
    with pytest.raises(ValueError, match="has no 'prompt' column"):
        load_prompts(Dataset.from_list([{"q": "x"}]))
    with pytest.raises(ValueError, match="has no rows"):
        load_prompts([])


def test_sampler_covers_each_epoch_and_resumes_exactly():
    s = PromptSampler(10, 4, seed=3)
    first = [s.next_batch() for _ in range(5)]
    assert sorted(sum(first, [])[:10]) == list(range(10)) and sorted(sum(first, [])[10:20]) == list(range(10))
    t = PromptSampler(10, 4, seed=3)
    for _ in range(2):
        t.next_batch()
    u = PromptSampler(10, 4, seed=3)
    u.load_state_dict(json.loads(json.dumps(t.state_dict())))
    assert [u.next_batch() for _ in range(3)] == first[2:]


# ----- rewards --------------------------------------------------------------------------------------
def _ok(prompts, completions, **kw):
    return [1.0, None, float("nan"), 0.5]


def test_rewards_none_and_nan_mean_not_applicable_and_columns_arrive():
    seen = {}

    def spy(prompts, completions, answer, completion_ids, **kw):
        seen.update(answer=answer, ids=completion_ids)
        return [0.0] * 4

    out = score(
        [_ok, spy], ["p"] * 4, ["a", "b", "c", "d"], {"answer": [1, 1, 2, 2]}, completion_ids=[[1]] * 4
    )
    assert out.shape == (4, 2) and out[0, 0] == 1 and math.isnan(out[1, 0]) and math.isnan(out[2, 0])
    assert seen["answer"] == [1, 1, 2, 2] and seen["ids"] == [[1]] * 4


@pytest.mark.parametrize(
    "fn, message",
    [
        (lambda prompts, completions, **kw: 1 / 0, "'<lambda>': raised ZeroDivisionError"),
        (lambda prompts, completions, **kw: [1.0] * 3, "returned 3 rewards for 4 completions"),
        (lambda prompts, completions, **kw: [1.0, "x", 0, 0], r"reward 1 is 'x' \(str\), not a number"),
        (lambda prompts, completions, **kw: [math.inf] * 4, "reward 0 is inf; rewards must be finite"),
        (lambda prompts, completions, **kw: 0.5, "returned float; expected a list of 4 floats"),
    ],
)
def test_bad_reward_functions_are_named(fn, message):
    with pytest.raises(RewardError, match=message):
        score([fn], ["p"] * 4, ["c"] * 4, {})


def test_load_reward_errors():
    assert load_reward("grpo_fast.trainer.demo:reward") is demo.reward
    with pytest.raises(ValueError, match="'module:function'"):
        load_reward("grpo_fast.trainer.demo.reward")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        load_reward("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        load_reward("grpo_fast.trainer.demo:nope")


def test_demo_reward_partial_credit():
    assert demo.reward(["say 3"] * 4, ["3", "3 3", "4", ""], answer=["3"] * 4) == [1.0, 0.7, 0.3, 0.0]


# ----- generation -----------------------------------------------------------------------------------
def test_completion_mask_stops_after_the_first_eos():
    ids = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8], [1, 0, 0, 0]])
    mask, truncated = completion_mask(ids, [1])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


# ----- the loss on a real HF model ------------------------------------------------------------------
@pytest.mark.parametrize("freeze_head", [False, True])
def test_policy_loss_gradients_equal_full_logits_autograd_with_tied_embeddings(tmp_path, freeze_head):
    """grpo_loss on the backbone's hidden states gives the gradients of TRL's logits path (tied head too)."""
    trainer = Trainer(tiny(tmp_path, freeze_lm_head=freeze_head, beta=0.04, loss_type="grpo"))
    model = trainer.model
    assert model.config.tie_word_embeddings and lm_head(model)[0] is model.model.embed_tokens.weight
    rows, out = trainer.rollout(trainer.sampler.next_batch())
    n = out.completion_ids.shape[0]
    adv = torch.linspace(-1, 1, n)
    ref = (
        trainer.logprobs(trainer.ref_model, out, [torch.arange(n)]) - 0.1
    )  # a reference the policy differs from
    loss, _ = trainer.policy_loss(out, out.completion_mask, adv, None, ref, out.completion_mask.sum().float())
    loss.backward()
    fast = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    # TRL's path: full logits from the model's own forward, log_softmax, the GRPO loss of TRL's formulas.
    k = out.completion_ids.shape[1]
    logits = model(input_ids=out.input_ids, attention_mask=out.attention_mask).logits[:, -k - 1 : -1]
    logp = logits.float().log_softmax(-1).gather(-1, out.completion_ids.unsqueeze(-1)).squeeze(-1)
    mask = out.completion_mask.float()
    coef = torch.exp(logp - logp.detach())
    kl = (torch.exp(ref - logp) - (ref - logp) - 1) * coef
    per_token = -coef * adv.unsqueeze(1) + 0.04 * kl
    ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean().backward()
    slow = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert fast.keys() == slow.keys()
    assert ("model.embed_tokens.weight" in fast) != freeze_head  # the tied head trains unless frozen
    for name in slow:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("attrs", [dict(final_logit_softcapping=2.0), dict(logits_scaling=2.0)])
def test_soft_capped_or_scaled_head_trains_with_the_models_logits(tmp_path, attrs):
    """A Gemma 2 style soft-capped (or Granite style scaled) head: the loss and the old/ref log-probs see
    cap * tanh(logits * s / cap) / T, as the model computes its logits, not the raw head's."""
    tokenizer = demo.build_tokenizer()
    model = demo.build_model(tokenizer)
    for name, value in attrs.items():
        setattr(model.config, name, value)
    trainer = Trainer(tiny(tmp_path, max_steps=1, beta=0.04), model=model, tokenizer=tokenizer)
    assert trainer.loss_config.logit_softcap == attrs.get("final_logit_softcapping")
    _, out = trainer.rollout(trainer.sampler.next_batch())
    n, k = out.completion_ids.shape
    got = trainer.logprobs(model, out, [torch.arange(n)])
    with torch.no_grad():
        logits = (
            model(input_ids=out.input_ids, attention_mask=out.attention_mask).logits[:, -k - 1 : -1].float()
        )
    logits = logits / attrs.get("logits_scaling", 1.0)
    cap = attrs.get("final_logit_softcapping")
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    want = (logits / trainer.cfg.temperature).log_softmax(-1)
    want = want.gather(-1, out.completion_ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    result = trainer.train()
    assert all(math.isfinite(r["loss"]) for r in read_metrics(result.metrics_path))


def test_offloaded_activations_give_the_same_gradients(tmp_path, monkeypatch):
    """--offload-activations: the backbone's saved tensors go through save_on_cpu, gradients unchanged."""
    trainer = Trainer(tiny(tmp_path, beta=0.0, loss_type="grpo"))
    _, out = trainer.rollout(trainer.sampler.next_batch())
    n = out.completion_ids.shape[0]
    adv = torch.linspace(-1, 1, n)

    def grads() -> dict:
        trainer.model.zero_grad()
        loss, _ = trainer.policy_loss(
            out, out.completion_mask, adv, None, None, out.completion_mask.sum().float()
        )
        loss.backward()
        return {k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.grad is not None}

    want = grads()
    packed = []
    real = torch.autograd.graph.save_on_cpu

    class Spy(real):
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(pin_memory, device_type)
            pack = self.pack_hook
            self.pack_hook = lambda t: (packed.append(1), pack(t))[1]

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Spy)
    trainer.cfg = dataclasses.replace(trainer.cfg, offload_activations=True)
    got = grads()
    assert packed  # the backbone's activations went through the offload hooks
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


def test_completion_hidden_is_what_the_lm_head_reads():
    tokenizer = demo.build_tokenizer()
    model = demo.build_model(tokenizer)
    ids = torch.randint(3, len(tokenizer), (2, 7))
    mask = torch.ones_like(ids)
    hidden = completion_hidden(model, ids, mask, 3)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -4:-1]
    torch.testing.assert_close(hidden @ lm_head(model)[0].T, logits, rtol=1e-5, atol=1e-5)


# ----- short runs -----------------------------------------------------------------------------------
def test_short_run_writes_metrics_plot_and_checkpoint(tmp_path):
    result = Trainer(tiny(tmp_path)).train()
    rows = read_metrics(result.metrics_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert REQUIRED_METRICS <= rows[0].keys()
    assert all(math.isfinite(r[k]) for r in rows for k in REQUIRED_METRICS)
    assert result.plot_path.is_file() and result.plot_path.stat().st_size > 1000
    assert (
        result.checkpoint == latest_checkpoint(tmp_path / "run")
        and result.checkpoint.name == "checkpoint-000003"
    )
    # A checkpoint is a loadable HF model directory too.
    model, tokenizer = load_model_and_tokenizer(str(result.checkpoint))
    assert model.config.hidden_size == 64
    _assert_same_tokenization(tokenizer)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_iterations=2, gradient_accumulation_steps=3, loss_type="grpo", beta=0.0),
        dict(
            loss_type="bnpo", importance_sampling_level="sequence", mask_truncated_completions=True, top_p=0.9
        ),
        dict(loss_type="cispo", gradient_checkpointing=True, freeze_lm_head=True, reward_weights=[2.0]),
        dict(bf16=True, loss_type="sapo", top_k=5),
        dict(offload_activations=True, gradient_checkpointing=True),
        dict(
            padding_free=True,
            max_tokens_per_microbatch=10,
            gradient_accumulation_steps=2,
            beta=0.04,
            gradient_checkpointing=True,
        ),
        # TRL's other loss options, with their metrics (the thin trainer has no vLLM: sampling = old)
        dict(
            top_entropy_quantile=0.5,
            off_policy_mask_threshold=0.01,
            entropy_coef=0.01,
            num_iterations=2,
            gradient_accumulation_steps=2,
        ),
    ],
)
def test_options_run(tmp_path, overrides):
    result = Trainer(tiny(tmp_path, max_steps=2, **overrides)).train()
    rows = read_metrics(result.metrics_path)
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    if "entropy_coef" in overrides:
        assert {"policy_loss", "entropy_mask/tokens", "clip_ratio_low_min"} <= rows[0].keys()


def test_multiple_iterations_see_clipping(tmp_path):
    trainer = Trainer(tiny(tmp_path, max_steps=4, num_iterations=3, learning_rate=0.05, epsilon=0.01))
    trainer.train()
    rows = read_metrics(trainer.metrics.path)
    assert any(r["clip_ratio"] > 0 for r in rows)


# ----- bad input ------------------------------------------------------------------------------------
def _fails(prompts, completions, **kw):
    raise RuntimeError("grader offline")


def test_failing_reward_skips_steps_then_stops_with_a_checkpoint(tmp_path):
    cfg = tiny(tmp_path, max_reward_failures=2)
    with pytest.raises(RewardError, match="'_fails': failed 2 steps in a row.*grader offline"):
        Trainer(cfg, reward_funcs=[_fails]).train()
    assert latest_checkpoint(tmp_path / "run") is not None
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == []


def test_flaky_reward_loses_no_step(tmp_path):
    calls = []

    def flaky(prompts, completions, answer, **kw):
        calls.append(1)
        if len(calls) == 2:
            return [1.0]  # wrong length once
        return demo.reward(prompts, completions, answer)

    result = Trainer(tiny(tmp_path), reward_funcs=[flaky]).train()
    assert result.steps == 3 and [r["step"] for r in read_metrics(result.metrics_path)] == [1, 2, 3]
    assert len(calls) == 4


def test_all_nan_reward_warns_once_and_trains(tmp_path):
    def never(prompts, completions, **kw):
        return [None] * len(completions)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(tiny(tmp_path), reward_funcs=[demo.reward, never]).train()
    assert sum("'never' returned None/NaN for every completion" in str(w.message) for w in caught) == 1


def test_prompt_longer_than_the_context_is_named(tmp_path):
    long_prompt = " ".join(["say"] * 30)
    with pytest.raises(ValueError, match=r"row 2: the prompt is 30 tokens.*context of 32 tokens"):
        Trainer(tiny(tmp_path), dataset=["say 1", long_prompt])


def test_model_directory_without_weights(tmp_path):
    d = tmp_path / "model"
    demo.save_pretrained(str(d))
    (d / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="has a config.json but no weights"):
        Trainer(tiny(tmp_path, model=str(d), dataset="demo", rewards=["grpo_fast.trainer.demo:reward"]))
    with pytest.raises(ValueError, match="no config.json"):
        load_model_and_tokenizer(str(tmp_path))


def test_missing_dataset_or_reward_for_a_real_model(tmp_path):
    d = tmp_path / "model"
    demo.save_pretrained(str(d))
    with pytest.raises(ValueError, match="no reward function: pass --reward module:function"):
        Trainer(tiny(tmp_path, model=str(d), dataset="demo"))
    with pytest.raises(ValueError, match="no dataset"):
        Trainer(tiny(tmp_path, model=str(d), rewards=["grpo_fast.trainer.demo:reward"]))


# ----- the demo -------------------------------------------------------------------------------------
DEMO_TEXTS = ["say 6", "copy 3", "echo 0 <eos>", "write q 9", "repeat 1 2"]


def _assert_same_tokenization(reloaded, texts=DEMO_TEXTS) -> None:
    built = demo.build_tokenizer()
    for text in texts:
        assert reloaded.tokenize(text) == built.tokenize(text), text
        assert reloaded(text).input_ids == built(text).input_ids, text
    assert reloaded.pad_token_id == built.pad_token_id and reloaded.eos_token_id == built.eos_token_id
    assert reloaded.padding_side == "left"


def test_demo_folder_reloads_with_the_same_tokenization(tmp_path):
    from transformers import AutoTokenizer

    demo.save_pretrained(str(tmp_path))
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.tokenize("say 6") == ["say", "6"]
    _assert_same_tokenization(reloaded)
    _, loaded = load_model_and_tokenizer(str(tmp_path))
    _assert_same_tokenization(loaded)
    # saved again (as a checkpoint saves the tokenizer it trained with), it still reloads the same
    again = tmp_path / "again"
    reloaded.save_pretrained(again)
    demo.build_model(demo.build_tokenizer()).config.save_pretrained(again)
    _assert_same_tokenization(AutoTokenizer.from_pretrained(again))


@pytest.mark.slow
def test_demo_default_config_learns(tmp_path):
    """The acceptance bar of `make demo`: last-20-steps mean reward beats the first 20 by >= 0.3."""
    result = Trainer(
        TrainConfig.from_dict(
            {"output_dir": str(tmp_path / "demo"), "progress": False, "print_completions_every": 0}
        )
    ).train()
    rewards = [r["reward_mean"] for r in read_metrics(result.metrics_path)]
    assert len(rewards) == 300
    assert sum(rewards[-20:]) / 20 - sum(rewards[:20]) / 20 >= 0.3


def test_batch_invariant_run_has_first_update_ratios_of_exactly_one(tmp_path):
    """--batch-invariant: the rollout's old log-probs (scored per micro-batch, every position) and the
    first update's (masked tokens dropped) are bitwise equal: ratio_not_one is 0; it is logged either way."""
    opts = dict(max_steps=2, num_iterations=2)
    rows = read_metrics(Trainer(tiny(tmp_path / "a", batch_invariant=True, **opts)).train().metrics_path)
    assert [r["ratio_not_one"] for r in rows] == [0.0, 0.0]
    default = read_metrics(Trainer(tiny(tmp_path / "b", **opts)).train().metrics_path)
    assert all(0.0 <= r["ratio_not_one"] <= 1.0 for r in default)


def test_a_used_output_dir_is_never_replaced_implicitly(tmp_path, capsys):
    from grpo_fast import cli
    from grpo_fast.trainer.loop import RunExists

    first = Trainer(tiny(tmp_path, max_steps=2)).train()
    run = tmp_path / "run"
    before = sorted(p.name for p in run.iterdir())
    metrics = (run / "metrics.jsonl").read_text()
    with pytest.raises(RunExists, match=r"pass --resume to continue it, or --overwrite to replace it"):
        Trainer(tiny(tmp_path, max_steps=2)).train()
    argv = ["train", "--output-dir", str(run), "--max-steps", "2", "--prompts-per-step", "2", "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "holds a previous run (1 checkpoint(s), metrics.jsonl)" in err and "Traceback" not in err
    assert sorted(p.name for p in run.iterdir()) == before and (run / "metrics.jsonl").read_text() == metrics
    # --resume continues it; --overwrite replaces it
    assert Trainer(tiny(tmp_path, max_steps=3)).train(resume=True).steps == 3
    assert Trainer(tiny(tmp_path, max_steps=1)).train(overwrite=True).steps == 1
    assert len(read_metrics(first.metrics_path)) == 1


def test_reward_calling_sys_exit_saves_then_stops(tmp_path):
    import sys

    from grpo_fast.trainer.rewards import RewardError

    def quits(prompts, completions, **kw):
        sys.exit(3)

    with pytest.raises(RewardError, match=r"called sys.exit\(3\)") as info:
        Trainer(tiny(tmp_path), reward_funcs=[quits]).train()
    assert info.value.fatal and "saved" in str(info.value)
    assert latest_checkpoint(tmp_path / "run") is not None


def test_reward_beyond_fp32_is_a_reward_error_not_a_silent_inf():
    from grpo_fast.trainer.rewards import RewardError, score

    with pytest.raises(RewardError, match="rewards must be finite in fp32"):
        score([lambda prompts, completions, **kw: [1e39] * len(completions)], ["p"], ["c"], {})


def test_reward_module_with_a_syntax_error_is_one_line(tmp_path, monkeypatch):
    from grpo_fast.trainer.rewards import load_reward

    (tmp_path / "broken_reward_mod.py").write_text("def f(prompts, completions, **kw)\n    return []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"has a syntax error \(.*broken_reward_mod.py, line 1"):
        load_reward("broken_reward_mod:f")


def test_output_dir_naming_a_file_is_refused(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        tiny(tmp_path, output_dir=str(path))
