"""torch.compile(fullgraph=True) of code calling grpo_loss and selective_logprobs.

Under compile each public function is one opaque custom op (grpo_fast/engine/compile_ops.py): these tests
check that the traced graph has no break, that loss, metrics, log-probs and every gradient equal the eager
ones, and that the input checks still run (a named ValueError, not a crash or a NaN).
"""

from __future__ import annotations

import pytest
import torch

import grpo_fast as gf
from grpo_fast.engine import chunk_loop, compile_ops

from .helpers import cast, make_batch

BACKENDS = ["torch"] + (
    ["native"] if gf.backends.why_not("native", torch.device("cpu"), "grpo_loss") is None else []
)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _loss_args(batch: dict) -> tuple:
    keys = ("hidden", "weight", "targets", "mask", "advantages", "old_logp", "ref_logp", "bias")
    return tuple(batch.get(k) for k in keys)


def _grads(loss: torch.Tensor, batch: dict) -> list[torch.Tensor]:
    leaves = [batch[k] for k in ("hidden", "weight", "bias") if batch.get(k) is not None]
    return list(torch.autograd.grad(loss, leaves))


def _assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "cfg",
    [
        gf.GRPOConfig(loss_type="dapo", beta=0.04, epsilon_high=0.28),
        gf.GRPOConfig(loss_type="grpo", importance_sampling_level="sequence", temperature=0.7),
    ],
    ids=["dapo+kl", "gspo"],
)
def test_compiled_grpo_loss_matches_eager(backend, cfg):
    base = make_batch(seed=5)  # row 1 fully masked; masked ids -100

    def step(hidden, weight, targets, mask, advantages, old_logp, ref_logp, bias):
        loss, metrics = gf.grpo_loss(
            hidden, weight, targets, mask, advantages, old_logp, ref_logp, bias, cfg, backend=backend
        )
        return 3.0 * loss, metrics  # a non-unit upstream gradient

    eager_b, comp_b = cast(base, torch.float32), cast(base, torch.float32)
    want_loss, want_metrics = step(*_loss_args(eager_b))
    got_loss, got_metrics = torch.compile(step, fullgraph=True)(*_loss_args(comp_b))
    _assert_same([got_loss], [want_loss])
    assert got_metrics.keys() == want_metrics.keys()
    _assert_same(list(got_metrics.values()), list(want_metrics.values()))
    _assert_same(_grads(got_loss, comp_b), _grads(want_loss, eager_b))


