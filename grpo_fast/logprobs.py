"""Public ``selective_logprobs``: per-token log-probs (and entropy) from hidden states and the LM head."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import backends
from .engine.chunk_loop import FusedLogprobs, LogprobPlan
from .engine.setup import Head, check_batch_invariant, open_head
from .engine.validation import (
    ValueChecks,
    add_head_value_checks,
    check_same_device,
    check_targets,
    check_temperature,
    check_tensor,
)


def selective_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    *,
    backend: str = "auto",
    chunk_size: int | None = None,
    process_group: object | None = None,
    vocab_start: int | None = None,
    fused_gemm: bool = False,
    batch_invariant: bool = False,
    logit_softcap: float | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """``log_softmax((hidden @ weight.T + bias) / temperature)[targets]`` without the ``[N, V]`` logits.

    hidden ``[..., H]``, weight ``[V, H]``, targets ``[...]`` ids in ``[0, V)``. Returns fp32 log-probs of
    targets' shape, and the fp32 entropy too with ``return_entropy=True``. Gradients flow to hidden,
    weight and bias through the log-probs (recomputed chunk by chunk in backward); the entropy is a metric
    and carries no gradient.

    ``fused_gemm=True`` (Triton backend, no gradient, no process group) runs one kernel that does the GEMM
    and the online logsumexp together and never writes a logits tile, instead of cuBLAS tiles plus the
    row statistics kernel; the default keeps the tile path until a GPU measurement says the fused kernel
    is faster (the GPU benchmark times both).

    ``batch_invariant=True``: every logits GEMM has one shape (128 rows, the last one padded), so a
    token's log-prob and entropy are bitwise the same whatever batch, padding, packing or ``chunk_size``
    it comes with, and the same as inside ``grpo_loss(..., batch_invariant=True)`` (not with
    ``fused_gemm``: its vocabulary split depends on the number of rows).

    With ``process_group``, weight/bias are this rank's vocabulary shard (see ``grpo_loss``).

    ``logit_softcap``: the logits are ``cap * tanh(logits / cap)`` before the temperature (Gemma 2's
    ``final_logit_softcapping``), in every backend's tile pass (not with ``fused_gemm``).
    """
    if torch.compiler.is_compiling():  # one opaque op in the graph: see engine/compiled.py
        from .engine import compiled

        return compiled.selective_logprobs(
            hidden, weight, targets, bias, temperature, return_entropy, backend=backend,
            chunk_size=chunk_size, process_group=process_group, vocab_start=vocab_start,
            fused_gemm=fused_gemm, batch_invariant=batch_invariant, logit_softcap=logit_softcap,
        )  # fmt: skip
    flat, head, targets, plan = plan_logprobs(
        hidden, weight, targets, bias, temperature, backend=backend, chunk_size=chunk_size,
        process_group=process_group, vocab_start=vocab_start, fused_gemm=fused_gemm,
        batch_invariant=batch_invariant, logit_softcap=logit_softcap,
    )  # fmt: skip
    if plan is None:
        logp, entropy = _fused_gemm_logprobs(flat, head, targets, temperature, backend)
    else:
        logp, entropy = FusedLogprobs.apply(flat, head.weight, head.bias, plan)
    logp = logp.reshape(targets.shape)
    return (logp, entropy.reshape(targets.shape)) if return_entropy else logp


def plan_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    *,
    backend: str = "auto",
    chunk_size: int | None = None,
    process_group: object | None = None,
    vocab_start: int | None = None,
    fused_gemm: bool = False,
    batch_invariant: bool = False,
    value_checks: bool = True,
    logit_softcap: float | None = None,
) -> tuple[Tensor, Head, Tensor, LogprobPlan | None]:
    """Validate, then shard and resolve the backend and tile size: (hidden as ``[N, H]``, the head, the
    checked targets, the plan; None for ``fused_gemm``). ``value_checks=False`` skips the checks of tensor
    values (for a second call on inputs already checked: they cost a device-to-host transfer)."""
    head = open_head(hidden, weight, bias, process_group, vocab_start)
    temperature = check_temperature(temperature)
    check_same_device(hidden.device, targets=check_tensor("targets", targets))
    checks = ValueChecks()  # one device-to-host transfer for all the value checks
    targets = check_targets(targets, hidden.shape[:-1], head.vocab, checks=checks)
    add_head_value_checks(checks, hidden, head.weight, head.bias)
    if value_checks:
        checks.run()
    if not isinstance(fused_gemm, bool):
        raise TypeError(f"fused_gemm must be a bool, got {type(fused_gemm).__name__}")
    if check_batch_invariant(batch_invariant) and fused_gemm:
        raise ValueError(
            "fused_gemm=True is not batch-invariant (its vocabulary split follows the number of rows): "
            "use one of fused_gemm and batch_invariant"
        )
    if logit_softcap is not None:
        if isinstance(logit_softcap, bool) or not isinstance(logit_softcap, (int, float)):
            raise TypeError(f"logit_softcap must be a float or None, got {type(logit_softcap).__name__}")
        if not math.isfinite(logit_softcap) or logit_softcap <= 0:
            raise ValueError(f"logit_softcap must be positive and finite, got {logit_softcap!r}")
        if fused_gemm:
            raise ValueError(
                "fused_gemm=True does not soft-cap the logits: use the tile path for logit_softcap"
            )
        logit_softcap = float(logit_softcap)
    flat = hidden.reshape(-1, hidden.shape[-1])
    if fused_gemm:
        return flat, head, targets, None
    _, ops, chunk, pad = head.plan(
        "selective_logprobs", backend, flat.shape[0], flat.dtype, flat.device, chunk_size, batch_invariant,
        softcap=logit_softcap is not None,
    )  # fmt: skip
    local = head.local_targets(targets.reshape(-1))
    return flat, head, targets, LogprobPlan(local, temperature, ops, chunk, head.shard, pad, logit_softcap)


def _fused_gemm_logprobs(
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
    from .backends.triton_ops import triton_selective_logprobs

    return triton_selective_logprobs(flat, head.weight, head.bias, targets, temperature)
