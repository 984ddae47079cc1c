"""Public ``selective_logprobs``: per-token log-probs (and entropy) from hidden states and the LM head."""

from __future__ import annotations

from torch import Tensor

from . import backends
from .chunking import resolve_chunk_size
from .fused import FusedLogprobs, LogprobPlan
from .parallel import setup_shard, shared_chunk_size
from .validation import check_lm_head, check_targets, check_temperature


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
) -> Tensor | tuple[Tensor, Tensor]:
    """``log_softmax((hidden @ weight.T + bias) / temperature)[targets]`` without the ``[N, V]`` logits.

    hidden ``[..., H]``, weight ``[V, H]``, targets ``[...]`` ids in ``[0, V)``. Returns fp32 log-probs of
    targets' shape, and the fp32 entropy too with ``return_entropy=True``. Gradients flow to hidden,
    weight and bias through the log-probs (recomputed chunk by chunk in backward); the entropy is a metric
    and carries no gradient.

    With ``process_group``, weight/bias are this rank's vocabulary shard (see ``grpo_loss``).
    """
    weight, bias = check_lm_head(hidden, weight, bias)
    temperature = check_temperature(temperature)
    shard = setup_shard(process_group, hidden, weight, bias, vocab_start)
    targets = check_targets(targets, hidden.shape[:-1], shard.vocab if shard is not None else weight.shape[0])
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device} but hidden is on {hidden.device}")
    name = backends.resolve(backend, hidden.device, "selective_logprobs")
    flat = hidden.reshape(-1, hidden.shape[-1])
    ops = backends.chunk_ops(name)
    chunk = resolve_chunk_size(
        chunk_size, flat.shape[0], weight.shape[0], hidden.dtype, hidden.device, ops.fp32_temps
    )
    local_targets = targets.reshape(-1).long() - (shard.start if shard is not None else 0)
    chunk = shared_chunk_size(chunk, shard, hidden.device)
    plan = LogprobPlan(local_targets, temperature, ops, chunk, shard)
    logp, entropy = FusedLogprobs.apply(flat, weight, bias, plan)
    logp = logp.reshape(targets.shape)
    return (logp, entropy.reshape(targets.shape)) if return_entropy else logp