def test_compiled_grpo_loss_packed_with_num_items_and_module():
    base = make_batch(seed=9, empty_row=False)
    B, T = base["targets"].shape
    seq_ids = torch.arange(B).repeat_interleave(T)
    module = gf.GRPOLoss(gf.GRPOConfig(loss_type="dapo", beta=0.04))

    def step(hidden, weight, targets, mask, advantages, old_logp, ref_logp, bias):
        flat = lambda x: x.reshape(B * T, *x.shape[2:])  # noqa: E731
        return module(
            flat(hidden), weight, flat(targets), flat(mask), advantages, flat(old_logp), flat(ref_logp),
            bias, num_items_in_batch=torch.tensor(500.0), seq_ids=seq_ids,
        )  # fmt: skip

    eager_b, comp_b = cast(base, torch.float32), cast(base, torch.float32)
    want, want_m = step(*_loss_args(eager_b))
    got, got_m = torch.compile(step, fullgraph=True)(*_loss_args(comp_b))
    _assert_same([got, *got_m.values()], [want, *want_m.values()])
    _assert_same(_grads(got, comp_b), _grads(want, eager_b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [False, True])
def test_compiled_selective_logprobs_matches_eager(backend, bias):
    base = make_batch(seed=3, bias=bias, empty_row=False)

    def logprobs(hidden, weight, targets, bias):
        logp, entropy = gf.selective_logprobs(hidden, weight, targets, bias, 0.9, True, backend=backend)
        return logp, entropy

    eager_b, comp_b = cast(base, torch.float32), cast(base, torch.float32)
    args = lambda b: (b["hidden"], b["weight"], b["targets"].clamp(min=0), b.get("bias"))  # noqa: E731
    want = logprobs(*args(eager_b))
    got = torch.compile(logprobs, fullgraph=True)(*args(comp_b))
    _assert_same(list(got), list(want))
    upstream = torch.linspace(-1, 1, want[0].numel()).view_as(want[0])
    _assert_same(_grads((got[0] * upstream).sum(), comp_b), _grads((want[0] * upstream).sum(), eager_b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_entropy_gradient_matches_eager(backend, monkeypatch):
    """The backward op takes the entropy's gradient too; an entropy unused in the graph adds no term."""
    base = make_batch(seed=4, empty_row=False)
    a, b = torch.linspace(-1, 1, 2 * base["targets"].numel()).view(2, *base["targets"].shape)
    terms: list[bool] = []
    inner = chunk_loop.grad_pass
    monkeypatch.setattr(
        chunk_loop, "grad_pass", lambda *x, **k: terms.append(x[5][1] is not None) or inner(*x, **k)
    )

    def weighted(hidden, weight, targets, bias):
        logp, entropy = gf.selective_logprobs(
            hidden, weight, targets, bias, 0.8, True, backend=backend, logit_softcap=4.0
        )
        return (a * logp + b * entropy).sum()

    def logp_only(hidden, weight, targets, bias):
        logp, entropy = gf.selective_logprobs(hidden, weight, targets, bias, 0.8, True, backend=backend)
        return (a * logp).sum(), entropy.detach().mean()

    args = lambda b: (b["hidden"], b["weight"], b["targets"].clamp(min=0), b["bias"])  # noqa: E731
    for fn in (weighted, lambda *x: logp_only(*x)[0]):
        eager_b, comp_b = cast(base, torch.float32), cast(base, torch.float32)
        want = fn(*args(eager_b))
        got = torch.compile(fn, fullgraph=True)(*args(comp_b))
        _assert_same([got], [want])
        _assert_same(_grads(got, comp_b), _grads(want, eager_b))
        torch._dynamo.reset()
    assert terms == [True, True, False, False]  # eager, compiled; each function in turn


def test_compiled_selective_logprobs_no_grad_and_new_shapes():
    fn = torch.compile(lambda h, w, t: gf.selective_logprobs(h, w, t), fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(0)
    for B, T in ((2, 7), (3, 11)):
        h, w = torch.randn(B, T, 16, generator=g), torch.randn(50, 16, generator=g)
        t = torch.randint(0, 50, (B, T), generator=g)
        with torch.no_grad():
            got = fn(h, w, t)
        torch.testing.assert_close(got, gf.reference.selective_logprobs(h, w, t))
        assert not got.requires_grad


def test_compiled_input_checks_still_name_the_argument():
    base = cast(make_batch(seed=1), torch.float32)
    base["advantages"] = base["advantages"].clone()
    base["advantages"][0] = float("nan")
    step = torch.compile(lambda *a: gf.grpo_loss(*a, gf.GRPOConfig(beta=0.04))[0], fullgraph=True)
    with pytest.raises(ValueError, match="advantages"):
        step(*_loss_args(base))
    lp = torch.compile(lambda h, w, t: gf.selective_logprobs(h, w, t), fullgraph=True)
    with pytest.raises(ValueError, match="targets"):
        lp(base["hidden"], base["weight"], torch.full(base["targets"].shape, 10**6))


def test_compiled_vocab_parallel_is_a_named_error():
    # Raised while tracing: with fullgraph Dynamo reports it inside its Unsupported; without, it falls
    # back to eager for the call, whose own check names process_group.
    base = cast(make_batch(seed=1), torch.float32)
    args = (base["hidden"], base["weight"], base["targets"].clamp(min=0))
    with pytest.raises(torch._dynamo.exc.Unsupported, match="process_group.*not supported under torch"):
        torch.compile(lambda h, w, t: gf.selective_logprobs(h, w, t, process_group=object()), fullgraph=True)(
            *args
        )
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="process_group"):
        torch.compile(lambda h, w, t: gf.selective_logprobs(h, w, t, process_group=object()))(*args)


def test_custom_ops_pass_opcheck():
    base = cast(make_batch(B=2, T=5, H=8, V=37, seed=2, empty_row=False), torch.float32)
    h, w, b, t = base["hidden"], base["weight"], base["bias"], base["targets"].clamp(min=0)
    op = torch.ops.grpo_fast_compiled
    torch.library.opcheck(op.selective_logprobs.default, (h, w, t, b, 1.0, "torch", None, False, False, 30.0))
    lse, ent = torch.randn(t.numel()), torch.rand(t.shape)
    leaves = [x.detach() for x in (h, w, b)]  # a backward op is not differentiated itself
    back = (*leaves[:2], t, leaves[2], lse, ent, 0.9, "torch", None, False, None, [True, True, True])
    for grad_entropy in (torch.randn(t.shape), None):
        torch.library.opcheck(
            op.selective_logprobs_backward.default, (torch.randn(t.shape), grad_entropy, *back)
        )
    cfg = compile_ops._config_json(gf.GRPOConfig(beta=0.04))
    args = (*_loss_args(base), None, None, None, None, None, cfg, "torch", None, False, [True, True, True])
    torch.library.opcheck(op.grpo_loss.default, args)
