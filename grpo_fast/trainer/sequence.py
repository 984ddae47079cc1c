"""Sequence parallelism in the trainer (``sequence_parallel_size`` P > 1): P ranks share each packed row.

A group of P consecutive ranks holds the same rows. Each rank samples and scores a share of them
(:meth:`Layout.refine <grpo_fast.trainer.distributed.Layout.refine>`), then the group exchanges them
(:func:`share_rollout`). Every training and log-prob forward packs its rows as padding-free does, pads
the packed width to a multiple of P and runs each rank on its contiguous slice of every row under
Ulysses attention (:mod:`grpo_fast.integrations.ulysses`): hidden states ``[R, W/P, H]``. A rank's loss
tokens are the completion tokens whose predicting state lies in its slice (:class:`SequenceSlice`); it
computes their old and reference log-probs too, so the loss pass finds them where it looks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..integrations.packing import Packing
from .distributed import Group, Layout
from .generation import Rollout


@dataclass(frozen=True)
class SequenceSlice:
    """This rank's slice of a packed pass, with the :class:`Packing` interface the trainer's forwards use.

    ``seq_ids``/``cols``: row and completion column of each completion token whose predicting state lies
    in this slice (the others are scored by the other ranks of the group); ``states``: flat index of that
    state in the slice's ``[R * W/P]`` positions.
    """

    input_ids: Tensor  # [R, W/P]
    position_ids: Tensor  # [R, W/P]
    seq_ids: Tensor  # [m] int64
    cols: Tensor  # [m] int64
    states: Tensor  # [m] int64
    num_rows: int  # B, the padded batch's rows

    @classmethod
    def of(cls, packing: Packing, size: int, rank: int) -> SequenceSlice:
        """Rank ``rank`` of ``size``'s slice; the packed width is padded to a multiple of ``size`` with pad
        tokens forming a segment of their own (positions from 0), which nothing reads."""
        ids, pos = packing.input_ids, packing.position_ids
        num_rows, width = ids.shape
        pad = -width % size
        if pad:
            ids = torch.nn.functional.pad(ids, (0, pad), value=0)
            tail = torch.arange(pad, dtype=pos.dtype, device=pos.device).expand(num_rows, pad)
            pos = torch.cat([pos, tail], dim=1)
        local = (width + pad) // size
        row, col = packing.states // width, packing.states % width
        keep = col // local == rank
        states = row[keep] * local + col[keep] % local
        lo, hi = rank * local, (rank + 1) * local
        return cls(
            ids[:, lo:hi], pos[:, lo:hi], packing.seq_ids[keep], packing.cols[keep], states, packing.num_rows
        )

    def forward_kwargs(self) -> dict[str, Tensor | None]:
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "attention_mask": None}

    def hidden(self, last_hidden_state: Tensor) -> Tensor:
        """``[m, H]`` states predicting this slice's completion tokens, from its ``[R, W/P, H]`` forward."""
        return last_hidden_state.flatten(0, 1).index_select(0, self.states)

    def take(self, x: Tensor) -> Tensor:
        """The ``[m, ...]`` values of this slice's tokens of a padded ``[B, T, ...]`` completion tensor."""
        return x[self.seq_ids, self.cols]

    def unpack(self, values: Tensor, length: int, fill: float = 0.0) -> Tensor:
        """This slice's ``[m]`` values in the padded ``[B, length]`` layout, ``fill`` elsewhere."""
        out = values.new_full((self.num_rows, length), fill)
        out[self.seq_ids, self.cols] = values
        return out


def attention(model: nn.Module, group: Group | None) -> contextlib.AbstractContextManager:
    """Ulysses attention over ``group`` for the forwards inside (none without sequence parallelism)."""
    if group is None:
        return contextlib.nullcontext()
    from ..integrations.ulysses import sequence_parallel_attention

    return sequence_parallel_attention(model, group.pg)


def check_model(model: nn.Module, size: int) -> None:
    """ValueError naming why ``model`` cannot be split over ``size`` ranks, if it cannot."""
    from ..integrations.ulysses import check_splittable

    check_splittable(model, size)


def share_rollout(out: Rollout, group: Group, sampled: Layout, layout: Layout, pad_id: int) -> Rollout:
    """The group's rows (``layout.local``, in order) on each of its ranks, from the share each sampled
    (``sampled.local``; ``sampled`` is ``layout`` refined by the group's size)."""
    first = sampled.rank - group.rank  # the group's first rank in the sampled layout
    members = [sampled.rank_rows(first + r) for r in range(group.world)]
    where = torch.empty(sum(len(m) for m in layout.micro), dtype=torch.long)  # a row's place in the group's
    where[layout.local] = torch.arange(len(layout.local))
    places = [where[rows].to(out.prompt_ids.device) for rows in members]
    counts = [len(rows) for rows in members]
    width = int(group.max(torch.tensor([float(out.completion_ids.shape[1])], dtype=torch.float64))[0])

    def gather(x: Tensor) -> Tensor:
        parts = group.gather_parts(x, counts)
        full = x.new_empty((len(layout.local), *x.shape[1:]))
        for part, place in zip(parts, places, strict=True):
            full[place] = part
        return full

    def widen(x: Tensor, fill: int) -> Tensor:  # completions end at different lengths on each rank
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=fill)

    texts: list = [None] * len(layout.local)
    for part, place in zip(group.gather_objects(out.completions), places, strict=True):
        for text, i in zip(part, place.tolist(), strict=True):
            texts[i] = text
    return Rollout(
        gather(out.prompt_ids),
        gather(out.prompt_mask),
        gather(widen(out.completion_ids, pad_id)),
        gather(widen(out.completion_mask, 0)),
        gather(out.truncated),
        texts,
    )


__all__ = ["SequenceSlice", "attention", "check_model", "share_rollout"]
