"""Bad input gets a ValueError/TypeError naming the argument, before any work; one test per case."""

from __future__ import annotations

import pytest
import torch

import grpo_fast as gf

B, T, H, V = 2, 5, 8, 11


@pytest.fixture
def ok():
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden=torch.randn(B, T, H, generator=g),
        weight=torch.randn(V, H, generator=g),
        targets=torch.randint(0, V, (B, T), generator=g),
        mask=torch.ones(B, T, dtype=torch.long),
        advantages=torch.randn(B, generator=g),
    )


def loss(args, **kw):
    return gf.grpo_loss(**{**args, **kw})


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(hidden=torch.randn(H)), ValueError, r"hidden must be \[B, T, H\]"),
        (dict(hidden=torch.randn(B, T, H + 1)), ValueError, r"hidden's last dim must equal weight's H"),
        (dict(weight=torch.randn(V, H, 1)), ValueError, r"weight must be the LM head \[V, H\]"),
        (
            dict(weight=torch.randn(V, H, dtype=torch.float64)),
            TypeError,
            r"hidden \(torch.float32\) and weight",
        ),
        (dict(hidden=torch.randint(0, 3, (B, T, H))), TypeError, r"hidden must be a floating tensor"),
        (dict(targets=torch.randint(0, V, (B, T + 1))), ValueError, r"targets must have shape \[2, 5\]"),
        (
            dict(targets=torch.full((B, T), V)),
            ValueError,
            r"targets at unmasked positions must lie in \[0, V=11\)",
        ),
        (dict(targets=torch.full((B, T), -1)), ValueError, r"must lie in \[0, V=11\)"),
        (dict(targets=torch.zeros(B, T)), TypeError, r"targets must be an integer tensor"),
        (dict(mask=torch.ones(B, T + 1)), ValueError, r"mask must have shape \[2, 5\]"),
        (dict(mask=-torch.ones(B, T)), ValueError, r"mask must hold finite non-negative"),
        (
            dict(advantages=torch.randn(B + 1)),
            ValueError,
            r"advantages must have one value per sequence, B=2",
        ),
        (
            dict(advantages=torch.randn(B, T + 1)),
            ValueError,
            r"advantages must be \[B\] \(one per sequence\) or \[B, T\] = \[2, 5\]",
        ),
        (dict(advantages=torch.full((B, T), float("inf"))), ValueError, r"advantages must be finite"),
        (dict(sampling_logp=torch.randn(B)), ValueError, r"sampling_logp must have targets' shape"),
        (dict(sampling_logp=torch.ones(B, T)), ValueError, r"sampling_logp must hold log-probs"),
        (
            dict(importance_sampling_ratio=torch.ones(B, T + 1)),
            ValueError,
            r"importance_sampling_ratio must be per token, \[2, 5\], or per sequence, \[2, 1\] or \[2\]",
        ),
        (
            dict(importance_sampling_ratio=-torch.ones(B, T)),
            ValueError,
            r"importance_sampling_ratio must be finite and >= 0",
        ),
        (
            dict(importance_sampling_ratio=torch.ones(B, T, dtype=torch.long)),
            TypeError,
            r"importance_sampling_ratio must be a floating tensor",
        ),
        (
            dict(importance_sampling_ratio=torch.ones(B, 1), config=gf.GRPOConfig(loss_type="vespo")),
            ValueError,
            r"'vespo' takes a per-token importance_sampling_ratio",
        ),
        (dict(entropy_gather=3), TypeError, r"entropy_gather must be callable"),
        (dict(advantages=torch.tensor([0.0, float("nan")])), ValueError, r"advantages must be finite"),
        (dict(old_logp=torch.randn(B, T + 1)), ValueError, r"old_logp must have targets' shape"),
        (dict(ref_logp=torch.randn(B)), ValueError, r"ref_logp must have targets' shape"),
        (dict(bias=torch.randn(V + 1)), ValueError, r"bias must be \[V\]=\[11\]"),
        (dict(num_items_in_batch=-1), ValueError, r"num_items_in_batch must be a non-negative"),
        (dict(num_items_in_batch="12"), TypeError, r"num_items_in_batch must be an int"),
        (dict(config={"loss_type": "dapo"}), TypeError, r"config must be a grpo_fast.GRPOConfig"),
        (dict(config=gf.GRPOConfig(beta=0.1)), ValueError, r"beta=0.1 needs ref_logp"),
        (dict(seq_ids=torch.zeros(B * T, dtype=torch.long)), ValueError, r"seq_ids is only for packed"),
        (dict(backend="cuda"), ValueError, r"backend must be one of"),
        (dict(backend="triton"), ValueError, r"backend='triton' cannot run grpo_loss"),
        (dict(chunk_size=0), ValueError, r"chunk_size must be a positive int"),
    ],
)
def test_grpo_loss_rejects(ok, change, exc, match, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # triton on CPU only under the interpreter
    with pytest.raises(exc, match=match):
        loss(ok, **change)


def test_masked_targets_may_hold_ignore_index(ok):
    ok["mask"][0, -2:] = 0
    ok["targets"][0, -2:] = -100
    value, _ = loss(ok)
    assert torch.isfinite(value)


def test_packed_needs_seq_ids_in_range(ok):
    packed = dict(
        ok,
        hidden=ok["hidden"].reshape(B * T, H),
        targets=ok["targets"].reshape(-1),
        mask=ok["mask"].reshape(-1),
    )
    with pytest.raises(ValueError, match=r"packed \[N, H\] hidden needs seq_ids"):
        loss(packed)
    with pytest.raises(ValueError, match=r"seq_ids must lie in \[0, B=2\)"):
        loss(packed, seq_ids=torch.full((B * T,), 2))
    with pytest.raises(ValueError, match=r"seq_ids must be an integer tensor of shape \[10\]"):
        loss(packed, seq_ids=torch.zeros(B * T))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss_type="ppo"), r"loss_type must be one of"),
        (dict(importance_sampling_level="batch"), r"importance_sampling_level must be one of"),
        (dict(loss_type="dr_grpo"), r"dr_grpo' needs max_completion_length"),
        (dict(temperature=0.0), r"temperature must be a positive"),
        (dict(temperature=-1.0), r"temperature must be a positive"),
        (dict(epsilon_low=-0.1), r"epsilon_low must be a non-negative"),
        (dict(delta=0.0), r"delta must be a positive"),
        (dict(beta=float("nan")), r"beta must be a non-negative"),
        (dict(max_completion_length=0), r"max_completion_length must be a positive int"),
        (dict(top_entropy_quantile=0.0), r"top_entropy_quantile must be in \(0, 1\]"),
        (dict(top_entropy_quantile=1.5), r"top_entropy_quantile must be in \(0, 1\]"),
        (dict(off_policy_mask_threshold=-1.0), r"off_policy_mask_threshold must be a non-negative"),
        (dict(entropy_coef=float("inf")), r"entropy_coef must be a finite number"),
        (dict(logit_softcap=0.0), r"logit_softcap must be a positive"),
    ],
)
def test_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gf.GRPOConfig(**kwargs)


