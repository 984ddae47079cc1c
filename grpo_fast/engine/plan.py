"""From the public arguments to a plan the chunk loop runs: the one set-up path of ``grpo_loss`` and
``selective_logprobs``.

A frozen call record (:class:`LossCall`, :class:`LogprobCall`) carries a call's arguments under their API
names, checks the non-tensor ones once, and is what every entry point passes on (the eager path, the
``torch.compile`` boundary in :mod:`.compile_ops`, the benchmarks): a new option is one field here.

Order: the LM head is checked and (vocab-parallel) the shard layout agreed first, because the other inputs'
checks need the global vocabulary; then the inputs are validated; then :meth:`Head.plan` resolves the
backend and the tile size. Nothing runs a kernel before all checks have passed, but one: NaN and inf in
hidden and the LM head are found from the pass's per-row results (:mod:`.finite_check`),
which then names the bad input with the same error; a full read of W per call is what that saves.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import backends
from ..backends.base import ChunkOps
from ..config import GRPOConfig
from .chunk_loop import FusedGRPOLoss, FusedLogprobs, LogprobPlan, LossPlan
from .finite_check import finite_result_check, settle_ready
from .objective import TokenBatch, metric_names, segment_sum, zero_gradient_rows
from .parallel import VocabShard, make_shard, shared_chunk_size
from .sequence_group import agree, check_agreement, open_sequence_group
from .tile_size import resolve_chunk_size
from .validation import (
    ValueChecks,
    add_bias_value_check,
    add_head_value_checks,
    check_lm_head,
    check_same_device,
    check_targets,
    check_tensor,
    validate_loss_inputs,
)

# Rows of every logits GEMM with batch_invariant=True: one GEMM shape, so that a token's log-prob is
# bitwise the same whatever batch, padding, packing or chunk size it comes with. Small enough that padding
# a short batch costs little, large enough for an efficient GEMM (2-core CPU, [*, 512] x [512, 32768]
# fp32: 64-row GEMMs take 45% longer than one 768-row GEMM, 128-row ones 7%).
INVARIANT_ROWS = 128


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")


@dataclass(frozen=True, eq=False)
class LossCall:
    """The arguments of one ``grpo_loss`` call (see its docstring for each)."""

    hidden: Tensor
    weight: Tensor
    targets: Tensor
    mask: Tensor
    advantages: Tensor
    old_logp: Tensor | None = None
    ref_logp: Tensor | None = None
    bias: Tensor | None = None
    config: GRPOConfig | None = None
    num_items_in_batch: int | float | Tensor | None = None
    seq_ids: Tensor | None = None
    sampling_logp: Tensor | None = None
    importance_sampling_ratio: Tensor | None = None
    entropy_gather: Callable[[Tensor], Tensor] | None = None
    backend: str = "auto"
    chunk_size: int | None = None
    process_group: object | None = None
    vocab_start: int | None = None
    batch_invariant: bool = False
    sequence_group: object | None = None

    def __post_init__(self) -> None:
        if self.sequence_group is not None and self.process_group is not None:
            raise ValueError(
                "sequence_group (sequence parallelism) with process_group (a vocab-parallel head) is not "
                "supported: give one of them"
            )
        config = self.config if self.config is not None else GRPOConfig()
        if not isinstance(config, GRPOConfig):
            raise TypeError(f"config must be a grpo_fast.GRPOConfig, got {type(config).__name__}")
        object.__setattr__(self, "config", config)
        if self.entropy_gather is not None and not callable(self.entropy_gather):
            raise TypeError(f"entropy_gather must be callable, got {type(self.entropy_gather).__name__}")
        items = self.num_items_in_batch
        if items is not None and not isinstance(items, Tensor):
            if isinstance(items, bool) or not isinstance(items, (int, float)):
                raise TypeError(
                    f"num_items_in_batch must be an int, float or 0-dim tensor, got {type(items).__name__}"
                )
        _check_bool("batch_invariant", self.batch_invariant)

    def replace(self, **changes: object) -> LossCall:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, eq=False)
class LogprobCall:
    """The arguments of one ``selective_logprobs`` call (see its docstring for each)."""

    hidden: Tensor
    weight: Tensor
    targets: Tensor
    bias: Tensor | None = None
    temperature: float = 1.0
    return_entropy: bool = False
    backend: str = "auto"
    chunk_size: int | None = None
    process_group: object | None = None
    vocab_start: int | None = None
    fused_gemm: bool = False
    batch_invariant: bool = False
    logit_softcap: float | None = None

    def __post_init__(self) -> None:
        _check_number("temperature", self.temperature)
        _check_bool("fused_gemm", self.fused_gemm)
        _check_bool("batch_invariant", self.batch_invariant)
        cap = self.logit_softcap
        if cap is not None:
            if isinstance(cap, bool) or not isinstance(cap, (int, float)):
                raise TypeError(f"logit_softcap must be a float or None, got {type(cap).__name__}")
            if self.fused_gemm:
                raise ValueError(
                    "fused_gemm=True does not soft-cap the logits: use the tile path for logit_softcap"
                )
        if self.batch_invariant and self.fused_gemm:
            raise ValueError(
                "fused_gemm=True is not batch-invariant (its vocabulary split follows the number of rows): "
                "use one of fused_gemm and batch_invariant"
            )
        if torch.compiler.is_compiling():  # values are symbolic here: checked where the op runs
            return
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be positive and finite, got {self.temperature!r}")
        if cap is not None and (not math.isfinite(cap) or cap <= 0):
            raise ValueError(f"logit_softcap must be positive and finite, got {cap!r}")


@dataclass(frozen=True)
class Head:
    """A checked LM head (weight ``[V_local, H]``, bias) and, vocab-parallel, this rank's shard."""

    weight: Tensor
    bias: Tensor | None
    shard: VocabShard | None

    @property
    def vocab(self) -> int:
        """The global vocabulary size (what target ids are checked against)."""
        return self.shard.vocab if self.shard is not None else self.weight.shape[0]

    def local_targets(self, targets: Tensor) -> Tensor:
        """Global ids -> ids in this rank's rows (other shards' tokens fall outside [0, V_local))."""
        return targets.long() - (self.shard.start if self.shard is not None else 0)

    def plan(
        self,
        op: str,
        backend: str,
        rows: int,
        dtype: torch.dtype,
        device: torch.device,
        chunk_size: int | None,
        batch_invariant: bool = False,
        softcap: bool = False,
    ) -> tuple[str, ChunkOps, int, int | None]:
        """(backend name, its chunk ops, rows per tile, rows every logits GEMM has or None), the same
        tiles on every rank of a shard group.

        ``batch_invariant``: the logits of a tile are GEMMs of exactly :data:`INVARIANT_ROWS` rows each
        (tiles a multiple of it, the last one padded), whatever ``chunk_size`` and the number of tokens.
        ``softcap``: the tiles are soft-capped, which keeps one more fp32 [C, V] buffer (d cap / d logit)."""
        name = backends.resolve(backend, device, op)
        ops = backends.chunk_ops(name)
        temps = ops.fp32_temps + (1 if softcap else 0)
        chunk = resolve_chunk_size(chunk_size, rows, self.weight.shape[0], dtype, device, temps)
        chunk = shared_chunk_size(chunk, self.shard, device)
        if batch_invariant:
            return name, ops, max(INVARIANT_ROWS, chunk // INVARIANT_ROWS * INVARIANT_ROWS), INVARIANT_ROWS
        return name, ops, chunk, None


def open_head(
    hidden: Tensor, weight: object, bias: object, process_group: object | None, vocab_start: int | None
) -> Head:
    """Check hidden/weight/bias and agree on the vocab shard layout (a collective with a process group)."""
    weight, bias = check_lm_head(hidden, weight, bias)
    if process_group is None:
        if vocab_start is not None:
            raise ValueError("vocab_start is only meaningful with process_group (a vocab-parallel head)")
        return Head(weight, bias, None)
    return Head(weight, bias, make_shard(process_group, weight.shape[0], hidden.device, vocab_start))


# ---- grpo_loss


def plan_loss(call: LossCall) -> tuple[Tensor, Tensor, Tensor | None, LossPlan]:
    """Validate once, then shard, resolve the backend and the tile size: (hidden rows the loss reads,
    weight, bias, the plan) for :func:`run_loss_plan`.

    One host read for the whole set-up: the input value checks, the number of unmasked tokens (dropped
    before the GEMMs) and of tokens whose advantages give them a gradient (the others get their
    statistics only), all in one transfer."""
    cfg = call.config
    group = None if call.sequence_group is None else open_sequence_group(call.sequence_group)
    reads = ValueChecks()
    try:
        head = open_head(call.hidden, call.weight, call.bias, call.process_group, call.vocab_start)
        inputs, weight, bias = validate_loss_inputs(
            call.hidden,
            head.weight,
            call.targets,
            call.mask,
            call.advantages,
            call.old_logp,
            call.ref_logp,
            head.bias,
            cfg,
            call.num_items_in_batch,
            call.seq_ids,
            vocab=head.vocab,
            sampling_logp=call.sampling_logp,
            importance_sampling_ratio=call.importance_sampling_ratio,
            checks=reads,
        )
    except Exception:
        if group is not None:  # the group's other ranks learn it in the collective they wait in
            device = call.hidden.device if isinstance(call.hidden, Tensor) else torch.device("cpu")
            agree(group, True, None, device)
        raise
    num_seqs = inputs.advantages.shape[0]
    seq_len = segment_sum(inputs.mask, inputs.seq_ids, num_seqs)
    token_adv = inputs.token_advantages
    full = TokenBatch(
        seq_ids=inputs.seq_ids,
        mask=inputs.mask,
        adv=inputs.advantages[inputs.seq_ids] if token_adv is None else token_adv,
        old_logp=inputs.old_logp,
        ref_logp=inputs.ref_logp,
        seq_adv=inputs.advantages,
        seq_len=seq_len,
        items=seq_len.sum() if inputs.num_items is None else inputs.num_items.to(seq_len),
        token_adv=token_adv is not None,
        sampling_logp=inputs.sampling_logp,
        is_ratio=inputs.is_ratio,
        group=group,
    )
    unmasked = inputs.mask != 0
    kept_at = reads.count(unmasked.sum())
    # Rows the advantages leave without a gradient (a two-pass objective's clipped sequences are known
    # only after its log-prob pass: not here). None: every unmasked row has one.
    zero = zero_gradient_rows(full, cfg)
    live_at = reads.count((unmasked & ~zero).sum()) if zero is not None else None
    agreed_at: list[int] = []
    if group is not None:  # whether every rank's inputs passed and are alike, read with the checks
        given = (inputs.old_logp, inputs.ref_logp, inputs.sampling_logp, inputs.is_ratio, inputs.num_items)
        shared = [num_seqs, *(int(x is not None) for x in given), int(token_adv is not None)]
        bad = reads.any_bad()
        agreed_at = [
            reads.count(x) for x in agree(group, bad if bad is not None else False, shared, seq_len.device)
        ]
    counts = reads.run()  # the call's one host read: raises on bad input before any kernel on the head
    if group is not None:
        check_agreement([counts[i] for i in agreed_at])
        group.all_reduce_(seq_len)  # the whole sequences' token counts: every denominator of the loss
        if inputs.num_items is None:
            full = dataclasses.replace(full, items=seq_len.sum())
    settle_ready()  # earlier calls' deferred finiteness checks: their flags are on the host after the read
    kept = counts[kept_at]

    # Masked tokens never reach the loss: drop them before the GEMMs (their hidden grad stays 0).
    n = inputs.mask.shape[0]
    compact = kept < n
    keep = torch.argsort((~unmasked).to(torch.int8), stable=True)[:kept] if compact else None
    batch = full.select(keep) if compact else full
    h = inputs.hidden.index_select(0, keep) if compact else inputs.hidden
    targets = inputs.targets.index_select(0, keep) if compact else inputs.targets
    _, ops, chunk, invariant_rows = head.plan(
        "grpo_loss",
        call.backend,
        h.shape[0],
        h.dtype,
        h.device,
        call.chunk_size,
        call.batch_invariant,
        softcap=cfg.logit_softcap is not None,
    )
    targets = head.local_targets(targets)
    check = None if cfg.logit_softcap is not None else finite_result_check(h, weight, call.hidden, keep)
    gather = call.entropy_gather
    if gather is None and group is not None:  # the quantile over the whole sequences' tokens
        gather = group.gather
    live = counts[live_at] if live_at is not None else None
    plan = LossPlan(targets, batch, cfg, ops, chunk, head.shard, invariant_rows, keep, gather, check, live)
    return h, weight, bias, plan


def run_loss_plan(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, plan: LossPlan
) -> tuple[Tensor, dict[str, Tensor]]:
    """Run what :func:`plan_loss` set up (benchmarks swap ``plan.ops`` between the two)."""
    loss, metric_vec = FusedGRPOLoss.apply(hidden, weight, bias, plan)
    return loss, dict(zip(metric_names(plan.cfg), metric_vec.unbind(0), strict=True))


def run_loss(call: LossCall) -> tuple[Tensor, dict[str, Tensor]]:
    """``grpo_loss`` in eager mode."""
    return run_loss_plan(*plan_loss(call))


# ---- selective_logprobs


def plan_logprobs(
    call: LogprobCall, value_checks: bool = True
) -> tuple[Tensor, Head, Tensor, LogprobPlan | None]:
    """Validate, then shard and resolve the backend and tile size: (hidden as ``[N, H]``, the head, the
    checked targets, the plan; None for ``fused_gemm``). ``value_checks=False`` skips the checks of tensor
    values (for a second call on inputs already checked: they cost a device-to-host transfer)."""
    hidden = call.hidden
    head = open_head(hidden, call.weight, call.bias, call.process_group, call.vocab_start)
    check_same_device(hidden.device, targets=check_tensor("targets", call.targets))
    checks = ValueChecks()  # one device-to-host transfer for all the value checks
    targets = check_targets(call.targets, hidden.shape[:-1], head.vocab, checks=checks)
    if call.logit_softcap is not None:  # the cap hides an inf from the result: check up front
        add_head_value_checks(checks, hidden, head.weight, head.bias)
    else:  # hidden and weight from the result (logprob_result_check), bias now
        add_bias_value_check(checks, head.bias)
    if value_checks:
        checks.run()
    settle_ready()  # earlier grpo_loss calls' deferred finiteness checks, at no synchronization
    flat = hidden.reshape(-1, hidden.shape[-1])
    if call.fused_gemm:
        return flat, head, targets, None
    _, ops, chunk, invariant_rows = head.plan(
        "selective_logprobs", call.backend, flat.shape[0], flat.dtype, flat.device, call.chunk_size,
        call.batch_invariant, softcap=call.logit_softcap is not None,
    )  # fmt: skip
    local = head.local_targets(targets.reshape(-1))
    cap = None if call.logit_softcap is None else float(call.logit_softcap)
    plan = LogprobPlan(local, float(call.temperature), ops, chunk, head.shard, invariant_rows, cap)
    return flat, head, targets, plan


def logprob_result_check(call: LogprobCall, flat: Tensor, head: Head, logp: Tensor, entropy: Tensor) -> None:
    """NaN or inf in hidden or the LM head, found from the log-probs (see ``finite_result_check``); with a
    soft cap they were checked up front."""
    if call.logit_softcap is None:
        finite_result_check(flat, head.weight)(logp, entropy)


def fused_gemm_logprobs(
    flat: Tensor, head: Head, targets: Tensor, temperature: float, backend: str
) -> tuple[Tensor, Tensor]:
    """The ``fused_gemm=True`` path: checks what it cannot do, then the Triton fused kernel."""
    if backend not in ("auto", "triton"):
        raise ValueError(
            f"fused_gemm=True is a Triton kernel: backend must be 'auto' or 'triton', got {backend!r}"
        )
    if head.shard is not None:
        raise ValueError("fused_gemm=True does not support a vocab-parallel head (process_group)")
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (flat, head.weight, head.bias)
    ):
        raise ValueError(
            "fused_gemm=True computes no gradient: call it under torch.no_grad() or on tensors that do not "
            "require grad (old/reference log-probs)"
        )
    backends.resolve("triton", flat.device, "selective_logprobs")  # raises, naming why, when it cannot run
    from ..backends.triton_ops import triton_selective_logprobs

    return triton_selective_logprobs(flat, head.weight, head.bias, targets, temperature)


def run_logprobs(call: LogprobCall) -> Tensor | tuple[Tensor, Tensor]:
    """``selective_logprobs`` in eager mode."""
    flat, head, targets, plan = plan_logprobs(call)
    if plan is None:
        logp, entropy = fused_gemm_logprobs(flat, head, targets, float(call.temperature), call.backend)
    else:
        logp, entropy = FusedLogprobs.apply(flat, head.weight, head.bias, plan)
    logprob_result_check(call, flat, head, logp, entropy)
    logp = logp.reshape(targets.shape)
    return (logp, entropy.reshape(targets.shape)) if call.return_entropy else logp
