"""The Triton backend: the per-chunk pass (:class:`TritonChunkOps`) and two ops that need no chunk loop.

The chunk loop of :mod:`grpo_fast.engine.chunk_loop` (its GEMMs in cuBLAS, its autograd Functions) is
shared by every backend; here the row-wise softmax work of each ``[C, V]`` tile runs in the kernels of
``grpo_fast.kernels``, as :mod:`grpo_fast.backends.base` specifies. Besides:

- :func:`triton_selective_logprobs`: no-grad log-probs and entropy from one fused GEMM + online
  logsumexp kernel that never writes the logits (the ``fused_gemm=True`` option of
  ``selective_logprobs``; otherwise the chunk loop runs tiles through :class:`TritonChunkOps`);
- :func:`triton_group_advantages`: group-normalized advantages in one kernel.

Triton is imported lazily by :mod:`grpo_fast.backends`, only when this backend is picked.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import advantages as _advantages
from ..kernels import chunk_grad as _chunk_grad
from ..kernels import chunk_stats as _chunk_stats
from ..kernels import logprobs as _logprobs
from .base import Coefficients, split_tile_pass_

__all__ = ["TritonChunkOps", "triton_group_advantages", "triton_selective_logprobs"]


def _rows(x: Tensor | None) -> Tensor | None:
    """A per-row coefficient as the kernels take it: fp32, contiguous (no copy when it already is)."""
    return x.float().contiguous() if x is not None else None


class TritonChunkOps:
    """The chunk pass in Triton kernels; logits tiles are fp16/bf16/fp32, with fp32 math throughout."""

    name = "triton"
    fp32_temps = 0  # the kernels work in registers, row block by row block: the tile is all the memory

    def stats(self, logits: Tensor, targets: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
        return _chunk_stats.chunk_stats(logits, targets.contiguous(), temperature)

    def stats_(self, logits: Tensor, targets: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
        return self.stats(logits, targets, temperature)  # the kernel reads the tile in place anyway

    def partial_stats(self, logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
        return _chunk_stats.chunk_partial_stats(logits, targets.contiguous(), temperature)

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
        lse = lse.contiguous()  # fp64 from stats: kept (the kernel takes it as two floats)
        g, ent_coef, entropy = _rows(g), _rows(ent_coef), _rows(entropy)
        return _chunk_grad.chunk_grad_(logits, targets.contiguous(), lse, g, temperature, ent_coef, entropy)


def triton_selective_logprobs(
    hidden2d: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    temperature: float,
    config: _logprobs.LogprobsConfig | None = None,
) -> tuple[Tensor, Tensor]:
    """No-grad per-token (logp, entropy), fp32 ``[N]``, of ``hidden2d [N, H]`` by the fused GEMM kernel.

    Validated inputs: hidden2d, weight ``[V, H]`` and bias ``[V]`` (or None) of one dtype, fp16/bf16/fp32
    (bf16 on a GPU only: the interpreter's ``tl.dot`` gets it wrong); targets ids in ``[0, V)``. The
    logits are never written. fp32 runs the dot in IEEE mode (no TF32): exact, but slower than cuBLAS.
    """
    targets = targets.reshape(-1).long().contiguous()
    with torch.no_grad():
        return _logprobs.fused_logprobs(
            hidden2d.detach().contiguous(),
            weight.detach().contiguous(),
            bias.detach().contiguous() if bias is not None else None,
            targets,
            temperature,
            config=config,
        )


def triton_group_advantages(
    rewards2d: Tensor, weights: Tensor, group_size: int, scale: str, eps: float
) -> Tensor:
    """Advantages fp32 ``[M]`` of validated rewards ``[M, R]`` and reward weights ``[R]`` (made fp32 here).

    TRL's semantics, as ``grpo_fast.reference.group_advantages``: NaN rewards skipped, groups of one get
    std 0, ``scale`` one of "group", "batch", "none".
    """
    if rewards2d.dim() == 1:  # [M]: one reward function
        rewards2d = rewards2d.unsqueeze(1)
    return _advantages.group_advantages(
        rewards2d.float().contiguous(), weights.float().contiguous(), group_size, scale, float(eps)
    )
