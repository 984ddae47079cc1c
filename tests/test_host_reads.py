"""On CUDA a grpo_loss call reads the device once (the input checks and the counts it needs), none per
tile; objectives whose two walks over the head have the rows of the second depend on the first read once
more, between them. Counted without a GPU by spying on every way a tensor reaches the host."""

from __future__ import annotations

import warnings

import pytest
import torch

import grpo_fast as gf
from grpo_fast.engine import chunk_loop

from .helpers import cast, make_batch

READS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__")


def batch(zeros=(1, 3)) -> dict:
    b = cast(make_batch(B=5, T=11, H=24, V=131, seed=0), torch.float32)
    b["advantages"][list(zeros)] = 0.0
    return b


def call(b: dict, cfg: gf.GRPOConfig, **kw):
    args = {k: b.get(k) for k in ("old_logp", "ref_logp", "bias")}
    return gf.grpo_loss(
        b["hidden"], b["weight"], b["targets"], b["mask"], b["advantages"], config=cfg, **args, **kw
    )


def count_reads(monkeypatch, fn) -> list[str]:
    """The host reads ``fn()`` makes, as on CUDA (where reading a result is not free)."""
    calls: list[str] = []
    with monkeypatch.context() as m:
        m.setattr(chunk_loop, "on_host", lambda x: False)
        for name in READS:
            original = getattr(torch.Tensor, name)

            def counted(self, *a, _original=original, _name=name, **kw):
                calls.append(_name)
                return _original(self, *a, **kw)

            m.setattr(torch.Tensor, name, counted)
        m.setattr(torch, "nonzero", lambda *a, **k: calls.append("torch.nonzero") or torch.empty(0))
        fn()
    return calls


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize(
    "options",
    [dict(), dict(loss_type="grpo"), dict(beta=0.04), dict(entropy_coef=0.01), dict(loss_type="cispo")],
)
@pytest.mark.parametrize("batch_invariant", [False, True])
def test_token_local_objective_reads_once(monkeypatch, backend, options, batch_invariant):
    b = batch()
    kw = dict(backend=backend, chunk_size=8, batch_invariant=batch_invariant)  # many tiles
    reads = count_reads(monkeypatch, lambda: call(b, gf.GRPOConfig(**options), **kw))
    assert reads == ["tolist"], reads


def test_two_walk_objective_reads_twice(monkeypatch):
    """Sequence-level ratios: the gradient walk's rows (clipped sequences left out) are read with the
    results' finiteness, after the log-prob walk."""
    b = batch()
    cfg = gf.GRPOConfig(importance_sampling_level="sequence")
    reads = count_reads(monkeypatch, lambda: call(b, cfg, backend="torch", chunk_size=8))
    assert reads == ["tolist", "tolist"], reads


def test_all_masked_and_all_zero_read_once(monkeypatch):
    b = batch(zeros=range(5))
    b["mask"][:2] = 0
    reads = count_reads(monkeypatch, lambda: call(b, gf.GRPOConfig(), backend="torch", chunk_size=8))
    assert reads == ["tolist"], reads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_call_synchronizes_once():
    b = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in batch().items()}
    call(b, gf.GRPOConfig(), backend="torch", chunk_size=8)  # warm-up: lazy initialisation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call(b, gf.GRPOConfig(), backend="torch", chunk_size=8)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
