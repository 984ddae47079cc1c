"""The attention Ulysses runs on each rank, over the whole sequence and a slice of the heads.

Packed rows hold several segments whose ``position_ids`` restart; a token attends to the earlier tokens
of its own segment only. A segment starts wherever the position does not follow the previous one by 1
(the rule transformers' own packed-sequence detection uses), so the result matches the model's own
attention on the whole row. ``SegmentLayout`` turns the gathered global positions into what each kernel
needs, once per forward (every layer reuses it):

- ``segments``: sdpa on each segment alone (``is_causal``, no mask): any device, memory and work of the
  segments' own lengths; one read of the segment boundaries per forward.
- ``sdpa``: one sdpa over the whole row with an explicit block-diagonal causal mask ``[B, 1, S, S]``; any
  device, O(S^2) memory (torch's CPU sdpa keeps a float copy of the mask per call for its backward).
- ``flex``: a flex-attention ``BlockMask`` with a document mask; compiled on CUDA, eager elsewhere.
- ``flash``: FlashAttention 2's varlen kernel over ``cu_seqlens`` (CUDA, fp16/bf16, ``flash_attn``).

Every kernel takes query ``[B, Hq, S, D]`` and key/value ``[B, Hk, S, D]`` (``Hq % Hk == 0``, GQA) and
returns ``[B, S, Hq, Dv]``, the layout transformers' attention functions return.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Kernel = Literal["auto", "segments", "sdpa", "flex", "flash"]
KERNELS = ("auto", "segments", "sdpa", "flex", "flash")


def segment_starts(positions: Tensor) -> Tensor:
    """``[B, S]`` bool: True where a segment starts (the first token of a row, or a position that does not
    follow its predecessor by 1)."""
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] - positions[:, :-1] != 1
    return starts


def block_causal_mask(positions: Tensor, causal: bool = True) -> Tensor:
    """``[B, 1, S, S]`` bool, True where query ``i`` may attend key ``j``: same segment (and ``j <= i``)."""
    segments = segment_starts(positions).cumsum(-1)
    mask = segments[:, :, None] == segments[:, None, :]
    if causal:
        size = positions.shape[-1]
        mask &= torch.ones(size, size, dtype=torch.bool, device=positions.device).tril()
    return mask[:, None]


def cu_seqlens(positions: Tensor) -> tuple[Tensor, int]:
    """The segments of all rows laid end to end: ``int32 [n + 1]`` offsets and the longest length."""
    starts = segment_starts(positions).flatten().nonzero().flatten()
    total = torch.tensor([positions.numel()], device=positions.device, dtype=starts.dtype)
    offsets = torch.cat([starts, total]).to(torch.int32)
    return offsets, int((offsets[1:] - offsets[:-1]).max())


@dataclass
class SegmentLayout:
    """The global positions ``[B, S]`` of one forward and, built on first use, each kernel's mask."""

    positions: Tensor
    causal: bool = True
    _built: dict[str, object] = field(default_factory=dict)

    def mask(self) -> Tensor:
        if "mask" not in self._built:
            self._built["mask"] = block_causal_mask(self.positions, self.causal)
        return self._built["mask"]  # type: ignore[return-value]

    def block_mask(self) -> object:
        if "block_mask" not in self._built:
            from torch.nn.attention.flex_attention import create_block_mask

            segments = segment_starts(self.positions).cumsum(-1)
            causal = self.causal

            def document(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
                same = segments[b, q] == segments[b, k]
                return same & (q >= k) if causal else same

            batch, size = self.positions.shape
            device = self.positions.device
            # Compiled, the mask is evaluated block by block instead of as one [S, S] tensor.
            self._built["block_mask"] = create_block_mask(
                document, batch, None, size, size, device=device, _compile=device.type == "cuda"
            )
        return self._built["block_mask"]

    def spans(self) -> list[list[tuple[int, int]]]:
        """Each row's segments as ``(start, end)`` columns, read to the host once."""
        if "spans" not in self._built:
            size = self.positions.shape[-1]
            spans = []
            for row in segment_starts(self.positions).cpu():
                starts = row.nonzero().flatten().tolist()
                spans.append(list(zip(starts, starts[1:] + [size], strict=True)))
            self._built["spans"] = spans
        return self._built["spans"]  # type: ignore[return-value]

    def varlen(self) -> tuple[Tensor, int]:
        if "varlen" not in self._built:
            self._built["varlen"] = cu_seqlens(self.positions)
        return self._built["varlen"]  # type: ignore[return-value]


def flash_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def flex_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def choose_kernel(kernel: Kernel, query: Tensor) -> str:
    """``auto``: on CUDA, FlashAttention varlen for fp16/bf16 when installed, else flex attention; sdpa per
    segment elsewhere (the CPU)."""
    if kernel != "auto":
        return kernel
    if query.is_cuda:
        if query.dtype in (torch.float16, torch.bfloat16) and flash_available():
            return "flash"
        if flex_available():
            return "flex"
    return "segments"


def attend(
    kernel: str,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    layout: SegmentLayout,
    scaling: float | None,
    dropout: float,
    softcap: float | None,
) -> Tensor:
    """Attention within segments: query ``[B, Hq, S, D]``, key/value ``[B, Hk, S, D]`` -> ``[B, S, Hq, D]``"""
    if kernel in ("segments", "sdpa"):
        if softcap is not None:
            raise ValueError(f"the {kernel} kernel has no logit soft-capping; use kernel='flex' or 'flash'")
        run = _segments if kernel == "segments" else _sdpa
        return run(query, key, value, layout, scaling, dropout)
    if kernel == "flex":
        return _flex(query, key, value, layout, scaling, dropout, softcap)
    if kernel == "flash":
        return _flash(query, key, value, layout, scaling, dropout, softcap)
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def _repeat_kv(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    groups = query.shape[1] // key.shape[1]
    if groups == 1:
        return key, value
    # Repeated heads, as transformers' sdpa path does under a mask: the same sums as the model's own.
    return key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)


def _segments(
    query: Tensor, key: Tensor, value: Tensor, layout: SegmentLayout, scaling: float | None, dropout: float
) -> Tensor:
    key, value = _repeat_kv(query, key, value)
    rows = []
    for b, spans in enumerate(layout.spans()):
        parts = [
            F.scaled_dot_product_attention(
                query[b : b + 1, :, start:end],
                key[b : b + 1, :, start:end],
                value[b : b + 1, :, start:end],
                dropout_p=dropout,
                is_causal=layout.causal,
                scale=scaling,
            )
            for start, end in spans
        ]
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    out = torch.cat(rows) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2)


