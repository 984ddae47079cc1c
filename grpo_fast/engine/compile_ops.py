"""``grpo_loss`` and ``selective_logprobs`` under ``torch.compile``: each is one opaque custom op.

The eager functions branch on tensor values (input checks, dropping masked tokens, chunk sizes from free
memory) and run hand-written kernels, none of which Dynamo can trace. Under ``torch.compile`` the public
functions call these ops instead (``torch.compiler.is_compiling()``): the graph holds one node per call,
``fullgraph=True`` works, and at run time the op runs the eager code, every value check included. A fake
(meta) implementation gives the traced shapes and dtypes; ``register_autograd`` gives the backward.

- loss: the fused pass computes the gradients in forward anyway, so the op returns them next to the
  loss and its backward scales them by the incoming gradient, as the eager autograd Function does.
- log-probs: the op also returns the rows' logsumexps; its backward is a second op that makes the one
  gradient pass over the tiles from them and the entropies, as the eager backward does, taking the
  entropy's incoming gradient (None when the entropy has none: no entropy term then).

Each op's schema spells its arguments one by one (a custom op takes tensors and scalars, not a call
record); everything else passes the record of :mod:`.plan`, so the op bodies run the same planning code
as the eager path.

No ``from __future__ import annotations`` here: ``torch.library.custom_op`` reads the annotations, and
``Optional[...]``, which every torch version's schema inference knows.
"""
# ruff: noqa: UP045

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from typing import Optional

import torch
from torch import Tensor

from ..config import GRPOConfig
from .chunk_loop import logprob_grads, logprob_pass, run_grpo
from .objective import metric_names
from .plan import (
    LogprobCall,
    LossCall,
    fused_gemm_logprobs,
    logprob_result_check,
    plan_logprobs,
    plan_loss,
)

_NS = "grpo_fast_compiled"
_EMPTY = (0,)  # the stand-in for "no tensor" in an op's outputs (custom ops cannot return None)


@torch.compiler.assume_constant_result
def _config_json(cfg: GRPOConfig) -> str:
    """The config as the op's string argument (a trace-time constant)."""
    return json.dumps(dataclasses.asdict(cfg))


def _config(text: str) -> GRPOConfig:
    return GRPOConfig(**json.loads(text))


def _no_process_group(process_group: object, vocab_start: object) -> None:
    if process_group is not None or vocab_start is not None:
        raise ValueError(
            "process_group/vocab_start (vocab-parallel head) are not supported under torch.compile: "
            "call grpo_fast outside the compiled region (torch.compiler.disable) for a sharded head"
        )


# Private torch API the op bodies rely on, checked on first use so that a torch without it gives one clear
# error instead of an AttributeError from inside a compiled graph.
_PRIVATE_DISPATCH_API = (
    "_ForceDispatchKeyGuard",
    "_dispatch_tls_local_exclude_set",
    "_dispatch_tls_local_include_set",
    "DispatchKey",
)


@contextlib.contextmanager
def _autograd_inside_op() -> Iterator[None]:
    """Autograd dispatch back on inside an op's body, grad mode off, as in an autograd Function's forward:
    the engine differentiates the per-token objective with autograd under its own enable_grad
    (engine/objective.py), but a custom op runs below the autograd dispatch keys."""
    missing = [name for name in _PRIVATE_DISPATCH_API if not hasattr(torch._C, name)]
    if missing:
        raise RuntimeError(
            f"grpo_fast under torch.compile needs torch's private dispatch API ({', '.join(missing)}), which "
            f"torch {torch.__version__} lacks: call grpo_fast outside the compiled region "
            "(torch.compiler.disable), or use a torch release this grpo_fast is tested with (see the README)"
        )
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor", "ADInplaceOrView"):
        exclude = exclude.remove(getattr(torch._C.DispatchKey, key))
    include = torch._C._dispatch_tls_local_include_set()
    with torch._C._ForceDispatchKeyGuard(include, exclude), torch.no_grad():
        yield


def _needs(*tensors: Optional[Tensor]) -> list[bool]:
    on = torch.is_grad_enabled()
    return [on and t is not None and t.requires_grad for t in tensors]


def _or_empty(x: Optional[Tensor], like: Tensor) -> Tensor:
    return x if x is not None else like.new_empty(_EMPTY)


# ---- grpo_loss


