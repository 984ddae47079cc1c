"""On CUDA a grpo_loss call reads the device once (the input checks and the counts it needs), none per
tile, whatever the objective: the two-walk ones (sequence-level ratios, VESPO, the off-policy mask, the
entropy quantile) keep their clipped sequences in the gradient walk at zero coefficients rather than read
their number. Counted without a GPU by spying on every way a tensor reaches the host.

The finiteness check (NaN or inf in hidden or the LM head, named from the results) costs no read of its
own there: it lands with the call's backward, or at the latest with the next call."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch

import grpo_fast as gf
from grpo_fast.engine import chunk_loop, finite_check
from grpo_fast.engine.finite_check import PendingFiniteCheck, pending_checks

from .helpers import cast, make_batch

READS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__")


def batch(zeros=(1, 3)) -> dict:
    b = cast(make_batch(B=5, T=11, H=24, V=131, seed=0), torch.float32)
    b["advantages"][list(zeros)] = 0.0
    return b


@pytest.fixture(autouse=True)
def own_pending_checks(monkeypatch):
    """Each test's deferred checks are its own: none from another test is settled here, none leaks out."""
    monkeypatch.setattr(finite_check, "_PENDING", [])


def call(b: dict, cfg: gf.GRPOConfig, **kw):
    args = {k: b.get(k) for k in ("old_logp", "ref_logp", "bias")}
    return gf.grpo_loss(
        b["hidden"], b["weight"], b["targets"], b["mask"], b["advantages"], config=cfg, **args, **kw
    )


def count_reads(monkeypatch, fn) -> list[str]:
    """The host reads ``fn()`` makes, as on CUDA (where reading a result is not free). A deferred check's
    flag is not one: on CUDA it is pinned host memory its event has filled (read only once ready)."""
    calls: list[str] = []
    flag_reads = []
    with monkeypatch.context() as m:
        m.setattr(chunk_loop, "on_host", lambda x: False)
        for name in READS:
            original = getattr(torch.Tensor, name)

            def counted(self, *a, _original=original, _name=name, **kw):
                if not flag_reads:
                    calls.append(_name)
                return _original(self, *a, **kw)

            m.setattr(torch.Tensor, name, counted)
        value = PendingFiniteCheck.value

        def host_value(self):
            flag_reads.append(True)
            try:
                return value(self)
            finally:
                flag_reads.pop()

        m.setattr(PendingFiniteCheck, "value", host_value)
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


# Objectives with two walks over the head; the last ones leave no row without a gradient up front.
TWO_WALKS = {
    "sequence": dict(importance_sampling_level="sequence"),
    "vespo": dict(loss_type="vespo"),
    "off_policy_mask": dict(off_policy_mask_threshold=0.5),
    "entropy_quantile": dict(top_entropy_quantile=0.5),
    "sequence_beta": dict(importance_sampling_level="sequence", beta=0.04),
    "quantile_bonus": dict(top_entropy_quantile=0.5, entropy_coef=0.01),
}


def token_advantages(b: dict) -> dict:
    """``b`` with [B, T] advantages: row 0 at 0 but for one masked token (the sequence has no gradient)."""
    adv = b["advantages"][:, None].repeat(1, b["mask"].shape[1])
    masked = int((b["mask"][0] == 0).nonzero()[0])
    adv[0] = 0.0
    adv[0, masked] = 1.0
    return dict(b, advantages=adv)


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("options", TWO_WALKS.values(), ids=TWO_WALKS)
@pytest.mark.parametrize("batch_invariant", [False, True])
def test_two_walk_objective_reads_once(monkeypatch, backend, options, batch_invariant):
    """The gradient walk's rows come from the plan's read: none between the walks."""
    b = batch()
    kw = dict(backend=backend, chunk_size=8, batch_invariant=batch_invariant)
    reads = count_reads(monkeypatch, lambda: call(b, gf.GRPOConfig(**options), **kw))
    assert reads == ["tolist"], reads


def test_sequence_level_token_advantages_read_once(monkeypatch):
    b = token_advantages(batch())
    cfg = gf.GRPOConfig(importance_sampling_level="sequence")
    reads = count_reads(monkeypatch, lambda: call(b, cfg, backend="torch", chunk_size=8))
    assert reads == ["tolist"], reads


def clipping_batch(token_adv: bool = False) -> dict:
    """Rows 1 and 3 at advantage 0, row 0 clipped at sequence level (ratio above 1 + eps, advantage > 0),
    row 4 clipped (ratio below 1 - eps, advantage < 0) and off-policy (mean KL 1)."""
    b = batch()
    adv = b["advantages"].abs()
    adv[4] = -adv[4]
    old = b["old_logp"].clone()
    old[0] -= 1.0
    old[4] += 1.0
    b = dict(b, advantages=adv, old_logp=old)
    return token_advantages(b) if token_adv else b


