"""Vocab-parallel LM heads: each rank of a process group holds rows ``W[start:start+V_r]``.

Hidden states, targets and masks are replicated on every rank of the group (Megatron-style tensor
parallelism). Per chunk the ranks exchange O(C) numbers (row max, sum-exp, entropy and target-logit
partials), never logits; the hidden-state gradient is summed across ranks once per call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class VocabShard:
    group: object  # torch.distributed ProcessGroup
    start: int  # global id of this rank's first row
    vocab: int  # global vocabulary size

    def all_reduce_(self, x: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
        dist.all_reduce(x, op=op, group=self.group)
        return x


def make_shard(group: object, local_vocab: int, device: torch.device, vocab_start: int | None) -> VocabShard:
    """This rank's shard: offsets follow rank order unless vocab_start says otherwise."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialized")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    # gloo reduces CPU tensors, NCCL CUDA tensors: talk on the inputs' device.
    sizes = torch.zeros(world, dtype=torch.int64, device=device)
    sizes[rank] = local_vocab
    dist.all_reduce(sizes, group=group)
    if vocab_start is None:
        start = int(sizes[:rank].sum())
    elif isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start must be a non-negative int, got {vocab_start!r}")
    else:
        start = vocab_start
    ends = torch.zeros(world, dtype=torch.int64, device=device)
    ends[rank] = start + local_vocab
    dist.all_reduce(ends, group=group)
    vocab = int(sizes.sum())
    if int(ends.max()) != vocab:
        raise ValueError(
            f"vocab shards [vocab_start, vocab_start + V_r) do not tile [0, {vocab}) across the group"
        )
    return VocabShard(group=group, start=start, vocab=vocab)


def shared_chunk_size(chunk: int, shard: VocabShard | None, device: torch.device) -> int:
    """Every rank must walk the same chunks (one collective each): take the smallest."""
    if shard is None:
        return chunk
    value = torch.tensor([chunk], dtype=torch.int64, device=device)
    return int(shard.all_reduce_(value, dist.ReduceOp.MIN))


def combine_stats(partial: Tensor, shard: VocabShard) -> tuple[Tensor, Tensor, Tensor]:
    """(lse, logp, entropy) of the full vocabulary from every rank's ``partial_stats`` [4, C]."""
    m, s, u, t = partial
    big_m = shard.all_reduce_(m.clone(), dist.ReduceOp.MAX)
    scale = torch.exp(m - big_m)
    # Shift each rank's sums to the global max; u keeps the stable "(z - max)" form for the entropy.
    packed = torch.stack([s * scale, (u + (m - big_m) * s) * scale, t])
    big_s, big_u, target = shard.all_reduce_(packed)
    log_s = torch.log(big_s)
    lse = big_m.double() + log_s.double()  # unrounded: see backends/base.py
    return lse, (target - big_m) - log_s, log_s - big_u / big_s  # log p: see chunk_ops.cpp
