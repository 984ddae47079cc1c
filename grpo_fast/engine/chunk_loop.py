"""The chunk loop: GEMM a ``[C, V]`` tile, run the backend's chunk pass, fold the gradient GEMMs in.

The whole GRPO objective and its gradients come out of one pass over the vocabulary when the objective
is token-local (6*N*H*V FLOPs); one that couples a sequence's tokens (GSPO's sequence-level ratio, VESPO)
pays one extra no-grad forward pass for the log-probs. Never more than one logits tile is alive. The
backend (:class:`grpo_fast.backends.base.ChunkOps`) does the row-wise tile work, the per-token math is
:mod:`grpo_fast.engine.objective`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..backends.base import ChunkOps, Coefficients
from ..config import GRPOConfig
from .finite_check import FiniteResultCheck, PendingFiniteCheck, settle
from .gradients import Grads
from .objective import (
    TokenBatch,
    coefficients,
    loss_and_metrics,
    metric_names,
    needs_whole_sequences,
    with_entropy_mask,
    with_group_totals,
    zero_gradient_rows,
)
from .parallel import VocabShard, combine_stats
from .tiles import chunks, logits_tile, padded, soft_cap_, uncap_
from .validation import ValueChecks


def zero_split(zero: Tensor | None, live: int | None = None) -> tuple[Tensor, Tensor] | None:
    """(rows with a gradient, rows without), each in order, from ``zero`` ([n] bool, True: no gradient);
    None when every row has one. ``live``: the number of rows with a gradient, when the caller read it
    with its other values; else one host read here (the count). No boolean indexing."""
    if zero is None:
        return None
    if live is None:
        live = zero.numel() - int(zero.sum())
    if live == zero.numel():
        return None
    order = torch.argsort(zero.to(torch.int8), stable=True)
    return order[:live], order[live:]


def gradient_rows(zero: Tensor | None, live: int | None = None) -> Tensor | None:
    """The rows with a gradient, in order (:func:`zero_split`'s first part); None when every row has one."""
    split = zero_split(zero, live)
    return None if split is None else split[0]


def on_host(x: Tensor) -> bool:
    """Whether reading ``x`` back costs no synchronization (CPU tensors)."""
    return x.device.type == "cpu"


def _stats(
    ops: ChunkOps,
    logits: Tensor,
    targets: Tensor,
    temperature: float,
    shard: VocabShard | None,
    keep_tile: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """(lse, logp, entropy) over the whole vocabulary, combining shards when the head is split;
    ``keep_tile=False``: the tile may be overwritten."""
    if shard is None:
        return (
            ops.stats(logits, targets, temperature) if keep_tile else ops.stats_(logits, targets, temperature)
        )
    return combine_stats(ops.partial_stats(logits, targets, temperature), shard)


def logprob_pass(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    temperature: float,
    ops: ChunkOps,
    chunk: int,
    shard: VocabShard | None = None,
    invariant_rows: int | None = None,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """No-grad per-token logsumexp (fp64, see backends/base.py), log-prob and entropy (fp32), [n] each."""
    n = hidden.shape[0]
    lse = torch.empty(n, dtype=torch.float64, device=hidden.device)
    out = torch.empty(2, n, dtype=torch.float32, device=hidden.device)
    for s, e in chunks(n, chunk):
        logits = logits_tile(hidden[s:e], weight, bias, invariant_rows)
        soft_cap_(logits, softcap)
        stats = _stats(
            ops, logits, padded(targets[s:e], logits.shape[0]), temperature, shard, keep_tile=False
        )
        lse[s:e] = stats[0][: e - s]
        out[0, s:e], out[1, s:e] = stats[1][: e - s], stats[2][: e - s]
        del logits  # freed before the next tile's GEMM: one tile alive, not two
    return lse, out[0], out[1]


def grad_pass(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    stats: tuple[Tensor, Tensor | None],
    coefs: tuple[Tensor, Tensor | None],
    temperature: float,
    ops: ChunkOps,
    chunk: int,
    grads: Grads,
    invariant_rows: int | None = None,
    softcap: float | None = None,
) -> None:
    """Gradients for known per-row coefficients (recomputes each tile).

    ``stats``: (lse, entropy) of every row, ``coefs``: (g, e) with ``e`` None when the loss ignores H.
    """
    (lse, entropy), (g, e) = stats, coefs
    for s, t in chunks(hidden.shape[0], chunk):
        h = hidden[s:t]
        logits = logits_tile(h, weight, bias, invariant_rows)
        factor = soft_cap_(logits, softcap)
        rows = logits.shape[0]
        ent = (padded(e[s:t], rows), padded(entropy[s:t], rows)) if e is not None else (None, None)
        dl = ops.grad_(
            logits,
            padded(targets[s:t], rows),
            padded(lse[s:t], rows),
            padded(g[s:t], rows),
            temperature,
            *ent,
        )
        grads.accumulate(uncap_(dl, factor), h, weight, s, t)
        del logits, dl, factor  # freed before the next tile's GEMM: one tile alive, not two


def rows_grad_pass(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    stats: tuple[Tensor, Tensor | None],
    coefs: tuple[Tensor, Tensor | None],
    temperature: float,
    ops: ChunkOps,
    chunk: int,
    needs: tuple[bool, ...],
    rows: Tensor | None,
    invariant_rows: int | None = None,
    softcap: float | None = None,
) -> Grads:
    """:func:`grad_pass` over ``rows`` of ``hidden`` (in that order; None: all), into new gradients (the
    other rows' dL/dh is 0)."""
    grads = Grads.allocate(hidden, weight, bias, needs, rows=rows, invariant_rows=invariant_rows)
    if rows is not None:
        pick = lambda x: x.index_select(0, rows) if x is not None else None  # noqa: E731
        hidden, targets = pick(hidden), pick(targets)
        stats, coefs = (pick(stats[0]), pick(stats[1])), (pick(coefs[0]), pick(coefs[1]))
    if hidden.shape[0]:
        grad_pass(
            hidden, weight, bias, targets, stats, coefs, temperature, ops, chunk, grads, invariant_rows,
            softcap,
        )  # fmt: skip
    return grads


def zero_coefficients(coefs: tuple[Tensor, Tensor | None]) -> Tensor:
    """[n] bool: the rows whose (g, e) are both exactly 0."""
    g, e = coefs
    return (g == 0) if e is None else (g == 0) & (e == 0)


@dataclass(frozen=True)
class LossPlan:
    targets: Tensor  # ids local to this rank's vocab shard (global ids without a shard)
    batch: TokenBatch
    cfg: GRPOConfig
    ops: ChunkOps
    chunk: int
    shard: VocabShard | None = None
    invariant_rows: int | None = None  # batch invariance: every logits GEMM has exactly this many rows
    rows: Tensor | None = None  # rows of the [N, H] hidden the loss reads (masked dropped); None: all
    # The entropy quantile's pool: this process's entropies in, every process's out (None: this batch's).
    entropy_gather: Callable[[Tensor], Tensor] | None = None
    # From the rows' (logp, entropy): names a non-finite input (finite_check.FiniteResultCheck); None: the
    # inputs were checked up front.
    check_result: FiniteResultCheck | None = None
    # Rows the advantages leave a gradient (zero_gradient_rows: the rest have g = e = 0), read with the
    # plan's checks; None: not counted (every row has one).
    live_rows: int | None = None


def run_grpo(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, plan: LossPlan, needs: tuple[bool, ...]
) -> tuple[Tensor, dict[str, Tensor], tuple[Tensor | None, ...], PendingFiniteCheck | None]:
    """Loss, metrics, the gradients w.r.t. hidden, weight, bias, and the finiteness check still to come
    (None: done, or none to do).

    Per tile: GEMM, row statistics (combined across vocab shards), the per-row coefficients of the
    objective, dlogits in place, the gradient GEMMs. A token-local objective does it in one walk over the
    tokens; one that couples the tokens of a sequence first walks them for the log-probs (no grad).

    Rows whose coefficients are exactly 0 take no part in dlogits and the gradient GEMMs (their dL/dh is
    0). Those the advantages zero (:func:`zero_gradient_rows`) are known from the batch before the walk,
    their number read with the plan's checks: a token-local objective walks them for their statistics
    only, a two-walk one leaves them out of its gradient walk. A two-walk objective's clipped sequences
    are known only after its log-prob walk, and counting them needs a host read: where that is free (the
    CPU) they are left out of the gradient walk too; on CUDA they stay in it with their coefficients as
    computed (exact zeros, so the same gradients) rather than stall the device.

    Host reads: none here on CUDA, for every objective (the plan's one read has the counts). On the CPU
    the results' finiteness is read at once (free there), and a two-walk objective reads the number of
    rows its gradient walk keeps with it. On CUDA the finiteness check is deferred
    (:class:`PendingFiniteCheck`) and its error, naming the bad input, lands with the call's backward when
    the flag has reached the host by then, at the latest with the next ``grpo_loss`` or
    ``selective_logprobs`` call. The loss and metrics are NaN until then.
    """
    cfg, batch, ops, chunk, targets, shard, invariant_rows = (
        plan.cfg,
        plan.batch,
        plan.ops,
        plan.chunk,
        plan.targets,
        plan.shard,
        plan.invariant_rows,
    )
    n, temperature, cap = hidden.shape[0], cfg.temperature, cfg.logit_softcap
    bad = None  # whether a result is not finite, when that is known on the host
    pending = None
    if not needs_whole_sequences(cfg):
        split = zero_split(zero_gradient_rows(batch, cfg), plan.live_rows)
        if split is None:
            grads = Grads.allocate(hidden, weight, bias, needs, invariant_rows=invariant_rows)
            logp, entropy = _one_walk(hidden, weight, bias, targets, batch, plan, grads)
        else:
            live, dead = split
            grads = Grads.allocate(hidden, weight, bias, needs, rows=live, invariant_rows=invariant_rows)
            logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
            entropy = torch.empty_like(logp)
            if live.numel():
                lp, ent = _one_walk(
                    hidden.index_select(0, live), weight, bias, targets.index_select(0, live),
                    batch.select(live), plan, grads,
                )  # fmt: skip
                logp.index_copy_(0, live, lp)
                entropy.index_copy_(0, live, ent)
            # Statistics only (loss value, metrics): the same GEMM tiles, no dlogits, no gradient GEMMs.
            _, lp, ent = logprob_pass(
                hidden.index_select(0, dead), weight, bias, targets.index_select(0, dead), temperature, ops,
                chunk, shard, invariant_rows, softcap=cap,
            )  # fmt: skip
            logp.index_copy_(0, dead, lp)
            entropy.index_copy_(0, dead, ent)
    else:
        lse, logp, entropy = logprob_pass(
            hidden, weight, bias, targets, temperature, ops, chunk, shard, invariant_rows, softcap=cap
        )
        batch = with_entropy_mask(entropy, batch, cfg, plan.entropy_gather)
        batch = with_group_totals(logp, batch, cfg)  # sequence parallel: the sums over the group's tokens
        coefs = coefficients(logp, entropy, batch, cfg)
        if on_host(logp):  # reads are free here: leave the clipped sequences out too, check at once
            reads = ValueChecks()  # the gradient walk's row count, and the results' finiteness with it
            live_at = reads.count((~zero_coefficients(coefs)).sum())
            flag = plan.check_result.bad(logp, entropy) if plan.check_result is not None else None
            bad_at = reads.count(flag) if flag is not None else None
            counts = reads.run()
            bad = bool(counts[bad_at]) if bad_at is not None else False
            rows = gradient_rows(zero_coefficients(coefs), counts[live_at])
        else:  # no read: the rows the advantages leave live (counted by the plan), clipped ones at g = e = 0
            rows = gradient_rows(zero_gradient_rows(batch, cfg), plan.live_rows)
        grads = rows_grad_pass(
            hidden, weight, bias, targets, (lse, entropy), coefs, temperature, ops, chunk, needs, rows,
            invariant_rows, cap,
        )  # fmt: skip
    loss, metrics = loss_and_metrics(logp, entropy, batch, cfg)
    out = grads.final(weight, bias, shard)
    if plan.check_result is not None:  # after final()'s collective: every rank gets through it
        if bad is None and on_host(logp):  # reading it costs nothing there
            flag = plan.check_result.bad(logp, entropy)
            bad = flag is not None and bool(flag)
        elif bad is None:  # a read would stall the device: checked later, at no synchronization
            pending = plan.check_result.defer(logp, entropy)
        if bad:
            plan.check_result.name_input()
    return loss, metrics, out, pending


def _one_walk(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    batch: TokenBatch,
    plan: LossPlan,
    grads: Grads,
) -> tuple[Tensor, Tensor]:
    """The token-local objective's single walk over ``hidden``'s rows (``batch`` their tokens): statistics,
    coefficients, dlogits and the gradient GEMMs per tile. Returns (logp, entropy)."""
    cfg, ops, shard, temperature = plan.cfg, plan.ops, plan.shard, plan.cfg.temperature
    n = hidden.shape[0]
    logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    entropy = torch.empty_like(logp)
    for s, e in chunks(n, plan.chunk):
        h, c = hidden[s:e], e - s
        logits = logits_tile(h, weight, bias, plan.invariant_rows)
        factor = soft_cap_(logits, cfg.logit_softcap)
        t = padded(targets[s:e], logits.shape[0])
        coefs = _tile_coefficients(batch.rows(s, e), cfg, c)
        if shard is None:
            _, lp, ent, dl = ops.tile_pass_(logits, t, temperature, coefs)
        else:  # the statistics of every shard first, then the same coefficients and dlogits
            lse, lp, ent = _stats(ops, logits, t, temperature, shard)
            g, ec = coefs(lp, ent)
            dl = ops.grad_(logits, t, lse, g, temperature, ec, ent if ec is not None else None)
        logp[s:e], entropy[s:e] = lp[:c], ent[:c]
        grads.accumulate(uncap_(dl, factor), h, weight, s, e)
        del logits, dl, factor  # freed before the next tile's GEMM: one tile alive, not two
    return logp, entropy


def _tile_coefficients(rows: TokenBatch, cfg: GRPOConfig, real: int) -> Coefficients:
    """The objective's (g, e) for a tile whose first ``real`` rows are ``rows``' tokens (the rest, if the
    tile is padded, get zeros: no gradient)."""

    def coefs(lp: Tensor, ent: Tensor) -> tuple[Tensor, Tensor | None]:
        g, e = coefficients(lp[:real], ent[:real], rows, cfg)
        return padded(g, lp.shape[0]), padded(e, lp.shape[0])

    return coefs


def _scaled(grad: Tensor | None, scale: Tensor, is_one: bool) -> Tensor | None:
    """``grad * scale`` in place: the forward's gradients are this backward's alone (no second [V, H])."""
    if grad is None or is_one:
        return grad
    return grad.mul_(scale.to(grad.dtype))


class FusedGRPOLoss(torch.autograd.Function):
    """Forward does all the work; backward only scales the gradients it left behind."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, plan: LossPlan):
        loss, metrics, grads, ctx.pending = run_grpo(hidden, weight, bias, plan, ctx.needs_input_grad[:3])
        ctx.grads = grads
        metric_vec = torch.stack([metrics[k] for k in metric_names(plan.cfg)])
        ctx.mark_non_differentiable(metric_vec)
        return loss, metric_vec

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_metrics: Tensor):
        if ctx.grads is None:
            raise RuntimeError(
                "grpo_fast's fused loss keeps its gradients for a single backward; run forward again"
            )
        grads, ctx.grads = ctx.grads, None
        # The forward's deferred finiteness check, when its flag is on the host already (no wait).
        if ctx.pending is not None and ctx.pending.ready():
            pending, ctx.pending = ctx.pending, None
            settle(pending, later=False)
        # loss.backward() passes 1: skip the scaling then. Asking costs a synchronization on CUDA, where
        # the scaling is the cheaper of the two (one pass over the gradients, no stall).
        is_one = grad_loss.device.type == "cpu" and bool(grad_loss == 1)
        gh, gw, gb = (_scaled(g, grad_loss, is_one) for g in grads)
        return gh, gw, gb, None


@dataclass(frozen=True)
class LogprobPlan:
    targets: Tensor  # ids local to this rank's vocab shard (global ids without a shard)
    temperature: float
    ops: ChunkOps
    chunk: int
    shard: VocabShard | None = None
    invariant_rows: int | None = None  # batch invariance: every logits GEMM has exactly this many rows
    softcap: float | None = None  # cap * tanh(logits / cap) before the temperature


class FusedLogprobs(torch.autograd.Function):
    """Per-token log-probs and entropy; a backward recomputes the tiles chunk by chunk, with the entropy's
    term in dlogits only when the entropy received a gradient."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, plan: LogprobPlan):
        lse, logp, entropy = logprob_pass(
            hidden, weight, bias, plan.targets, plan.temperature, plan.ops, plan.chunk, plan.shard,
            plan.invariant_rows, softcap=plan.softcap,
        )  # fmt: skip
        ctx.plan = plan
        # An output nothing differentiates gets None, not zeros: no entropy term (and no [N] zeros) then.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, bias, lse, entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: Tensor | None, grad_entropy: Tensor | None):
        hidden, weight, bias, lse, entropy = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        stats, grad_out = (lse, entropy), (grad_logp, grad_entropy)
        gh, gw, gb = logprob_grads(hidden, weight, bias, stats, grad_out, ctx.plan, needs)
        return gh, gw, gb, None


def logprob_grads(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stats: tuple[Tensor, Tensor],
    grad_out: tuple[Tensor | None, Tensor | None],
    plan: LogprobPlan,
    needs: tuple[bool, ...],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients to (hidden, weight, bias) of ``sum(grad_logp * logp + grad_entropy * entropy)``: one more
    pass over the tiles, from the rows' (logsumexp, entropy) the forward pass kept (None where ``needs``
    says no). ``grad_out`` is (grad_logp, grad_entropy), flat ``[N]``, either None when it has no gradient;
    without grad_entropy the tiles skip the entropy term (the grpo_loss entropy bonus's ``e``). Rows whose
    incoming gradients are both 0 are left out of the pass."""
    lse, entropy = stats
    grad_logp, grad_entropy = grad_out
    g = grad_logp.float() if grad_logp is not None else torch.zeros_like(entropy)
    e = grad_entropy.float() if grad_entropy is not None else None
    grads = rows_grad_pass(
        hidden,
        weight,
        bias,
        plan.targets,
        (lse, entropy),
        (g, e),
        plan.temperature,
        plan.ops,
        plan.chunk,
        needs,
        gradient_rows(zero_coefficients((g, e))),  # rows whose incoming gradients are both 0: left out
        plan.invariant_rows,
        plan.softcap,
    )
    return grads.final(weight, bias, plan.shard)
