"""The Triton backend: the per-chunk pass (:class:`TritonChunkOps`) and the entry points of the public ops.

The chunk loop of :mod:`grpo_fast.fused` (its GEMMs in cuBLAS, its autograd Functions) is shared by every
backend; here the row-wise softmax work of each ``[C, V]`` tile runs in the kernels of
``grpo_fast.kernels``. Two ops need no chunk loop: no-grad log-probs come from one fused GEMM +
online-logsumexp kernel that never writes the logits (:func:`triton_selective_logprobs`), and the
advantages from :func:`triton_group_advantages`.

Triton is imported lazily by :mod:`grpo_fast.backends`, only when this backend is picked.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .config import CLIPPED_LOSS_TYPES, GRPOConfig
from .kernels import advantages as _advantages
from .kernels import chunk_grad as _chunk_grad
from .kernels import chunk_stats as _chunk_stats
from .kernels import logprobs as _logprobs
from .kernels import token_pass as _token_pass
from .objective import loss_family

__all__ = ["TritonChunkOps", "token_terms", "triton_group_advantages", "triton_selective_logprobs"]


def token_terms(cfg: GRPOConfig) -> _token_pass.TokenTerms:
    """The config's hyper-parameters as the fused token pass takes them (runtime kernel arguments)."""
    clipped = cfg.loss_type in CLIPPED_LOSS_TYPES
    return _token_pass.TokenTerms(
        family=loss_family(cfg),
        lo=1 - cfg.epsilon_low,
        hi=1 + cfg.eps_high,
        cispo_max=cfg.eps_high,
        delta=cfg.delta if clipped else None,  # delta only enters the clipped surrogate
        beta=cfg.beta,
        bias_correction_kl=cfg.use_bias_correction_kl,
        temperature=cfg.temperature,
        sapo_tau_pos=cfg.sapo_temperature_pos,
        sapo_tau_neg=cfg.sapo_temperature_neg,
    )


def _contiguous(x: Tensor | None) -> Tensor | None:
    return x.contiguous() if x is not None else None


class TritonChunkOps:
    """The chunk pass in Triton kernels; logits tiles are fp16/bf16/fp32, with fp32 math throughout."""

    name = "triton"
    fp32_temps = 3  # the kernels need none; kept at the torch ops' value, the GPU tile size as measured

    def stats(self, logits: Tensor, targets: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
        return _chunk_stats.chunk_stats(logits, targets.contiguous(), temperature)

    def partial_stats(self, logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
        return _chunk_stats.chunk_partial_stats(logits, targets.contiguous(), temperature)

    def grad_(self, logits: Tensor, targets: Tensor, lse: Tensor, g: Tensor, temperature: float) -> Tensor:
        return _chunk_grad.chunk_grad_(
            logits, targets.contiguous(), lse.contiguous(), g.float().contiguous(), temperature
        )

    def token_pass_(
        self,
        logits: Tensor,
        targets: Tensor,
        old_logp: Tensor | None,
        ref_logp: Tensor | None,
        adv: Tensor,
        w: Tensor,
        cfg: GRPOConfig,
    ) -> tuple[Tensor, Tensor, Tensor]:
        logp, entropy = _token_pass.token_pass_(
            logits,
            targets.contiguous(),
            _contiguous(old_logp),
            _contiguous(ref_logp) if cfg.beta != 0.0 else None,
            adv.contiguous(),
            w.contiguous(),
            token_terms(cfg),
        )
        return logp, entropy, logits


def fused_logprobs_enabled(dtype: torch.dtype) -> bool:
    """Whether no-grad log-probs take the fused GEMM kernel (else: cuBLAS tiles + the stats kernel).

    fp16/bf16 only: for fp32, cuBLAS's GEMM beats Triton's IEEE fp32 dot. GRPO_FAST_TRITON_FUSED_LOGPROBS=0
    turns the fused kernel off, =1 forces it for fp32 too (for benchmarks and tests).
    """
    flag = os.environ.get("GRPO_FAST_TRITON_FUSED_LOGPROBS", "")
    if flag == "0":
        return False
    return flag == "1" or dtype in (torch.float16, torch.bfloat16)


def triton_selective_logprobs(
    hidden2d: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    temperature: float,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """No-grad per-token (logp, entropy), fp32 ``[N]``, of ``hidden2d [N, H]`` (validated inputs).

    The fused kernel never writes a logits tile; where it is off (see :func:`fused_logprobs_enabled`)
    the chunk loop runs cuBLAS tiles through the stats kernel, ``chunk_size`` rows at a time.
    """
    targets = targets.reshape(-1).long().contiguous()
    with torch.no_grad():
        if fused_logprobs_enabled(hidden2d.dtype):
            return _logprobs.fused_logprobs(
                hidden2d.contiguous(), weight.contiguous(), _contiguous(bias), targets, temperature
            )
        from .chunking import resolve_chunk_size
        from .fused import logprob_pass

        n, vocab = hidden2d.shape[0], weight.shape[0]
        chunk = resolve_chunk_size(chunk_size, n, vocab, hidden2d.dtype, hidden2d.device)
        _, logp, entropy = logprob_pass(hidden2d, weight, bias, targets, temperature, TritonChunkOps(), chunk)
        return logp, entropy


def triton_group_advantages(
    rewards2d: Tensor, weights: Tensor, group_size: int, scale: str, eps: float
) -> Tensor:
    """Advantages fp32 ``[M]`` of validated rewards ``[M, R]`` fp32 and weights ``[R]`` fp32."""
    return _advantages.group_advantages(rewards2d, weights, group_size, scale, float(eps))