def grad_walk(b: dict, cfg: gf.GRPOConfig, cuda: bool, monkeypatch, **kw):
    """(loss, metrics, gradients, rows through the gradient walk), with CUDA emulated or not."""
    b = cast(b, torch.float32)
    rows = []
    with monkeypatch.context() as m:
        if cuda:
            m.setattr(chunk_loop, "on_host", lambda x: False)
        inner = chunk_loop.grad_pass
        m.setattr(chunk_loop, "grad_pass", lambda *a, **k: rows.append(a[0].shape[0]) or inner(*a, **k))
        loss, metrics = call(b, cfg, **kw)
        loss.backward()
    grads = {k: b[k].grad for k in ("hidden", "weight", "bias")}
    return loss, metrics, grads, sum(rows)


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a, b) or bool(a.isnan().all() and b.isnan().all())


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("case", [*TWO_WALKS, "sequence_token_adv"])
@pytest.mark.parametrize("batch_invariant", [False, True])
def test_two_walk_gradients_on_cuda_are_the_cpus(monkeypatch, backend, case, batch_invariant):
    """On CUDA the clipped sequences stay in the gradient walk (at exact zero coefficients), on the CPU
    they are left out: the same loss and metrics (bitwise), the same gradients (dL/dh bitwise with
    batch_invariant, where a row's GEMMs have one shape whatever rows come with it)."""
    token_adv = case == "sequence_token_adv"
    cfg = gf.GRPOConfig(**TWO_WALKS["sequence" if token_adv else case])
    kw = dict(backend=backend, chunk_size=8, batch_invariant=batch_invariant)
    b = clipping_batch(token_adv)
    loss, metrics, got, cuda_rows = grad_walk(b, cfg, True, monkeypatch, **kw)
    loss0, metrics0, want, cpu_rows = grad_walk(b, cfg, False, monkeypatch, **kw)
    assert same(loss, loss0) and all(same(metrics[k], metrics0[k]) for k in metrics0)
    for k in want:
        assert rel(got[k], want[k]) <= 1e-5, (k, rel(got[k], want[k]))
    if batch_invariant:
        assert torch.equal(got["hidden"], want["hidden"])
    unmasked = b["mask"] != 0
    zero_rows = [1, 3] + ([0] if token_adv else [])  # row 0's only non-zero advantage is masked
    if cfg.beta == 0 and cfg.entropy_coef == 0:
        unmasked[zero_rows] = False
    assert cuda_rows == int(unmasked.sum()), (cuda_rows, int(unmasked.sum()))
    if case in ("sequence", "sequence_token_adv", "off_policy_mask", "entropy_quantile"):
        assert cpu_rows < cuda_rows  # the CPU leaves the clipped ones out


def test_all_masked_and_all_zero_read_once(monkeypatch):
    b = batch(zeros=range(5))
    b["mask"][:2] = 0
    reads = count_reads(monkeypatch, lambda: call(b, gf.GRPOConfig(), backend="torch", chunk_size=8))
    assert reads == ["tolist"], reads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("options", [{}, *TWO_WALKS.values()], ids=["token_local", *TWO_WALKS])
def test_cuda_call_synchronizes_once(options):
    b = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in batch().items()}
    cfg = gf.GRPOConfig(**options)
    call(b, cfg, backend="torch", chunk_size=8)  # warm-up: lazy initialisation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call(b, cfg, backend="torch", chunk_size=8)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


# ---- the deferred finiteness check of a token-local call

HIDDEN_NAMED = r"hidden must be finite \(NaN or inf found at a position that counts\)"
LATER = r"an earlier grpo_loss call's result was not finite: "


def spoiled(b: dict, name: str = "hidden", value: float = float("nan")) -> dict:
    """``b`` with one non-finite value in ``name`` where it counts (row 0, token 2 is unmasked)."""
    assert b["mask"][0, 2]
    x = b[name].detach().clone()
    x[(0, 2, 3) if name == "hidden" else (7, 5)] = value
    return dict(b, **{name: x.requires_grad_()})


def forward(b: dict, cfg: gf.GRPOConfig | None = None, **kw):
    return call(b, cfg or gf.GRPOConfig(), backend="torch", chunk_size=8, **kw)


# A token-local objective and two-walk ones: the same deferred check.
OBJECTIVES = {"token_local": {}, "sequence": TWO_WALKS["sequence"], "vespo": TWO_WALKS["vespo"]}


