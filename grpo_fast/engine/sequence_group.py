"""Sequence parallelism in the loss: each rank of a process group holds a slice of the tokens of the same
sequences (Ulysses-style training splits every sequence along its length).

The per-token terms need nothing from the other ranks; what couples a sequence's tokens does, and it is
exchanged as per-sequence sums, never per-token values: the token counts once per call (the
denominators), after the log-prob pass the sums behind GSPO's and VESPO's sequence ratios and the
off-policy mask's KL, packed into one all-reduce, and the metrics' sums in one more. A sequence ratio's
gradient reaches every rank's tokens through :class:`_GroupTotal`, whose backward all-reduces.
Collectives run on the inputs' device (gloo: CPU tensors, NCCL: CUDA tensors).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor


class _GroupTotal(torch.autograd.Function):
    """``total`` (the group's sum of every rank's ``local``, all-reduced beforehand) with the gradient of
    a sum: dL/d local = the group's sum of each rank's dL/d total. The forward value comes precomputed
    because the log-prob pass already exchanged it; only the backward talks to the group."""

    @staticmethod
    def forward(ctx, local: Tensor, total: Tensor, group: object) -> Tensor:
        ctx.group = group
        return total.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None, None


@dataclass(frozen=True)
class SequenceGroup:
    """The ranks that share a batch's sequences, each holding some of their tokens."""

    group: object  # torch.distributed ProcessGroup
    keys: tuple[str, ...] = ()  # names of the rows of ``totals``
    totals: Tensor | None = None  # [len(keys), B]: per-sequence sums over the group (after the log-probs)

    def all_reduce_(self, x: Tensor) -> Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def all_reduce_max_(self, x: Tensor) -> Tensor:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        return x

    def with_totals(self, keys: tuple[str, ...], totals: Tensor) -> SequenceGroup:
        return replace(self, keys=keys, totals=totals)

    def total(self, key: str, local: Tensor) -> Tensor:
        """The group's per-sequence sum ``key`` in place of this rank's ``local`` one, differentiable."""
        if self.totals is None or key not in self.keys:
            raise AssertionError(f"the sequence group's sum {key!r} was not exchanged before it was needed")
        return _GroupTotal.apply(local, self.totals[self.keys.index(key)], self.group)

    def gather(self, local: Tensor) -> Tensor:
        """Every rank's 1-D ``local`` concatenated (ranks may hold different numbers): the entropy pool."""
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        sizes = torch.zeros(world, dtype=torch.int64, device=local.device)
        sizes[rank] = local.numel()
        self.all_reduce_(sizes)
        counts = sizes.tolist()
        padded = local.new_zeros(max(max(counts), 1))
        padded[: local.numel()] = local
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])

    def sum_metrics(
        self, metrics: dict[str, Tensor], skip: set[str], extra: list[Tensor]
    ) -> tuple[dict[str, Tensor], list[Tensor]]:
        """``metrics`` (except ``skip``) and the tensors ``extra`` summed over the group: one all-reduce."""
        keys = [k for k in metrics if k not in skip]
        values = torch.stack([metrics[k] for k in keys])
        flat = torch.cat([values, *(x.to(values.dtype).reshape(-1) for x in extra)])
        self.all_reduce_(flat)
        out = dict(metrics)
        out.update(zip(keys, flat[: len(keys)].unbind(0), strict=True))
        parts, at = [], len(keys)
        for x in extra:
            parts.append(flat[at : at + x.numel()].view_as(x))
            at += x.numel()
        return out, parts


# What every rank of a sequence group must pass alike: the sequences' count and which inputs are given.
_SHARED = ("B", "old_logp", "ref_logp", "sampling_logp", "importance_sampling_ratio",
           "num_items_in_batch", "per-token advantages")  # fmt: skip
_ABSENT = -(2**62)  # a rank whose inputs were refused contributes nothing to the max


def agree(
    group: SequenceGroup, failed: bool | Tensor | None, shared: list[int] | None, device: torch.device
) -> Tensor:
    """One all-reduce (max) of whether any rank refused its inputs and of what the ranks must share
    (``shared``, in :data:`_SHARED` order; None on a rank that refused its inputs), so that every rank
    raises together instead of one raising while the others wait in a later collective. Returns the
    device vector :func:`check_agreement` reads (with the call's other checks: no extra read)."""
    flag = failed.reshape(()).long() if isinstance(failed, Tensor) else torch.tensor(int(bool(failed)))
    values = [_ABSENT] * (2 * len(_SHARED)) if shared is None else [v for x in shared for v in (x, -x)]
    header = torch.cat([flag.reshape(1).to(device), torch.tensor(values, dtype=torch.int64, device=device)])
    return group.all_reduce_max_(header)


def check_agreement(header: list[int]) -> None:
    """On a rank whose own inputs passed: raise when another rank of the group refused its inputs or the
    ranks' inputs differ in kind."""
    if header[0]:
        raise ValueError(
            "another rank of the sequence group refused its grpo_loss inputs (its error says why); every "
            "rank of the group stops with it"
        )
    for k, name in enumerate(_SHARED):
        high, low = header[1 + 2 * k], -header[2 + 2 * k]
        if high == low:
            continue
        if k == 0:
            raise ValueError(
                f"every rank of the sequence group must pass the same sequences: the advantages' B ranges "
                f"from {low} to {high} across its ranks"
            )
        raise ValueError(
            f"{name} is given on some ranks of the sequence group only: pass it on every rank or on none"
        )


def open_sequence_group(group: object) -> SequenceGroup:
    """Check ``sequence_group`` (a ProcessGroup of an initialized torch.distributed)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("sequence_group was given but torch.distributed is not initialized")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"sequence_group must be a torch.distributed ProcessGroup, got {type(group).__name__}"
        )
    return SequenceGroup(group)
