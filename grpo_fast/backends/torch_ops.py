"""The chunk pass in plain torch ops (:class:`TorchChunkOps`): the CPU default and the fallback everywhere."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Coefficients


def _scaled_fp32(logits: Tensor, temperature: float, in_place: bool) -> Tensor:
    """``logits / T`` in (at least) fp32; ``in_place`` may reuse an fp32 tile (grad_ owns it, stats not)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    if in_place or logits.dtype != dtype:
        z = logits.to(dtype)
        return z.div_(temperature) if temperature != 1.0 else z
    return logits / temperature


def _log_softmax_(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(lse, log p, p) of the rows of ``z``, log p over ``z``. log p = (z - m) - log s as log_softmax
    computes it, not z - lse: lse is rounded at its own magnitude, an extra rounding per token (1.3x
    log_softmax's error, summed over a sequence by GSPO and VESPO). p = exp(z - m) / s."""
    m = z.amax(dim=-1, keepdim=True)
    m.masked_fill_(m.abs() == float("inf"), 0.0)  # a row of -inf (or an inf logit): as torch.logsumexp
    shifted = z.sub_(m)
    probs = torch.exp(shifted)
    s = probs.sum(-1, keepdim=True)
    log_s = torch.log(s)
    lse = (m.double() + log_s.double()).squeeze(1)  # unrounded (see base.py); fp64 z: the same values
    return lse, shifted.sub_(log_s), probs.div_(s)


def _entropy_(log_probs: Tensor, probs: Tensor) -> Tensor:
    # H = -sum(p * log p): no cancellation between two large terms. The product overwrites log_probs (a
    # new [C, V] buffer costs more than the product itself: page faults); a plain sum, not a batched dot
    # (its blocked fp32 accumulation was measurably less accurate than PyTorch's own at V = 4099). A -inf
    # logit (a banned token) has p = 0 and log p = -inf: nansum drops its 0 * -inf (a NaN logit still
    # shows, in the logsumexp).
    return -log_probs.mul_(probs).nansum(-1)


def _owned(targets: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    """Targets clamped into the tile and whether each is really in it (vocab-parallel shards)."""
    return targets.clamp(0, vocab - 1), (targets >= 0) & (targets < vocab)


def _entropy_coef_(log_probs: Tensor, g: Tensor, ent_coef: Tensor, entropy: Tensor) -> Tensor:
    """g + e (log p + H) per element, over ``log_probs``; log p clamped so that a -inf logit (p = 0) gives
    0 in dlogits, not 0 * inf = NaN."""
    dtype = log_probs.dtype
    coef = log_probs.clamp_(min=torch.finfo(dtype).min).add_(entropy.to(dtype).unsqueeze(1))
    return coef.mul_(ent_coef.to(dtype).unsqueeze(1)).add_(g.to(dtype).unsqueeze(1))


def _write_dlogits(
    logits: Tensor, probs: Tensor, targets: Tensor, g: Tensor, temperature: float, coef: Tensor | None
) -> Tensor:
    """dLoss/dlogits = g onehot / T - coef p / T over ``probs`` (coef: g, or the entropy term's)."""
    dtype = probs.dtype
    scale = (g / temperature).to(dtype).unsqueeze(1)
    dz = probs.mul_(-scale) if coef is None else probs.mul_(coef).mul_(-1.0 / temperature)
    index, owned = _owned(targets, dz.shape[1])
    dz.scatter_add_(1, index.unsqueeze(1), scale * owned.unsqueeze(1))
    return dz if dz.dtype == logits.dtype else logits.copy_(dz)


class TorchChunkOps:
    """The chunk pass in plain torch ops: the CPU default and the fallback everywhere."""

    name = "torch"
    # fp32 [C, V] temporaries of the worst pass (scaled logits, probabilities, logsumexp scratch).
    fp32_temps = 3

    def stats(self, logits: Tensor, targets: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
        z = _scaled_fp32(logits, temperature, in_place=False)  # the tile is kept for grad_
        lse, log_probs, probs = _log_softmax_(z)
        logp = log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)
        return lse, logp, _entropy_(log_probs, probs)

    def stats_(self, logits: Tensor, targets: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
        z = _scaled_fp32(logits, temperature, in_place=True)  # no [C, V] copy: the tile is not kept
        lse, log_probs, probs = _log_softmax_(z)
        logp = log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)
        return lse, logp, _entropy_(log_probs, probs)

    def tile_pass_(
        self, logits: Tensor, targets: Tensor, temperature: float, coefficients: Coefficients
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        # One set of probabilities for the statistics and dlogits (the split stats + grad_ computes them
        # twice); the two halves around the caller's coefficients are methods, so that a subclass can
        # compile them (grpo_fast.benchmarking.baselines).
        lse, logp, entropy, probs, scratch = self.tile_stats_(logits, targets, temperature)
        g, e = coefficients(logp, entropy)
        dz = self.tile_grad_(logits, probs, scratch, targets, g, e, entropy, temperature)
        return lse, logp, entropy, dz

    def tile_stats_(
        self, logits: Tensor, targets: Tensor, temperature: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(lse, logp, entropy, p, a spent [C, V] buffer): the tile is this pass's, so an fp32 one is
        scaled in place."""
        z = _scaled_fp32(logits, temperature, in_place=True)
        lse, log_probs, probs = _log_softmax_(z)
        logp = log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)
        entropy = _entropy_(log_probs, probs)  # log_probs is gone now: the buffer is scratch
        return lse, logp, entropy, probs, log_probs

    def tile_grad_(
        self,
        logits: Tensor,
        probs: Tensor,
        scratch: Tensor,
        targets: Tensor,
        g: Tensor,
        e: Tensor | None,
        entropy: Tensor,
        temperature: float,
    ) -> Tensor:
        """dlogits over ``probs`` (or the tile); the entropy term (rare) recomputes log p into scratch."""
        coef = None if e is None else _entropy_coef_(torch.log(probs, out=scratch), g, e, entropy)
        return _write_dlogits(logits, probs, targets, g, temperature, coef)

    def partial_stats(self, logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
        z = _scaled_fp32(logits, temperature, in_place=False)
        m = z.amax(dim=-1)
        shifted = z.sub_(m.unsqueeze(1))
        e = torch.exp(shifted)
        s = e.sum(-1)
        index, owned = _owned(targets, z.shape[1])
        t = (shifted.gather(1, index.unsqueeze(1)).squeeze(1) + m) * owned
        u = shifted.mul_(e).sum(-1)  # in place, after the gather: no second [C, V] buffer
        return torch.stack([m, s, u, t]).float()

    def grad_(
        self,
        logits: Tensor,
        targets: Tensor,
        lse: Tensor,
        g: Tensor,
        temperature: float,
        ent_coef: Tensor | None = None,
        entropy: Tensor | None = None,
    ) -> Tensor:
        z = _scaled_fp32(logits, temperature, in_place=True)
        # lse (fp64) as two numbers of z's dtype, log p = (z - hi) - lo: no rounding of lse in p.
        hi = lse.to(z.dtype)
        log_probs = z.sub_(hi.unsqueeze(1))
        if lse.dtype != z.dtype:
            log_probs.sub_((lse - hi.to(lse.dtype)).nan_to_num_(0.0, 0.0, 0.0).to(z.dtype).unsqueeze(1))
        coef = None if ent_coef is None else _entropy_coef_(log_probs.clone(), g, ent_coef, entropy)
        return _write_dlogits(logits, log_probs.exp_(), targets, g, temperature, coef)  # p in the tile


def torch_group_advantages(
    rewards2d: Tensor, weights: Tensor, group_size: int, scale: str, eps: float
) -> Tensor:
    """Advantages of validated rewards ``[M, R]``: the reference's torch ops, in fp64 where the device has it.

    No chunking to win here: the plain torch version is already one vectorized pass. fp32 would lose the
    differences between large rewards, which the compiled kernels keep."""
    from .. import reference

    wide = torch.float64 if rewards2d.device.type in ("cpu", "cuda") else torch.float32
    return reference.group_advantages(rewards2d, group_size, scale, eps, weights, compute_dtype=wide)
