"""The native backend: the per-chunk pass in the compiled ops of ``grpo_fast._C`` (:class:`NativeChunkOps`).

The ops (``torch.ops.grpo_fast.chunk_stats``, ``chunk_partial_stats``, ``chunk_grad``, ``token_pass``,
``token_loss``) are registered in csrc/bindings.cpp, with a C++ kernel for CPU tensors and a CUDA kernel
for GPU tensors (when the extension was built with them); each writes into tensors given to it, which
these wrappers allocate. The chunk loop of :mod:`grpo_fast.fused` is shared with every other backend.

:func:`per_token_loss` is for callers that already hold per-token log-probs (TRL's
``_compute_loss``): TRL's per-token GRPO loss and its metrics in one op, differentiable in the log-probs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _native
from .chunk_ops import TorchChunkOps
from .config import CLIPPED_LOSS_TYPES, GRPOConfig
from .objective import loss_family

__all__ = ["NativeChunkOps", "op_terms", "per_token_loss", "token_loss_terms"]


def op_terms(cfg: GRPOConfig) -> dict:
    """The config's per-token hyper-parameters as the ops' keyword arguments (runtime values)."""
    return dict(
        family=loss_family(cfg),
        lo=1 - cfg.epsilon_low,
        hi=1 + cfg.eps_high,
        cispo_max=cfg.eps_high,
        delta=cfg.delta if cfg.loss_type in CLIPPED_LOSS_TYPES else None,  # only the clipped surrogate
        beta=float(cfg.beta),
        bias_correction_kl=bool(cfg.use_bias_correction_kl),
        sapo_tau_pos=float(cfg.sapo_temperature_pos),
        sapo_tau_neg=float(cfg.sapo_temperature_neg),
    )


def _vec(x: Tensor | None) -> Tensor | None:
    """An fp32 contiguous per-token vector (no copy when it already is one)."""
    return None if x is None else x.float().contiguous()


def _tile(logits: Tensor) -> Tensor:
    return logits if logits.shape[1] <= 1 or logits.stride(1) == 1 else logits.contiguous()


# Tile dtypes the compiled kernels take (fp32 math whatever the dtype).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class NativeChunkOps:
    """The chunk pass in the compiled ops; tiles fp32/bf16/fp16 with fp32 math, rows in any row stride.

    fp64 tiles (accuracy checks, tests) go to the plain torch ops instead, so they keep fp64 accuracy
    (their temporaries are then not counted in the tile size: fp64 is for small checks, not for speed).
    """

    name = "native"
    # No [C, V] temporaries (rows are walked in 8 KiB blocks): 4x the torch ops' rows for fp32 tiles under
    # the same budget, so fewer passes over the fp32 weight-gradient accumulator.
    fp32_temps = 0

    def __init__(self) -> None:
        _native.load()
        self._fp64 = TorchChunkOps()

    def stats(self, logits: Tensor, targets: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
        if logits.dtype not in KERNEL_DTYPES:
            return self._fp64.stats(logits, targets, temperature)
        logits = _tile(logits)
        out = torch.empty(3, logits.shape[0], dtype=torch.float32, device=logits.device)
        torch.ops.grpo_fast.chunk_stats(logits, targets.long().contiguous(), float(temperature), out)
        return out[0], out[1], out[2]

    def partial_stats(self, logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
        if logits.dtype not in KERNEL_DTYPES:
            return self._fp64.partial_stats(logits, targets, temperature)
        logits = _tile(logits)
        out = torch.empty(4, logits.shape[0], dtype=torch.float32, device=logits.device)
        torch.ops.grpo_fast.chunk_partial_stats(logits, targets.long().contiguous(), float(temperature), out)
        return out

    def grad_(self, logits: Tensor, targets: Tensor, lse: Tensor, g: Tensor, temperature: float) -> Tensor:
        if logits.dtype not in KERNEL_DTYPES:
            return self._fp64.grad_(logits, targets, lse, g, temperature)
        logits = _tile(logits)
        torch.ops.grpo_fast.chunk_grad(
            logits, targets.long().contiguous(), _vec(lse), _vec(g), float(temperature)
        )
        return logits

    def token_pass_(
        self,
        logits: Tensor,
        targets: Tensor,
        old_logp: Tensor | None,
        ref_logp: Tensor | None,
        adv: Tensor,
        w: Tensor,
        cfg: GRPOConfig,
    ) -> tuple[Tensor, Tensor, Tensor]:
        if logits.dtype not in KERNEL_DTYPES:
            return self._fp64.token_pass_(logits, targets, old_logp, ref_logp, adv, w, cfg)
        logits = _tile(logits)
        out = torch.empty(2, logits.shape[0], dtype=torch.float32, device=logits.device)
        torch.ops.grpo_fast.token_pass(
            logits,
            targets.long().contiguous(),
            _vec(old_logp),
            _vec(ref_logp) if cfg.beta != 0.0 else None,
            _vec(adv),
            _vec(w),
            out,
            temperature=float(cfg.temperature),
            **op_terms(cfg),
        )
        return out[0], out[1], logits


def token_loss_terms(
    logp: Tensor,
    adv: Tensor,
    cfg: GRPOConfig,
    old_logp: Tensor | None = None,
    ref_logp: Tensor | None = None,
    w: Tensor | None = None,
) -> Tensor:
    """fp32 ``[5, N]``: per-token loss, ``g = w * dloss/dlogp``, KL, clipped-low and clipped-high flags.

    All inputs are ``[N]`` (token-level ratios); ``w`` defaults to ones. No autograd: see
    :func:`per_token_loss`.
    """
    logp = _vec(logp.detach())
    out = torch.empty(5, logp.shape[0], dtype=torch.float32, device=logp.device)
    torch.ops.grpo_fast.token_loss(
        logp,
        _vec(old_logp),
        _vec(ref_logp) if cfg.beta != 0.0 else None,
        _vec(adv),
        _vec(w) if w is not None else torch.ones_like(logp),
        out,
        **op_terms(cfg),
    )
    return out


class _TokenLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, adv, old_logp, ref_logp, cfg):
        out = token_loss_terms(logp.reshape(-1), adv.reshape(-1), cfg, old_logp, ref_logp)
        ctx.save_for_backward(out[1])
        ctx.shape = logp.shape
        metrics = out[2:].reshape(3, *logp.shape)
        ctx.mark_non_differentiable(metrics)
        return out[0].reshape(logp.shape), metrics

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics):
        (dloss,) = ctx.saved_tensors
        grad = grad_loss.float() * dloss.reshape(ctx.shape)
        return grad, None, None, None, None


def per_token_loss(
    logp: Tensor,
    advantages: Tensor,
    config: GRPOConfig,
    old_logp: Tensor | None = None,
    ref_logp: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """TRL's per-token GRPO loss from per-token log-probs, in one native op; differentiable in ``logp``.

    ``logp`` ``[B, T]`` (or any shape), ``advantages`` ``[B]`` (one per sequence) or logp's shape;
    ``old_logp`` None means on-policy (ratio 1); ``ref_logp`` is needed when ``config.beta != 0``.
    Returns the unreduced, unmasked per-token loss (KL term included) and fp32 per-token metrics
    ``kl``, ``is_low_clipped`` and ``is_high_clipped`` (CISPO: its clip in ``is_high_clipped``).
    Token-level importance ratios only (GSPO's sequence level needs a whole sequence's log-probs).
    """
    if config.importance_sampling_level != "token":
        raise ValueError("per_token_loss supports importance_sampling_level='token' only")
    if advantages.dim() == logp.dim() - 1:
        advantages = advantages.unsqueeze(-1).expand_as(logp)
    for name, x in (("advantages", advantages), ("old_logp", old_logp), ("ref_logp", ref_logp)):
        if x is not None and x.shape != logp.shape:
            raise ValueError(f"{name} must have logp's shape {tuple(logp.shape)}, got {tuple(x.shape)}")
    flat = lambda x: None if x is None else x.detach().reshape(-1)  # noqa: E731
    loss, metrics = _TokenLoss.apply(logp, advantages.detach(), flat(old_logp), flat(ref_logp), config)
    return loss, dict(zip(("kl", "is_low_clipped", "is_high_clipped"), metrics.unbind(0), strict=True))
