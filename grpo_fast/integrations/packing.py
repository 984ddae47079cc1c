"""Padding-free forwards: a batch of left-padded prompts and right-padded completions, packed.

Each row's real tokens (prompt then completion, where the masks are 1) become one segment of a packed
sequence whose ``position_ids`` restart at 0, and the model runs with ``attention_mask=None``: the
attention implementations of transformers then attend within each segment only (flash attention
through its varlen path, sdpa/eager/flex through a block-diagonal causal mask). Models with rotary
positions see the same relative positions as in the padded batch, so the numbers match it to rounding.

Layout: flash attention gets one row holding every segment (its varlen kernel costs the segments'
own lengths). The other implementations build an explicit ``[q, k]`` mask per row, so segments are
packed first-fit-decreasing into rows as wide as the longest segment: the mask and the attention cost
never exceed the padded batch's, while the linear layers see almost no padding. A row's unused tail is
one dummy segment of pad tokens, nothing reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .hf import _text_config, unwrap

# transformers' attention implementations that isolate segments given restarting position_ids.
PACKED_ATTENTION = (
    "sdpa",
    "eager",
    "flex_attention",
    "flash_attention_2",
    "flash_attention_3",
    "flash_attention_4",
)
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "flash_attention_4")
ATTENTION_LAYERS = ("full_attention", "sliding_attention", "chunked_attention")


def attention_implementation(model: nn.Module) -> str:
    config = unwrap(model).config
    return str(getattr(config, "_attn_implementation", None) or "eager")


def check_packable(model: nn.Module) -> None:
    """ValueError naming why ``model`` cannot run packed segments, if it cannot."""
    impl = attention_implementation(model)
    if impl not in PACKED_ATTENTION:
        raise ValueError(
            f"padding-free steps need an attention implementation that isolates packed sequences by "
            f"position_ids, one of {PACKED_ATTENTION}; the model uses attn_implementation={impl!r}. "
            "Load it with attn_implementation='sdpa' (or a flash attention), or turn padding-free off."
        )
    layer_types = getattr(_text_config(model), "layer_types", None) or ()
    other = sorted({str(t) for t in layer_types} - set(ATTENTION_LAYERS))
    if other:
        raise ValueError(
            f"padding-free steps pack sequences by position_ids, which only attention layers honour; "
            f"the model also has {other} layers (state carried across the packed sequences). "
            "Turn padding-free off for this model."
        )


@dataclass(frozen=True)
class Packing:
    """Where each row's tokens go in the packed batch, and where its completion tokens' states are.

    ``seq_ids``/``cols``: row and completion column of every completion token that is attended
    (completion_mask 1), row-major; ``states``: flat index into the packed ``[R * W]`` positions of the
    hidden state that predicts it (the position before it).
    """

    input_ids: Tensor  # [R, W]
    position_ids: Tensor  # [R, W]
    seq_ids: Tensor  # [n] int64
    cols: Tensor  # [n] int64
    states: Tensor  # [n] int64
    num_rows: int  # B, the padded batch's rows
    real: Tensor  # [R, W] bool: a segment's token, not a row's tail (the attention mask it stands for)

    @classmethod
    def build(
        cls,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        completion_ids: Tensor,
        completion_mask: Tensor,
        *,
        one_row: bool,
        pad_id: int = 0,
    ) -> Packing:
        """Pack the rows' real tokens; ``one_row``: all segments in a single row (varlen attention)."""
        for name, t in (("prompt_mask", prompt_mask), ("completion_ids", completion_ids)):
            if t.dim() != 2 or t.shape[0] != prompt_ids.shape[0]:
                raise ValueError(f"{name} must be [B, *] with B={prompt_ids.shape[0]}, got {tuple(t.shape)}")
        if prompt_mask.shape != prompt_ids.shape or completion_mask.shape != completion_ids.shape:
            raise ValueError("prompt_mask and completion_mask must have their ids' shapes")
        ids = torch.cat([prompt_ids, completion_ids], dim=1)
        keep = torch.cat([prompt_mask, completion_mask], dim=1) != 0
        prompt_len = (prompt_mask != 0).sum(1)
        empty = (prompt_len == 0).nonzero()
        if empty.numel():
            raise ValueError(
                f"row {int(empty[0])} has no prompt token: its first completion token has no position "
                "to be predicted from"
            )
        lengths = keep.sum(1).tolist()
        width, starts, num_packed = _place(lengths, one_row)
        device = ids.device
        start = torch.tensor(starts, dtype=torch.long, device=device)
        rank = keep.long().cumsum(1) - 1  # position of each kept token within its segment
        dest = (start.unsqueeze(1) + rank)[keep]
        flat_ids = torch.full((num_packed * width,), pad_id, dtype=ids.dtype, device=device)
        flat_ids[dest] = ids[keep]
        flat_pos = _tail_positions(lengths, starts, num_packed, width, device)
        flat_pos[dest] = rank[keep]
        real = torch.zeros(num_packed * width, dtype=torch.bool, device=device)
        real[dest] = True
        num_prompt = prompt_ids.shape[1]
        comp_keep = keep[:, num_prompt:]
        seq_ids, cols = comp_keep.nonzero(as_tuple=True)
        states = start[seq_ids] + rank[:, num_prompt:][seq_ids, cols] - 1
        return cls(
            flat_ids.view(num_packed, width),
            flat_pos.view(num_packed, width),
            seq_ids,
            cols,
            states,
            prompt_ids.shape[0],
            real.view(num_packed, width),
        )

    @property
    def tokens(self) -> int:
        """Positions the packed forward computes (real tokens plus row tails)."""
        return self.input_ids.numel()

    def take(self, x: Tensor) -> Tensor:
        """The packed ``[n, ...]`` values of a padded ``[B, T, ...]`` completion tensor."""
        return x[self.seq_ids, self.cols]

    def hidden(self, last_hidden_state: Tensor) -> Tensor:
        """``[n, H]`` states predicting the completion tokens, from the packed forward's ``[R, W, H]``."""
        return last_hidden_state.flatten(0, 1).index_select(0, self.states)

    def unpack(self, values: Tensor, length: int, fill: float = 0.0) -> Tensor:
        """Packed ``[n]`` values back to the padded ``[B, length]`` layout, ``fill`` elsewhere."""
        out = values.new_full((self.num_rows, length), fill)
        out[self.seq_ids, self.cols] = values
        return out

    @classmethod
    def of_inputs(cls, input_ids: Tensor, attention_mask: Tensor, keep: int, *, one_row: bool) -> Packing:
        """The packing of ``[prompt | completion]`` rows whose last ``keep`` columns are the completion."""
        if not 0 < keep < input_ids.shape[1]:
            raise ValueError(f"keep must be in [1, {input_ids.shape[1]}) (completion columns), got {keep}")
        split = input_ids.shape[1] - keep
        return cls.build(
            input_ids[:, :split],
            attention_mask[:, :split],
            input_ids[:, split:],
            attention_mask[:, split:],
            one_row=one_row,
        )

    def forward_kwargs(self) -> dict[str, Tensor | None]:
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "attention_mask": None}


