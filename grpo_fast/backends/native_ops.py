"""The native backend: the per-chunk pass in the compiled ops of ``grpo_fast._C`` (:class:`NativeChunkOps`).

The ops (``torch.ops.grpo_fast.chunk_stats``, ``chunk_partial_stats``, ``chunk_grad``) are registered in
csrc/bindings.cpp, with a C++ kernel for CPU tensors and a CUDA kernel for GPU tensors (when the extension
was built with them); each writes into tensors given to it, which these wrappers allocate. The chunk loop of
:mod:`grpo_fast.engine.chunk_loop` and the per-token math of :mod:`grpo_fast.engine.objective` are shared
with every other backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _native
from .base import Coefficients, split_tile_pass_
from .torch_ops import TorchChunkOps

__all__ = ["NativeChunkOps"]


def _vec(x: Tensor | None) -> Tensor | None:
    """An fp32 contiguous per-token vector (no copy when it already is one)."""
    return None if x is None else x.float().contiguous()


def _tile(logits: Tensor) -> Tensor:
    return logits if logits.shape[1] <= 1 or logits.stride(1) == 1 else logits.contiguous()


# Tile dtypes the compiled kernels take (fp32 math whatever the dtype).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class NativeChunkOps:
    """The chunk pass in the compiled ops; tiles fp32/bf16/fp16 with fp32 math, rows in any row stride.

    fp64 tiles (accuracy checks, tests) go to the plain torch ops instead, so they keep fp64 accuracy
    (their temporaries are then not counted in the tile size: fp64 is for small checks, not for speed).
    """

    name = "native"
    # No [C, V] temporaries (rows are walked in 8 KiB blocks): 4x the torch ops' rows for fp32 tiles under
    # the same budget, so fewer passes over the fp32 weight-gradient accumulator.
    fp32_temps = 0

    def __init__(self) -> None:
        _native.load()
        self._fp64 = TorchChunkOps()

    def stats(self, logits: Tensor, targets: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
        if logits.dtype not in KERNEL_DTYPES:
            return self._fp64.stats(logits, targets, temperature)
        logits = _tile(logits)
        # fp64: lse = m + log s unrounded, for grad_ (logp and entropy are fp32 values)
        out = torch.empty(3, logits.shape[0], dtype=torch.float64, device=logits.device)
        torch.ops.grpo_fast.chunk_stats(logits, targets.long().contiguous(), float(temperature), out)
        return out[0], out[1].float(), out[2].float()

    def stats_(self, logits: Tensor, targets: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
        if logits.dtype not in KERNEL_DTYPES:
            return self._fp64.stats_(logits, targets, temperature)
        return self.stats(logits, targets, temperature)  # the kernel reads the tile in place anyway

    def partial_stats(self, logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
        if logits.dtype not in KERNEL_DTYPES:
            return self._fp64.partial_stats(logits, targets, temperature)
        logits = _tile(logits)
        out = torch.empty(4, logits.shape[0], dtype=torch.float32, device=logits.device)
        torch.ops.grpo_fast.chunk_partial_stats(logits, targets.long().contiguous(), float(temperature), out)
        return out

    def tile_pass_(
        self, logits: Tensor, targets: Tensor, temperature: float, coefficients: Coefficients
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return split_tile_pass_(self, logits, targets, temperature, coefficients)

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
        if logits.dtype not in KERNEL_DTYPES:
            return self._fp64.grad_(logits, targets, lse, g, temperature, ent_coef, entropy)
        logits = _tile(logits)
        torch.ops.grpo_fast.chunk_grad(
            logits,
            targets.long().contiguous(),
            lse.double().contiguous(),
            _vec(g),
            float(temperature),
            _vec(ent_coef),
            _vec(entropy),
        )
        return logits
