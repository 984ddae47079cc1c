"""Ulysses sequence parallelism for transformers' attention: each of P ranks holds a contiguous slice of
every (packed) row, and attention alone sees the whole sequence.

Inside ``sequence_parallel_attention(model, group)`` the model's attention layers call ``ulysses``
(registered in transformers' ``AttentionInterface``, outside its mask registry, so the model builds no
local mask and passes ``attention_mask=None``). Each rank's forward takes its slice ``[S/P]`` of the row
and its slice of the global ``position_ids`` (which restart at 0 for each packed segment; rotary
embeddings are per token, so they come out right). In each layer the query/key/value of the local tokens
and all heads go through one all-to-all to become the whole sequence for ``H/P`` heads; the segment-
isolated attention runs there (``ulysses_kernels``); a second all-to-all brings the output back to the
local tokens and all heads. Both all-to-alls are their own adjoint, so the backward runs them again.

Key/value heads: when ``Hkv`` is not a multiple of P they are repeated up to ``lcm(Hkv, P)`` heads (a
divisor of ``H``), so that each rank receives whole key/value heads for its query heads.

The global positions are gathered once per forward (cached on the local ``position_ids`` tensor, which
every layer receives) and turned into the kernel's mask there.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .hf import _text_config, unwrap
from .ulysses_kernels import KERNELS, Kernel, SegmentLayout, attend, choose_kernel

ATTENTION_NAME = "grpo_fast_ulysses"


def group_size(group: dist.ProcessGroup | None) -> int:
    """Ranks in ``group`` (``None``: the default group; 1 when torch.distributed is not initialised)."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def check_splittable(model: nn.Module, size: int) -> None:
    """ValueError naming why ``model``'s sequences cannot be split over ``size`` ranks, if they cannot."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"sequence parallel size must be an int >= 1, got {size!r}")
    inner = unwrap(model)
    name = type(inner).__name__
    if getattr(inner, "config", None) is None:
        raise ValueError(f"sequence parallelism splits transformers models; {name} has no config")
    config = _text_config(model)
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int):
        raise ValueError(f"sequence parallelism splits attention heads; {name} has no num_attention_heads")
    if heads % size:
        raise ValueError(
            f"sequence parallel size {size} must divide the attention heads: {name} has "
            f"num_attention_heads={heads}"
        )
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % kv_heads:
        raise ValueError(
            f"{name}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
        )
    other = sorted({str(t) for t in getattr(config, "layer_types", None) or ()} - {"full_attention"})
    if other:
        raise ValueError(
            f"sequence parallelism needs full attention in every layer; {name} also has {other} layers"
        )
    if getattr(config, "layer_types", None) is None and getattr(config, "sliding_window", None) is not None:
        raise ValueError(
            f"sequence parallelism needs full attention; {name} uses sliding_window={config.sliding_window} "
            "(set config.sliding_window=None if no sequence is longer than the window)"
        )
    if getattr(config, "attention_chunk_size", None) is not None:
        raise ValueError(f"sequence parallelism needs full attention; {name} uses chunked attention")
    if "position_ids" not in inspect.signature(inner.forward).parameters:
        raise ValueError(
            f"sequence parallelism passes each rank its slice of the positions; "
            f"{name}.forward takes no position_ids"
        )
    if not _uses_attention_interface(inner):
        raise ValueError(
            f"sequence parallelism replaces the attention through transformers' AttentionInterface, "
            f"which {name}'s attention layers do not call"
        )


def _uses_attention_interface(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    for cls in type(model).__mro__:
        # Wrappers (FSDP2's FSDP<Model> classes) come first; the model's own class is the first outside torch.
        if issubclass(cls, PreTrainedModel) and not cls.__module__.startswith("torch."):
            return bool(cls._can_set_attn_implementation())
    return False


def pad_to_multiple(x: Tensor, multiple: int, dim: int = 1, value: float = 0) -> Tensor:
    """``x`` padded at the end of ``dim`` with ``value`` to a multiple of ``multiple``."""
    extra = -x.shape[dim] % multiple
    if not extra:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


def shard_sequence(x: Tensor, group: dist.ProcessGroup | None, dim: int = 1) -> Tensor:
    """This rank's contiguous slice of ``x`` along ``dim`` (a view). The caller pads ``x`` to a multiple of
    the group size first (``pad_to_multiple``), with the values it means for each tensor (pad token, next
    positions, a zero mask); a length that does not divide is a ValueError."""
    size = group_size(group)
    length = x.shape[dim]
    if length % size:
        raise ValueError(
            f"shard_sequence: x.shape[{dim}]={length} must be a multiple of the group size {size} "
            "(pad it with pad_to_multiple first)"
        )
    rank = dist.get_rank(group) if size > 1 else 0
    return x.narrow(dim, rank * (length // size), length // size)


class _AllToAll(torch.autograd.Function):
    """Chunk ``i`` of dim 0 goes to rank ``i``; chunk ``i`` of the result came from rank ``i``. The same
    exchange is its own adjoint, so the backward runs it on the gradient."""

    @staticmethod
    def forward(ctx: object, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group  # type: ignore[attr-defined]
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)  # type: ignore[attr-defined]
        return out, None


def _to_heads(parts: list[Tensor], size: int, group: dist.ProcessGroup) -> list[Tensor]:
    """``[B, h_i, S/P, D]`` each (local tokens, all heads) -> ``[B, h_i/P, S, D]`` (all tokens, this rank's
    heads), the parts sharing one all-to-all."""
    batch, _, local, dim = parts[0].shape
    chunks = [p.reshape(batch, size, p.shape[1] // size, local, dim).transpose(0, 1) for p in parts]
    sent = torch.cat(chunks, dim=2)  # [P, B, sum h_i/P, S/P, D], contiguous
    got = _AllToAll.apply(sent, group)  # chunk j: rank j's tokens
    outs, start = [], 0
    for c in chunks:
        part = got[:, :, start : start + c.shape[2]]  # [P, B, h/P, S/P, D]
        start += c.shape[2]
        outs.append(part.permute(1, 2, 0, 3, 4).reshape(batch, c.shape[2], size * local, dim))
    return outs


def _to_tokens(out: Tensor, size: int, group: dist.ProcessGroup) -> Tensor:
    """``[B, S, H/P, D]`` (all tokens, this rank's heads) -> ``[B, S/P, H, D]`` (local tokens, all heads)."""
    batch, length, heads, dim = out.shape
    local = length // size
    sent = out.reshape(batch, size, local, heads, dim).transpose(0, 1).contiguous()  # [P, B, S/P, H/P, D]
    got = _AllToAll.apply(sent, group)  # chunk j: head group j
    return got.permute(1, 2, 0, 3, 4).reshape(batch, local, size * heads, dim)


@dataclass
class _Parallel:
    """One context's settings, and the layout of the forward in flight."""

    group: dist.ProcessGroup
    size: int
    kernel: Kernel
    key: Tensor | None = None  # the local position_ids the layout was built from (kept alive: no id reuse)
    version: int = -1
    layout: SegmentLayout | None = None

    def layout_for(self, position_ids: Tensor, batch: int, causal: bool) -> SegmentLayout:
        fresh = self.key is position_ids and self.version == position_ids._version
        if not fresh or self.layout is None or self.layout.causal != causal:
            local = position_ids.expand(batch, -1).contiguous()
            pieces = [torch.empty_like(local) for _ in range(self.size)]
            dist.all_gather(pieces, local, group=self.group)
            self.key, self.version = position_ids, position_ids._version
            self.layout = SegmentLayout(torch.cat(pieces, dim=1), causal)
        return self.layout


# Config (by id) -> the context that switched it, read by the attention function from ``module.config``.
_ACTIVE: dict[int, _Parallel] = {}


def ulysses_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs: object,
) -> tuple[Tensor, None]:
    """transformers attention function: query ``[B, H, S/P, D]``, key/value ``[B, Hkv, S/P, D]`` (rotary
    applied) -> ``([B, S/P, H, Dv], None)``."""
    state = _ACTIVE.get(id(getattr(module, "config", None)))
    if state is None:
        raise RuntimeError(
            f"{ATTENTION_NAME!r} attention runs only inside sequence_parallel_attention(model, group)"
        )
    if attention_mask is not None or sliding_window is not None:
        raise ValueError("sequence parallel attention takes no attention_mask or sliding_window")
    position_ids = kwargs.get("position_ids")
    if not isinstance(position_ids, Tensor):
        raise ValueError(f"{type(module).__name__} does not pass position_ids to its attention function")
    if query.shape[2] != key.shape[2]:
        raise ValueError("sequence parallel attention runs without a KV cache (pass use_cache=False)")
    size, group = state.size, state.group
    kv_heads = key.shape[1]
    spread = math.lcm(kv_heads, size)  # divides H: H is a multiple of both
    if spread != kv_heads:
        key = key.repeat_interleave(spread // kv_heads, dim=1)
        value = value.repeat_interleave(spread // kv_heads, dim=1)
    if value.shape[-1] == query.shape[-1]:
        query, key, value = _to_heads([query, key, value], size, group)
    else:
        query, key = _to_heads([query, key], size, group)
        (value,) = _to_heads([value], size, group)
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    layout = state.layout_for(position_ids, query.shape[0], causal)
    kernel = choose_kernel(state.kernel, query)
    out = attend(kernel, query, key, value, layout, scaling, dropout, softcap)
    return _to_tokens(out, size, group), None


def _register() -> None:
    from transformers import AttentionInterface

    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, ulysses_attention)


def _check_forward(module: nn.Module, args: tuple, kwargs: dict) -> None:
    if kwargs.get("attention_mask") is not None:
        # The model builds no mask under this attention name: a padding mask would be dropped unseen.
        raise ValueError(
            f"{type(module).__name__} under sequence_parallel_attention takes attention_mask=None: segments "
            "are told apart by their restarting position_ids"
        )
    if kwargs.get("position_ids") is None:
        raise ValueError(
            f"{type(module).__name__} under sequence_parallel_attention needs position_ids= (this rank's "
            "slice of the global positions): without them each rank would count positions from 0"
        )


@contextlib.contextmanager
def sequence_parallel_attention(
    model: nn.Module, group: dist.ProcessGroup | None, kernel: Kernel = "auto"
) -> Iterator[None]:
    """While inside, ``model``'s attention runs Ulysses over ``group`` (P ranks): each rank's forward gets
    its contiguous slice ``[S/P]`` of every row (``shard_sequence``), ``position_ids=`` its slice of the
    global, per-segment-restarting positions, and ``attention_mask=None``. On exit (exceptions included)
    the model's own attention implementation is back. A group of one rank changes nothing.

    ``kernel``: the attention on the whole sequence, ``auto`` (see ``ulysses_kernels.choose_kernel``),
    ``segments``, ``sdpa``, ``flex`` or ``flash``."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    size = group_size(group)
    if size == 1:
        yield
        return
    check_splittable(model, size)
    _register()
    config = _text_config(model)
    if id(config) in _ACTIVE:
        raise RuntimeError("sequence_parallel_attention is already active for this model")
    previous = config._attn_implementation_internal
    from transformers import PreTrainedModel

    hooks = [
        m.register_forward_pre_hook(_check_forward, with_kwargs=True)
        for m in unwrap(model).modules()
        if isinstance(m, PreTrainedModel) and "position_ids" in inspect.signature(m.forward).parameters
    ]
    _ACTIVE[id(config)] = _Parallel(group if group is not None else dist.group.WORLD, size, kernel)
    config._attn_implementation_internal = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation_internal = previous
        del _ACTIVE[id(config)]
        for hook in hooks:
            hook.remove()
