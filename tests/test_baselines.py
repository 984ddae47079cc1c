"""The benchmark's baselines time what they say: the torch-compile row runs compiled code for every tile."""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch

import grpo_fast as gf
from grpo_fast.backends.torch_ops import TorchChunkOps
from grpo_fast.benchmarking import baselines
from grpo_fast.benchmarking.cases import BenchCase, make_inputs
from grpo_fast.engine.plan import LossCall, plan_loss, run_loss_plan

TENSOR_METHODS = ("stats", "stats_", "partial_stats", "grad_", "tile_stats_", "tile_grad_")


@pytest.fixture
def compiled_calls(monkeypatch):
    """torch.compile replaced by a wrapper that counts its calls; every eager TorchChunkOps method must run
    inside one (a method the chunk loop reaches uncompiled fails the test)."""
    calls: collections.Counter = collections.Counter()
    inside = [0]

    def fake_compile(fn, **kwargs):
        def compiled(*args, **kw):
            calls[fn.__name__] += 1
            inside[0] += 1
            try:
                return fn(*args, **kw)
            finally:
                inside[0] -= 1

        return compiled

    for name in TENSOR_METHODS:
        eager = getattr(TorchChunkOps, name)

        def guarded(self, *args, _eager=eager, _name=name, **kw):
            assert (
                inside[0]
                or type(self) is TorchChunkOps
                and not isinstance(self, baselines.CompiledTorchChunkOps)
            ), f"{_name} ran uncompiled"
            return _eager(self, *args, **kw)

        guarded.__name__ = name
        monkeypatch.setattr(TorchChunkOps, name, guarded)
    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(baselines.CompiledTorchChunkOps, "_compiled", {})
    return calls


def test_torch_compile_baseline_compiles_the_tile_pass(compiled_calls, monkeypatch):
    """dapo (one pass): the loop calls tile_pass_, whose two halves must be the compiled ones."""
    monkeypatch.setenv("GRPO_FAST_CHUNK_BUDGET_MB", "0.05")  # several tiles
    case = BenchCase(N=64, H=16, V=97)
    step = baselines.IMPLS["torch-compile"](make_inputs(case), case)
    step()
    assert compiled_calls["tile_stats_"] > 1 and compiled_calls["tile_grad_"] == compiled_calls["tile_stats_"]


def test_torch_compile_ops_compile_the_two_pass_methods(compiled_calls):
    """A sequence-level objective (two passes): stats_ (the log-prob pass keeps no tile), then grad_, each
    compiled."""
    case = BenchCase(N=32, H=16, V=97)
    inputs = make_inputs(case)
    cfg = gf.GRPOConfig(importance_sampling_level="sequence")
    fields = ("hidden", "weight", "targets", "mask", "advantages", "old_logp")
    h, w, b, plan = plan_loss(
        LossCall(**{k: inputs[k] for k in fields}, config=cfg, backend="torch", chunk_size=8)
    )
    want, _ = gf.grpo_loss(**{k: inputs[k] for k in fields}, config=cfg, backend="torch")
    loss, _ = run_loss_plan(h, w, b, dataclasses.replace(plan, ops=baselines.CompiledTorchChunkOps()))
    loss.backward()
    assert compiled_calls["stats_"] > 1 and compiled_calls["grad_"] == compiled_calls["stats_"]
    torch.testing.assert_close(loss, want)
