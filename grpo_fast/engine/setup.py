"""The one set-up path of ``grpo_loss`` and ``selective_logprobs``: head checks, vocab shard, backend, tiles.

Order: the LM head is checked and (vocab-parallel) the shard layout agreed first, because the other inputs'
checks need the global vocabulary; then the caller validates its own inputs; then :meth:`Head.plan` resolves
the backend and the tile size. Nothing runs a kernel before all checks have passed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import backends
from ..backends.base import ChunkOps
from .chunking import resolve_chunk_size
from .parallel import VocabShard, make_shard, shared_chunk_size
from .validation import check_lm_head

# Rows of every logits GEMM with batch_invariant=True: one GEMM shape, so that a token's log-prob is
# bitwise the same whatever batch, padding, packing or chunk size it comes with. Small enough that padding
# a short batch costs little, large enough for an efficient GEMM (2-core CPU, [*, 512] x [512, 32768]
# fp32: 64-row GEMMs take 45% longer than one 768-row GEMM, 128-row ones 7%).
INVARIANT_ROWS = 128


def check_batch_invariant(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"batch_invariant must be a bool, got {type(value).__name__}")
    return value


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
        """(backend name, its chunk ops, rows per tile, rows every tile is padded to or None), the same
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