def _sdpa(
    query: Tensor, key: Tensor, value: Tensor, layout: SegmentLayout, scaling: float | None, dropout: float
) -> Tensor:
    key, value = _repeat_kv(query, key, value)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=layout.mask(), dropout_p=dropout, scale=scaling
    )
    return out.transpose(1, 2)


@functools.cache
def _compiled_flex() -> object:
    from torch.nn.attention.flex_attention import flex_attention

    # Default dynamism: the first new sequence length recompiles once with a dynamic length.
    return torch.compile(flex_attention)


def _flex(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    layout: SegmentLayout,
    scaling: float | None,
    dropout: float,
    softcap: float | None,
) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    if dropout:
        raise ValueError(f"the flex kernel has no attention dropout (got dropout={dropout})")
    score_mod = None
    if softcap is not None:
        cap = float(softcap)

        def score_mod(score: Tensor, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
            return cap * torch.tanh(score / cap)

    # Eager flex materialises the scores (fine for tests on the CPU); compiled it is a fused kernel.
    run = _compiled_flex() if query.is_cuda else flex_attention
    out = run(
        query,
        key,
        value,
        score_mod=score_mod,
        block_mask=layout.block_mask(),
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2)


def _flash(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    layout: SegmentLayout,
    scaling: float | None,
    dropout: float,
    softcap: float | None,
) -> Tensor:
    from flash_attn import flash_attn_varlen_func

    batch, heads, size, _ = query.shape
    offsets, longest = layout.varlen()

    def tokens(x: Tensor) -> Tensor:  # [B, h, S, d] -> [B*S, h, d]
        return x.transpose(1, 2).reshape(batch * size, x.shape[1], x.shape[3])

    out = flash_attn_varlen_func(
        tokens(query),
        tokens(key),
        tokens(value),
        offsets,
        offsets,
        longest,
        longest,
        dropout_p=dropout,
        softmax_scale=scaling,
        causal=layout.causal,
        softcap=0.0 if softcap is None else float(softcap),
    )
    return out.view(batch, size, heads, value.shape[-1])