def test_config_is_frozen():
    cfg = gf.GRPOConfig()
    with pytest.raises(AttributeError):
        cfg.beta = 1.0  # type: ignore[misc]
    assert cfg.epsilon_high == cfg.epsilon_low == 0.2


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(temperature=0), ValueError, r"temperature must be positive"),
        (dict(temperature="1"), TypeError, r"temperature must be a float"),
        (dict(targets=torch.full((B, T), V)), ValueError, r"targets must lie in \[0, V=11\)"),
        (dict(targets=torch.zeros(B, T)), TypeError, r"targets must be an integer tensor"),
        (dict(weight=torch.randn(V, H + 2)), ValueError, r"hidden's last dim must equal weight's H=10"),
        (dict(bias=torch.randn(V).double()), TypeError, r"bias \(torch.float64\) must have weight's dtype"),
        (dict(hidden=[1.0]), TypeError, r"hidden must be a torch.Tensor"),
        (dict(logit_softcap=-1.0), ValueError, r"logit_softcap must be positive and finite"),
        (dict(logit_softcap=True), TypeError, r"logit_softcap must be a float or None"),
        (dict(logit_softcap=30.0, fused_gemm=True), ValueError, r"fused_gemm=True does not soft-cap"),
    ],
)
def test_selective_logprobs_rejects(ok, change, exc, match):
    args = {"hidden": ok["hidden"], "weight": ok["weight"], "targets": ok["targets"], **change}
    with pytest.raises(exc, match=match):
        gf.selective_logprobs(**args)


@pytest.mark.parametrize(
    "args, exc, match",
    [
        (
            dict(rewards=torch.randn(6), group_size=4),
            ValueError,
            r"group_size=4 must divide the number of completions, 6",
        ),
        (dict(rewards=torch.randn(6), group_size=0), ValueError, r"group_size must be a positive int"),
        (
            dict(rewards=torch.randn(6, 2, 1), group_size=2),
            ValueError,
            r"rewards must be \[B\*G\] or \[B\*G, R\]",
        ),
        (dict(rewards=torch.arange(6), group_size=2), TypeError, r"rewards must be a floating tensor"),
        (
            dict(rewards=torch.randn(6), group_size=2, scale="global"),
            ValueError,
            r"scale must be 'group', 'batch'",
        ),
        (
            dict(rewards=torch.randn(6, 2), group_size=2, reward_weights=[1.0]),
            ValueError,
            r"reward_weights must have one weight per reward function, \[2\]",
        ),
        (dict(rewards=torch.randn(6), group_size=2, eps=-1.0), ValueError, r"eps must be a non-negative"),
    ],
)
def test_group_advantages_rejects(args, exc, match):
    with pytest.raises(exc, match=match):
        gf.group_advantages(**args)