@pytest.mark.parametrize("options", OBJECTIVES.values(), ids=OBJECTIVES)
def test_nan_hidden_is_named_at_backward(monkeypatch, options):
    """Emulated CUDA: the call reads once and raises nothing; its backward names the input (the flag
    reached the host by then)."""
    bad = spoiled(batch())
    out = []
    reads = count_reads(monkeypatch, lambda: out.append(forward(bad, gf.GRPOConfig(**options))))
    assert reads == ["tolist"], reads
    loss, _ = out[0]
    assert torch.isnan(loss) and len(pending_checks()) == 1
    with monkeypatch.context() as m:
        m.setattr(chunk_loop, "on_host", lambda x: False)
        with pytest.raises(ValueError, match="^" + HIDDEN_NAMED):
            loss.backward()
    assert pending_checks() == ()


@pytest.mark.parametrize("name", ["hidden", "weight"])
@pytest.mark.parametrize("next_call", ["grpo_loss", "selective_logprobs"])
@pytest.mark.parametrize("options", OBJECTIVES.values(), ids=OBJECTIVES)
def test_a_check_not_ready_at_backward_lands_with_the_next_call(monkeypatch, name, next_call, options):
    b = batch()
    bad = spoiled(b, name, float("inf") if name == "weight" else float("nan"))
    with monkeypatch.context() as m:
        m.setattr(chunk_loop, "on_host", lambda x: False)
        loss, _ = forward(bad, gf.GRPOConfig(**options))
        m.setattr(PendingFiniteCheck, "ready", lambda self: False)
        loss.backward()  # the flag is still on its way: nothing to say yet
    assert len(pending_checks()) == 1
    match = LATER + (HIDDEN_NAMED if name == "hidden" else r"weight \(the LM head\) must be finite")

    def next_one():
        with pytest.raises(ValueError, match=match):
            if next_call == "grpo_loss":
                forward(b)
            else:
                gf.selective_logprobs(b["hidden"], b["weight"], b["targets"].clamp(min=0), backend="torch")

    reads = count_reads(monkeypatch, next_one)
    assert reads[0] == "tolist", reads  # the call's own read, then (on the error path only) the search
    assert pending_checks() == ()


def test_inputs_gone_by_the_next_call_still_raise(monkeypatch):
    """The check keeps no input alive. A slice of a living tensor is rebuilt from it; a NaN whose inputs
    are both gone raises without a name, saying how to find it."""
    b = batch()
    base = spoiled(b)["hidden"].detach()
    with monkeypatch.context() as m:
        m.setattr(chunk_loop, "on_host", lambda x: False)
        forward(dict(b, hidden=base[:, :]))  # the slice dies with the call, its base lives
    with pytest.raises(ValueError, match=LATER + HIDDEN_NAMED):
        forward(b)
    with monkeypatch.context() as m:
        m.setattr(chunk_loop, "on_host", lambda x: False)
        forward(dict(b, hidden=base.clone()))
    gc.collect()
    with pytest.raises(
        ValueError, match=r"its hidden is gone, so which one cannot be said: run that call on"
    ):
        forward(b)


def test_finite_inputs_leave_nothing_pending(monkeypatch):
    b = batch()
    b["hidden"].requires_grad_()
    with monkeypatch.context() as m:
        m.setattr(chunk_loop, "on_host", lambda x: False)
        loss, _ = forward(b)
        loss.backward()
        assert pending_checks() == ()
        first = forward(b)[0]
        assert len(pending_checks()) == 1
        forward(b)  # settles the first call's check
        assert len(pending_checks()) == 1 and torch.isfinite(first)


def test_overflowing_logits_of_finite_inputs_are_returned_as_computed(monkeypatch):
    """A set flag whose inputs show nothing (finite values whose logits overflow fp32) raises nothing."""
    b = batch()
    big = dict(b, hidden=(b["hidden"] * 1e30).requires_grad_(), weight=b["weight"] * 1e30)
    with monkeypatch.context() as m:
        m.setattr(chunk_loop, "on_host", lambda x: False)
        loss, _ = forward(big)
        loss.backward()
    assert not torch.isfinite(loss) and pending_checks() == ()


@pytest.mark.parametrize("options", OBJECTIVES.values(), ids=OBJECTIVES)
def test_on_the_cpu_the_check_is_immediate(options):
    with pytest.raises(ValueError, match="^" + HIDDEN_NAMED):
        forward(spoiled(batch()), gf.GRPOConfig(**options))
    assert pending_checks() == ()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_deferred_check_costs_no_synchronization():
    """Finite inputs: forward and backward synchronize once (the call's read), the backward not at all. A
    NaN in hidden is named by the next call at the latest."""
    b = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in batch().items()}
    b["hidden"].requires_grad_()
    forward(b)[0].backward()  # warm-up: lazy initialisation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            forward(b)[0].backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
    loss, _ = forward(b)
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    forward(b)  # settles the earlier checks: all finite
    with pytest.raises(ValueError, match=HIDDEN_NAMED):
        loss, _ = forward(spoiled(b))
        loss.backward()
        forward(b)
    assert pending_checks() == ()
