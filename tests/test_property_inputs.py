"""Property test: random malformed inputs to the public functions get a ValueError/TypeError that names
an argument, or a finite result; never a crash, a silent NaN or another exception type."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import grpo_fast as gf

B, T, H, V = 2, 5, 8, 11
LOSS_ARGS = ("hidden", "weight", "targets", "mask", "advantages", "old_logp", "ref_logp", "bias", "seq_ids")
NAMES = (*LOSS_ARGS, "config", "num_items_in_batch", "chunk_size", "backend", "temperature", "rewards")
NAMES += ("group_size", "scale", "eps", "reward_weights", "batch_invariant", "vocab_start", "fused_gemm")


def _valid() -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden=torch.randn(B, T, H, generator=g),
        weight=torch.randn(V, H, generator=g),
        targets=torch.randint(0, V, (B, T), generator=g),
        mask=torch.ones(B, T),
        advantages=torch.randn(B, generator=g),
        old_logp=-torch.rand(B, T, generator=g) - 1,
        ref_logp=-torch.rand(B, T, generator=g) - 1,
        bias=torch.zeros(V),
    )


def _spoil(name: str, x: torch.Tensor, how: str):
    if how == "none":
        return None
    if how == "string":
        return "not a tensor"
    if how == "list":
        return x.tolist() if x.dim() else [1.0]
    if how == "wrong_shape":
        return x.reshape(-1)[:-1] if x.numel() > 1 else torch.zeros(3)
    if how == "extra_dim":
        return x.unsqueeze(0)
    if how == "int":
        return x.long()
    if how == "bool":
        return x.bool()
    if how == "half":
        return x.half()
    if how == "double":
        return x.double()
    if how == "nan":
        y = x.clone().float() if x.is_floating_point() else x.clone()
        if y.is_floating_point() and y.numel():
            y.view(-1)[0] = math.nan
        return y
    if how == "inf":
        y = x.clone().float() if x.is_floating_point() else x.clone()
        if y.is_floating_point() and y.numel():
            y.view(-1)[-1] = math.inf
        return y
    if how == "negative":
        return -x.abs() - 1 if x.is_floating_point() else x - 100
    if how == "huge":
        return x * 1e30 if x.is_floating_point() else x + 10**6
    if how == "empty":
        return x[:0]
    raise AssertionError(how)


HOWS = ["none", "string", "list", "wrong_shape", "extra_dim", "int", "bool", "half", "double"]
HOWS += ["nan", "inf", "negative", "huge", "empty"]


def _names_an_argument(err: Exception) -> bool:
    text = str(err)
    return any(name in text for name in NAMES) or "hidden" in text


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(
    spoiled=st.dictionaries(st.sampled_from(LOSS_ARGS[:8]), st.sampled_from(HOWS), min_size=1, max_size=2),
    backend=st.sampled_from(["torch", "native"]),
    loss_type=st.sampled_from(["dapo", "grpo", "cispo", "sapo", "vespo"]),
)
def test_grpo_loss_on_malformed_inputs(spoiled, backend, loss_type):
    args = _valid()
    for name, how in spoiled.items():
        args[name] = _spoil(name, args[name], how)
    cfg = gf.GRPOConfig(loss_type=loss_type, beta=0.04 if args["ref_logp"] is not None else 0.0)
    try:
        loss, metrics = gf.grpo_loss(**args, config=cfg, backend=backend)
    except (ValueError, TypeError) as err:
        assert _names_an_argument(err), f"{type(err).__name__} names no argument: {err}"
        return
    # accepted: then the answer is finite (huge hidden/weight may legitimately overflow nothing here:
    # the logits are fp32 and the loss terms bounded)
    assert torch.isfinite(loss) or "huge" in spoiled.values(), (spoiled, loss)
    assert all(torch.isfinite(v) or "huge" in spoiled.values() for v in metrics.values())


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    how=st.sampled_from(HOWS),
    which=st.sampled_from(["hidden", "weight", "targets", "bias"]),
    temperature=st.sampled_from([1.0, 0.5, 0.0, -1.0, math.nan, math.inf]),
)
def test_selective_logprobs_on_malformed_inputs(how, which, temperature):
    args = {k: v for k, v in _valid().items() if k in ("hidden", "weight", "targets", "bias")}
    args[which] = _spoil(which, args[which], how)
    try:
        logp = gf.selective_logprobs(**args, temperature=temperature, backend="torch")
    except (ValueError, TypeError) as err:
        assert _names_an_argument(err), f"{type(err).__name__} names no argument: {err}"
        return
    assert torch.isfinite(logp).all() or how in ("nan", "inf", "huge"), (how, which)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    how=st.sampled_from(HOWS),
    group_size=st.sampled_from([1, 2, 3, 0, -1]),
    scale=st.sampled_from(["group", "batch", "none", "bogus"]),
)
def test_group_advantages_on_malformed_inputs(how, group_size, scale):
    rewards = _spoil("rewards", torch.rand(6, 2), how)
    try:
        adv = gf.group_advantages(rewards, group_size, scale=scale, backend="torch")
    except (ValueError, TypeError) as err:
        assert _names_an_argument(err), f"{type(err).__name__} names no argument: {err}"
        return
    assert torch.isfinite(adv).all()


def test_property_tests_are_collected():
    pytest.importorskip("hypothesis")