def test_loss_input_value_checks_take_one_transfer(monkeypatch):
    """Every value check of grpo_loss's inputs (targets, mask, seq_ids, advantages, num_items) runs in one
    device-to-host transfer: on CUDA, one synchronization instead of one per check."""
    from grpo_fast.engine import validation

    calls = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **kw):
            calls.append(_name)
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    N, H, V = 11, 8, 13
    hidden, weight = torch.randn(N, H), torch.randn(V, H)
    targets, mask = torch.randint(0, V, (N,)), torch.ones(N)
    seq_ids, adv = torch.tensor([0] * 5 + [1] * 6), torch.randn(2)
    args = (hidden, weight, targets, mask, adv, None, None, None, gf.GRPOConfig())
    validation.validate_loss_inputs(*args, torch.tensor(9.0), seq_ids)
    assert calls == ["tolist"]
    calls.clear()
    bad = args[:4] + (torch.tensor([1.0, float("nan")]),) + args[5:]
    with pytest.raises(ValueError, match="advantages must be finite"):
        validation.validate_loss_inputs(*bad, torch.tensor(9.0), seq_ids)
    with pytest.raises(ValueError, match="num_items_in_batch must be a non-negative count"):
        validation.validate_loss_inputs(*args, torch.tensor(-1.0), seq_ids)
    out_of_range = r"targets at unmasked positions must lie in \[0, V=13\), got values in \[0, 99\]"
    with pytest.raises(ValueError, match=out_of_range):
        validation.validate_loss_inputs(*args[:2], torch.where(targets > 5, 99, 0), *args[3:], None, seq_ids)


def _spoiled(x: torch.Tensor, index: tuple, value: float) -> torch.Tensor:
    x = x.clone()
    x[index] = value
    return x


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize(
    "name, index, value, match",
    [
        ("hidden", (1, 2, 3), float("nan"), r"hidden must be finite \(NaN or inf found at a position"),
        ("hidden", (0, 4, 0), float("-inf"), r"hidden must be finite"),
        ("weight", (V - 1, H - 1), float("inf"), r"weight \(the LM head\) must be finite"),
        ("weight", (0, 0), float("nan"), r"weight \(the LM head\) must be finite"),
    ],
)
def test_non_finite_head_inputs_are_named_from_the_result(ok, backend, name, index, value, match):
    """NaN/inf in hidden or W show in the pass's per-row results; then the inputs are searched and the bad
    one named, with the message an up-front check would give. Masked rows do not count."""
    from grpo_fast import backends

    if backends.why_not(backend, torch.device("cpu"), "grpo_loss") is not None:
        pytest.skip(f"{backend} cannot run here")
    bad = dict(ok, **{name: _spoiled(ok[name], index, value)})
    with pytest.raises(ValueError, match=match):
        loss(bad, backend=backend)
    with pytest.raises(ValueError, match=match):
        gf.selective_logprobs(bad["hidden"], bad["weight"], bad["targets"], backend=backend)
    if name == "hidden":  # the same NaN at a masked position: no error, a finite loss
        mask = ok["mask"].clone()
        mask[index[:2]] = 0
        value_, _ = loss(bad, mask=mask, backend=backend)
        assert torch.isfinite(value_)


def test_soft_capped_inputs_are_checked_up_front(ok):
    """A soft cap maps an inf logit to a finite one, so the result cannot tell: checked before the pass."""
    bad = dict(ok, weight=_spoiled(ok["weight"], (0, 0), float("inf")))
    cfg = gf.GRPOConfig(logit_softcap=30.0)
    with pytest.raises(ValueError, match=r"weight \(the LM head\) must be finite"):
        loss(bad, config=cfg)
    with pytest.raises(ValueError, match=r"weight \(the LM head\) must be finite"):
        gf.selective_logprobs(bad["hidden"], bad["weight"], bad["targets"], logit_softcap=30.0)


def test_finite_inputs_are_not_read_for_the_checks(ok, monkeypatch):
    """On finite inputs no check reads W or hidden: torch.isfinite sees only [N]-sized tensors (targets,
    mask, advantages, the rows' results) and the [V] bias."""
    seen = []
    original = torch.isfinite

    def spy(x):
        seen.append(tuple(x.shape))
        return original(x)

    monkeypatch.setattr(torch, "isfinite", spy)
    value, _ = loss(ok, bias=torch.zeros(V))
    assert torch.isfinite(value)
    gf.selective_logprobs(ok["hidden"], ok["weight"], ok["targets"])
    assert seen and all(len(s) <= 2 and (V, H) != s and s[-1:] != (H,) for s in seen), seen
