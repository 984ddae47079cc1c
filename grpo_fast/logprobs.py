"""Public ``selective_logprobs``: per-token log-probs (and entropy) from hidden states and the LM head."""

from __future__ import annotations

import torch
from torch import Tensor

from .engine import compile_ops
from .engine.plan import LogprobCall, run_logprobs


def selective_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    *,
    backend: str = "auto",
    chunk_size: int | None = None,
    process_group: object | None = None,
    vocab_start: int | None = None,
    fused_gemm: bool = False,
    batch_invariant: bool = False,
    logit_softcap: float | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """``log_softmax((hidden @ weight.T + bias) / temperature)[targets]`` without the ``[N, V]`` logits.

    hidden ``[..., H]``, weight ``[V, H]``, targets ``[...]`` ids in ``[0, V)``. Returns fp32 log-probs of
    targets' shape, and the fp32 entropy too with ``return_entropy=True``. Gradients flow to hidden,
    weight and bias through both outputs (recomputed chunk by chunk in backward); the entropy's term runs
    only when the entropy received a gradient.

    ``fused_gemm=True`` (Triton backend, no gradient, no process group) runs one kernel that does the GEMM
    and the online logsumexp together and never writes a logits tile, instead of cuBLAS tiles plus the
    row statistics kernel; the default keeps the tile path until a GPU measurement says the fused kernel
    is faster (the GPU benchmark times both).

    ``batch_invariant=True``: every logits GEMM has one shape (128 rows, the last one padded), so a
    token's log-prob and entropy are bitwise the same whatever batch, padding, packing or ``chunk_size``
    it comes with, and the same as inside ``grpo_loss(..., batch_invariant=True)`` (not with
    ``fused_gemm``: its vocabulary split depends on the number of rows).

    With ``process_group``, weight/bias are this rank's vocabulary shard (see ``grpo_loss``).

    ``logit_softcap``: the logits are ``cap * tanh(logits / cap)`` before the temperature (Gemma 2's
    ``final_logit_softcapping``), in every backend's tile pass (not with ``fused_gemm``).
    """
    call = LogprobCall(
        hidden, weight, targets, bias, temperature, return_entropy, backend, chunk_size, process_group,
        vocab_start, fused_gemm, batch_invariant, logit_softcap,
    )  # fmt: skip
    if torch.compiler.is_compiling():  # one opaque op in the graph: see engine/compile_ops.py
        return compile_ops.selective_logprobs(call)
    return run_logprobs(call)
