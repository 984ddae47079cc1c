"""The per-chunk pass over one ``[C, V]`` logits tile: the interface every backend implements.

The chunk loop (:mod:`grpo_fast.fused`) runs the GEMMs and calls these on each tile of raw
logits ``hidden_chunk @ W^T + b``; a backend only supplies the row-wise softmax work:

- ``stats``: logsumexp, target log-prob and entropy of ``logits / T`` (fp32 [C] each);
- ``grad_``: given ``g_t = dLoss/dlogp_t``, ``dlogits = g_t * (onehot - softmax) / T`` in the tile's
  dtype, written in place where the backend can (the returned tensor is what to use);
- ``token_pass_``: both, with ``g_t`` formed from the token-level GRPO terms in between;
- ``partial_stats``: for a vocabulary shard (vocab-parallel), the row max ``m``, ``s = sum exp(z - m)``,
  ``u = sum exp(z - m) * (z - m)`` and the target logit (0 where the target is not in this shard),
  stacked as fp32 ``[4, C]``, without modifying the tile; :mod:`grpo_fast.parallel` combines them.

Targets outside ``[0, V_shard)`` (another shard's tokens) get no one-hot term in ``grad_``.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from .chunking import FP32_TEMPS
from .config import GRPOConfig
from .objective import token_grad


class ChunkOps(Protocol):
    name: str
    # fp32 [C, V] temporaries the pass allocates besides the tile (sizes the tiles, grpo_fast.chunking).
    fp32_temps: int

    def stats(self, logits: Tensor, targets: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]: ...

    def grad_(
        self, logits: Tensor, targets: Tensor, lse: Tensor, g: Tensor, temperature: float
    ) -> Tensor: ...

    def partial_stats(self, logits: Tensor, targets: Tensor, temperature: float) -> Tensor: ...

    def token_pass_(
        self,
        logits: Tensor,
        targets: Tensor,
        old_logp: Tensor | None,
        ref_logp: Tensor | None,
        adv: Tensor,
        w: Tensor,
        cfg: GRPOConfig,
    ) -> tuple[Tensor, Tensor, Tensor]: ...


def _scaled_fp32(logits: Tensor, temperature: float) -> Tensor:
    # The tile belongs to the pass (it is overwritten with dlogits), so fp32 tiles are scaled in place.
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return z.div_(temperature) if temperature != 1.0 else z


def _entropy_(log_probs: Tensor, probs: Tensor) -> Tensor:
    # H = -sum(p * log p): no cancellation between two large terms. The product overwrites log_probs
    # (no second [C, V] buffer); a plain sum, not a batched dot: its blocked fp32 accumulation was
    # measurably less accurate than PyTorch's own at V = 4099.
    return -log_probs.mul_(probs).sum(-1)


def _owned(targets: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    """Targets clamped into the tile and whether each is really in it (vocab-parallel shards)."""
    return targets.clamp(0, vocab - 1), (targets >= 0) & (targets < vocab)


def _write_dlogits(logits: Tensor, probs: Tensor, targets: Tensor, g: Tensor, temperature: float) -> Tensor:
    scale = (g / temperature).to(probs.dtype).unsqueeze(1)
    dz = probs.mul_(-scale)
    index, owned = _owned(targets, dz.shape[1])
    dz.scatter_add_(1, index.unsqueeze(1), scale * owned.unsqueeze(1))
    if dz.dtype == logits.dtype:
        return dz
    return logits.copy_(dz)


class TorchChunkOps:
    """The chunk pass in plain torch ops: the CPU default and the fallback everywhere."""

    name = "torch"
    fp32_temps = FP32_TEMPS

    def stats(self, logits: Tensor, targets: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
        lse, logp, entropy, _ = self._stats(logits, targets, temperature)
        return lse, logp, entropy

    def _stats(
        self, logits: Tensor, targets: Tensor, temperature: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        z = _scaled_fp32(logits, temperature)
        lse = torch.logsumexp(z, dim=-1)
        log_probs = z.sub_(lse.unsqueeze(1))  # in place: the tile is ours
        logp = log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)
        probs = torch.exp(log_probs)
        return lse, logp, _entropy_(log_probs, probs), probs

    def partial_stats(self, logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
        z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # a copy: tile kept
        m = z.amax(dim=-1)
        shifted = z.sub_(m.unsqueeze(1))
        e = torch.exp(shifted)
        s = e.sum(-1)
        index, owned = _owned(targets, z.shape[1])
        t = (shifted.gather(1, index.unsqueeze(1)).squeeze(1) + m) * owned
        u = shifted.mul_(e).sum(-1)  # in place, after the gather: no second [C, V] buffer
        return torch.stack([m, s, u, t]).float()

    def grad_(self, logits: Tensor, targets: Tensor, lse: Tensor, g: Tensor, temperature: float) -> Tensor:
        probs = _scaled_fp32(logits, temperature).sub_(lse.unsqueeze(1)).exp_()
        return _write_dlogits(logits, probs, targets, g, temperature)

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
        _, logp, entropy, probs = self._stats(logits, targets, cfg.temperature)
        g = token_grad(logp, old_logp, ref_logp, adv, w, cfg)
        return logp, entropy, _write_dlogits(logits, probs, targets, g, cfg.temperature)