def _place(lengths: list[int], one_row: bool) -> tuple[int, list[int], int]:
    """``(row width, flat start of each segment, rows)``; first-fit decreasing into rows of the
    longest segment's width unless ``one_row``."""
    if one_row:
        starts, at = [], 0
        for n in lengths:
            starts.append(at)
            at += n
        return max(at, 1), starts, 1
    width = max(max(lengths, default=1), 1)
    used: list[int] = []
    starts = [0] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties keep row order
        row = next((r for r, u in enumerate(used) if u + lengths[i] <= width), None)
        if row is None:
            used.append(0)
            row = len(used) - 1
        starts[i] = row * width + used[row]
        used[row] += lengths[i]
    return width, starts, max(len(used), 1)


def _tail_positions(
    lengths: list[int], starts: list[int], rows: int, width: int, device: torch.device
) -> Tensor:
    """Positions of the packed batch where no segment lies: 0, 1, ... from each row's first free slot
    (a dummy segment of its own); the segments' positions are written over them."""
    end = [0] * rows
    for n, s in zip(lengths, starts, strict=True):
        row = s // width
        end[row] = max(end[row], s - row * width + n)
    col = torch.arange(width, device=device).repeat(rows, 1)
    free = torch.tensor(end, dtype=torch.long, device=device).unsqueeze(1)
    return (col - free).clamp(min=0).flatten()


__all__ = ["Packing", "check_packable", "attention_implementation", "VARLEN_ATTENTION"]