@torch.library.custom_op(f"{_NS}::grpo_loss", mutates_args=())
def _loss_op(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    mask: Tensor,
    advantages: Tensor,
    old_logp: Optional[Tensor],
    ref_logp: Optional[Tensor],
    bias: Optional[Tensor],
    num_items_tensor: Optional[Tensor],
    num_items_number: Optional[float],
    seq_ids: Optional[Tensor],
    sampling_logp: Optional[Tensor],
    importance_sampling_ratio: Optional[Tensor],
    config: str,
    backend: str,
    chunk_size: Optional[int],
    batch_invariant: bool,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    num_items = num_items_tensor if num_items_tensor is not None else num_items_number
    with _autograd_inside_op():
        hidden, weight = hidden.detach(), weight.detach()
        bias = bias.detach() if bias is not None else None
        call = LossCall(
            hidden, weight, targets, mask, advantages, old_logp, ref_logp, bias, _config(config), num_items,
            seq_ids, sampling_logp, importance_sampling_ratio, backend=backend, chunk_size=chunk_size,
            batch_invariant=batch_invariant,
        )  # fmt: skip
        h, w, b, plan = plan_loss(call)
        loss, metrics, (gh, gw, gb), _ = run_grpo(h, w, b, plan, tuple(needs))  # checked by the next call
    if gh is not None:  # back to hidden's shape: masked rows were dropped, their gradient is 0
        if plan.rows is not None:
            gh = gh.new_zeros(hidden.numel() // hidden.shape[-1], hidden.shape[-1]).index_copy_(
                0, plan.rows, gh
            )
        gh = gh.reshape(hidden.shape)
    metric_vec = torch.stack([metrics[k] for k in metric_names(call.config)])
    return loss, metric_vec, *(_or_empty(g, hidden) for g in (gh, gw, gb))


@_loss_op.register_fake
def _(hidden, weight, targets, mask, advantages, old_logp, ref_logp, bias, num_items_tensor,
      num_items_number, seq_ids, sampling_logp, importance_sampling_ratio, config, backend, chunk_size,
      batch_invariant, needs):  # fmt: skip
    loss = hidden.new_empty((), dtype=torch.float32)
    metrics = hidden.new_empty((len(metric_names(_config(config))),), dtype=torch.float32)
    grads = [
        torch.empty_like(x) if n and x is not None else hidden.new_empty(_EMPTY)
        for x, n in zip((hidden, weight, bias), needs, strict=True)
    ]
    return loss, metrics, *grads


def _loss_setup(ctx, inputs, output) -> None:
    needs = inputs[-1]
    ctx.needs = needs
    ctx.save_for_backward(*output[2:])


def _loss_backward(ctx, grad_loss, _grad_metrics, _gh, _gw, _gb):
    saved = zip(ctx.saved_tensors, ctx.needs, strict=True)
    gh, gw, gb = (g * grad_loss.to(g.dtype) if n else None for g, n in saved)
    # one per input of the op: hidden, weight, 5 data tensors, bias, then 10 more without a gradient
    return (gh, gw, *[None] * 5, gb, *[None] * 10)


torch.library.register_autograd(f"{_NS}::grpo_loss", _loss_backward, setup_context=_loss_setup)


def grpo_loss(call: LossCall) -> tuple[Tensor, dict[str, Tensor]]:
    """``gf.grpo_loss`` as one traced op (what the public function calls under ``torch.compile``)."""
    _no_process_group(call.process_group, call.vocab_start)
    if call.sequence_group is not None:
        raise ValueError(
            "sequence_group (sequence parallelism) is not supported under torch.compile: call grpo_fast "
            "outside the compiled region (torch.compiler.disable) for it"
        )
    if call.entropy_gather is not None:
        raise ValueError(
            "entropy_gather (a cross-process entropy quantile) is not supported under torch.compile: call "
            "grpo_fast outside the compiled region (torch.compiler.disable) for it"
        )
    cfg = call.config if call.config is not None else GRPOConfig()
    items = call.num_items_in_batch
    items_t = items if isinstance(items, Tensor) else None
    items_n = None if items_t is not None or items is None else float(items)
    loss, metric_vec, *_ = _loss_op(
        call.hidden, call.weight, call.targets, call.mask, call.advantages, call.old_logp, call.ref_logp,
        call.bias, items_t, items_n, call.seq_ids, call.sampling_logp, call.importance_sampling_ratio,
        _config_json(cfg), call.backend, call.chunk_size, call.batch_invariant,
        _needs(call.hidden, call.weight, call.bias),
    )  # fmt: skip
    return loss, dict(zip(metric_names(cfg), metric_vec.unbind(0), strict=True))


# ---- selective_logprobs


def _call(
    hidden, weight, targets, bias, temperature, backend, chunk_size, fused_gemm, batch_invariant, softcap
) -> LogprobCall:
    return LogprobCall(
        hidden, weight, targets, bias, temperature, backend=backend, chunk_size=chunk_size,
        fused_gemm=fused_gemm, batch_invariant=batch_invariant, logit_softcap=softcap,
    )  # fmt: skip


@torch.library.custom_op(f"{_NS}::selective_logprobs", mutates_args=())
def _logprobs_op(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Optional[Tensor],
    temperature: float,
    backend: str,
    chunk_size: Optional[int],
    fused_gemm: bool,
    batch_invariant: bool,
    logit_softcap: Optional[float],
) -> tuple[Tensor, Tensor, Tensor]:
    call = _call(
        hidden, weight, targets, bias, temperature, backend, chunk_size, fused_gemm, batch_invariant,
        logit_softcap,
    )  # fmt: skip
    flat, head, targets, plan = plan_logprobs(call)
    if plan is None:
        logp, entropy = fused_gemm_logprobs(flat, head, targets, temperature, backend)
        lse = flat.new_empty(_EMPTY, dtype=torch.float64)
    else:
        lse, logp, entropy = logprob_pass(
            flat, head.weight, head.bias, plan.targets, plan.temperature, plan.ops, plan.chunk,
            None, plan.invariant_rows, plan.softcap,
        )  # fmt: skip
    logprob_result_check(call, flat, head, logp, entropy)
    # Outputs may not alias each other: the pass returns rows of one buffer (O(N) copies).
    return logp.reshape(targets.shape).clone(), entropy.reshape(targets.shape).clone(), lse.clone()


@_logprobs_op.register_fake
def _(hidden, weight, targets, bias, temperature, backend, chunk_size, fused_gemm, batch_invariant, softcap):
    out = targets.new_empty(targets.shape, dtype=torch.float32)
    rows = 0 if fused_gemm else targets.numel()
    return out, torch.empty_like(out), hidden.new_empty((rows,), dtype=torch.float64)


@torch.library.custom_op(f"{_NS}::selective_logprobs_backward", mutates_args=())
def _logprobs_backward_op(
    grad_logp: Optional[Tensor],
    grad_entropy: Optional[Tensor],
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Optional[Tensor],
    lse: Tensor,
    entropy: Tensor,
    temperature: float,
    backend: str,
    chunk_size: Optional[int],
    batch_invariant: bool,
    logit_softcap: Optional[float],
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    call = _call(
        hidden, weight, targets, bias, temperature, backend, chunk_size, False, batch_invariant, logit_softcap
    )
    flat, head, _, plan = plan_logprobs(call, value_checks=False)
    flat_grads = tuple(g.reshape(-1) if g is not None else None for g in (grad_logp, grad_entropy))
    stats = (lse, entropy.reshape(-1))
    grads = logprob_grads(flat, head.weight, head.bias, stats, flat_grads, plan, tuple(needs))
    gh = grads[0].reshape(hidden.shape) if grads[0] is not None else None
    return tuple(_or_empty(g, hidden) for g in (gh, *grads[1:]))


@_logprobs_backward_op.register_fake
def _(
    grad_logp, grad_entropy, hidden, weight, targets, bias, lse, entropy, temperature, backend, chunk_size,
    batch_invariant, softcap, needs,
):  # fmt: skip
    return tuple(
        torch.empty_like(x) if n and x is not None else hidden.new_empty(_EMPTY)
        for x, n in zip((hidden, weight, bias), needs, strict=True)
    )


def _logprobs_setup(ctx, inputs, output) -> None:
    hidden, weight, targets, bias, temperature, backend, chunk_size, fused_gemm, batch_invariant, cap = inputs
    ctx.args = (temperature, backend, chunk_size, batch_invariant, cap)
    ctx.has_bias = bias is not None
    # An output nothing differentiates gets None, not zeros: no entropy term when the entropy is unused.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(hidden, weight, targets, bias, output[2], output[1])


def _logprobs_backward(ctx, grad_logp, grad_entropy, _grad_lse):
    hidden, weight, targets, bias, lse, entropy = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:2]] + [ctx.has_bias and bool(ctx.needs_input_grad[3])]
    gh, gw, gb = _logprobs_backward_op(
        grad_logp, grad_entropy, hidden, weight, targets, bias, lse, entropy, *ctx.args, needs
    )
    keep = lambda g, n: g if n else None  # noqa: E731
    return keep(gh, needs[0]), keep(gw, needs[1]), None, keep(gb, needs[2]), *[None] * 6


torch.library.register_autograd(
    f"{_NS}::selective_logprobs", _logprobs_backward, setup_context=_logprobs_setup
)


def selective_logprobs(call: LogprobCall) -> object:
    """``gf.selective_logprobs`` as one traced op (what the public function calls under ``torch.compile``)."""
    _no_process_group(call.process_group, call.vocab_start)
    cap = call.logit_softcap
    logp, entropy, _ = _logprobs_op(
        call.hidden, call.weight, call.targets, call.bias, float(call.temperature), call.backend,
        call.chunk_size, call.fused_gemm, call.batch_invariant, None if cap is None else float(cap),
    )  # fmt: skip
    return (logp, entropy) if call.return_entropy else logp
