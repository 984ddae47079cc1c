"""The per-chunk pass over one ``[C, V]`` logits tile: the interface every backend implements.

The chunk loop (:mod:`grpo_fast.engine.chunk_loop`) runs the GEMMs and calls these on each tile of raw
logits ``x = hidden_chunk @ W^T + b``, ``z = x / T``; a backend only supplies row-wise softmax work,
and knows nothing of GRPO (the per-token math is :mod:`grpo_fast.engine.objective`, once, for all):

- ``stats``: logsumexp, target log-prob and entropy of ``z`` (``[C]`` each; logp and entropy fp32, the
  logsumexp fp64, ``m + log s`` unrounded: rounded to fp32 at ``|lse| ~ |z|`` it would shift every ``p =
  exp(z - lse)`` of ``grad_`` by that rounding, log_softmax's ``exp((z - m) - log s)`` does not); the tile is
  kept;
- ``stats_``: the same where the tile is not needed afterwards: it may be overwritten (no copy of it);
- ``partial_stats``: for a vocabulary shard (vocab-parallel), the row max ``m``, ``s = sum exp(z - m)``,
  ``u = sum exp(z - m) * (z - m)`` and the target logit (0 where the target is not in this shard),
  stacked as fp32 ``[4, C]``; :mod:`grpo_fast.engine.parallel` combines them;
- ``grad_``: ``dLoss/dx`` from per-row coefficients, written over the tile (the returned tensor is what
  to use): ``g * (onehot - p) / T`` with ``g = dLoss/dlogp``, plus, when ``ent_coef`` (``e = dLoss/dH``)
  is given with the rows' ``entropy`` H, ``e * dH/dx = -e * p * (log p + H) / T``.

- ``tile_pass_``: ``stats``, then ``coefficients(logp, entropy) -> (g, e)`` (the objective's per-row
  coefficients, computed by the caller's Python), then ``grad_``, on one tile: a backend may share work
  between the two (the torch ops compute the probabilities once); :func:`split_tile_pass_` is the plain
  sequence.

Targets outside ``[0, V_shard)`` (another shard's tokens) get no one-hot term in ``grad_``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from torch import Tensor

# (logp, entropy) of a tile's rows -> (g = dLoss/dlogp, e = dLoss/dH or None), fp32 [C] each.
Coefficients = Callable[[Tensor, Tensor], tuple[Tensor, Tensor | None]]


class ChunkOps(Protocol):
    name: str
    # fp32 [C, V] temporaries the pass allocates besides the tile (sizes the tiles, engine.tile_size).
    fp32_temps: int

    def stats(self, logits: Tensor, targets: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]: ...

    def stats_(
        self, logits: Tensor, targets: Tensor, temperature: float
    ) -> tuple[Tensor, Tensor, Tensor]: ...

    def partial_stats(self, logits: Tensor, targets: Tensor, temperature: float) -> Tensor: ...

    def grad_(
        self,
        logits: Tensor,
        targets: Tensor,
        lse: Tensor,
        g: Tensor,
        temperature: float,
        ent_coef: Tensor | None = None,
        entropy: Tensor | None = None,
    ) -> Tensor: ...

    def tile_pass_(
        self, logits: Tensor, targets: Tensor, temperature: float, coefficients: Coefficients
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(lse, logp, entropy, dlogits) of one tile, dlogits written over it (use the returned tensor)."""
        ...


def split_tile_pass_(
    ops: ChunkOps, logits: Tensor, targets: Tensor, temperature: float, coefficients: Coefficients
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``tile_pass_`` as ``stats``, the coefficients, then ``grad_`` (entropy term only when e is given)."""
    lse, logp, entropy = ops.stats(logits, targets, temperature)
    g, e = coefficients(logp, entropy)
    terms = (e, entropy) if e is not None else (None, None)
    return lse, logp, entropy, ops.grad_(logits, targets, lse, g, temperature, *terms)
