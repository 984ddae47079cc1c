"""Public ``grpo_loss`` and ``GRPOLoss``: the GRPO objective from hidden states, never the [N, V] logits."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .config import GRPOConfig
from .engine import compile_ops
from .engine.plan import LossCall, run_loss


def grpo_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    mask: Tensor,
    advantages: Tensor,
    old_logp: Tensor | None = None,
    ref_logp: Tensor | None = None,
    bias: Tensor | None = None,
    config: GRPOConfig | None = None,
    num_items_in_batch: int | float | Tensor | None = None,
    *,
    seq_ids: Tensor | None = None,
    sampling_logp: Tensor | None = None,
    importance_sampling_ratio: Tensor | None = None,
    entropy_gather: Callable[[Tensor], Tensor] | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
    process_group: object | None = None,
    vocab_start: int | None = None,
    batch_invariant: bool = False,
    sequence_group: object | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO loss of TRL's GRPOTrainer and its metrics, with gradients to hidden, weight and bias.

    hidden ``[B, T, H]`` with targets/mask/old_logp/ref_logp ``[B, T]``, or packed ``[N, H]`` with ``[N]``
    tensors and ``seq_ids [N]`` (sequence of each token); weight ``[V, H]``; advantages ``[B]``.
    ``num_items_in_batch`` is the dapo/cispo normalizer (unmasked tokens of the global batch); default:
    this batch's. Masked positions may hold any target id. Returns ``(loss, metrics)``, metrics a dict
    of 0-dim tensors: kl, entropy, clip_ratio_low, clip_ratio_high, clip_ratio_region, and
    cispo_clip_ratio (cispo) or vespo/phi_seq_mean (vespo).

    Vocab-parallel: with ``process_group``, ``weight`` (and ``bias``) hold this rank's rows of the head,
    ``[vocab_start, vocab_start + V_r)`` (default: shards in rank order); every other input is the same
    on all ranks. Loss, metrics and the hidden gradient come out identical on every rank, the weight
    gradient is the local shard's.

    Sequence-parallel: with ``sequence_group`` (a ProcessGroup), the ranks of the group share the same B
    sequences (the same ``advantages``, and the same config) and each passes its own tokens of them:
    hidden/targets/mask/old_logp/ref_logp/... of those tokens, ``[B, T_r, H]`` (row b: this rank's
    tokens of sequence b) or packed ``[N_r, H]`` with ``seq_ids`` into the B sequences; a rank may hold
    no token of a sequence, or none at all, but every rank calls. The loss is this rank's share: the
    group's losses add up to the loss of the whole sequences, and the gradients (hidden's rows, and
    weight/bias summed over the group) are that loss's: the group talks inside the call only (the
    backward is local), so every rank of a group scales its loss alike. The metrics are the whole
    sequences' values, the same on every rank of the group: a trainer counts them once per group (e.g.
    weighs each rank's by its own unmasked tokens, whose sum over the group is the sequences').
    ``num_items_in_batch``, given, counts the whole sequences' tokens; ``entropy_gather``, given, must
    pool the group's ranks too (default with a group: the group's entropies). Not with ``process_group``
    or under ``torch.compile``.

    TRL 1.16's other loss options: ``advantages`` may be per token, ``[B, T]`` (padded layout);
    ``config.top_entropy_quantile`` < 1 trains on the batch's highest-entropy tokens only (their threshold
    from every process's entropies when ``entropy_gather`` maps this process's 1-D tensor to everyone's);
    ``config.off_policy_mask_threshold`` drops negative-advantage sequences whose mean KL from the sampler
    (``sampling_logp``, default ``old_logp``; NaN: unscored) exceeds it; ``importance_sampling_ratio`` (per
    token, or per sequence ``[B, 1]``) multiplies the policy term (VESPO: inside phi), as TRL's vLLM
    correction; ``config.entropy_coef`` subtracts ``entropy_coef * mean H`` with its gradient. Their metrics
    come from the same pass: ``clip_ratio_low_min``/``clip_ratio_high_max``, ``policy_loss`` (with a bonus),
    ``entropy_mask/tokens`` and ``entropy_mask/entropy`` (with the quantile).

    ``batch_invariant=True``: every logits GEMM has one shape (128 rows, the last one padded), so a
    token's log-prob, entropy and loss terms are bitwise the same whatever batch, padding, packing or
    ``chunk_size`` it comes with, and equal to ``selective_logprobs(..., batch_invariant=True)``'s: old
    log-probs from it give a ratio of exactly 1 on an on-policy step. Gradients are run-to-run identical.
    """
    call = LossCall(
        hidden, weight, targets, mask, advantages, old_logp, ref_logp, bias, config, num_items_in_batch,
        seq_ids, sampling_logp, importance_sampling_ratio, entropy_gather, backend, chunk_size,
        process_group, vocab_start, batch_invariant, sequence_group,
    )  # fmt: skip
    if torch.compiler.is_compiling():  # one opaque op in the graph: see engine/compile_ops.py
        return compile_ops.grpo_loss(call)
    return run_loss(call)


class GRPOLoss(nn.Module):
    """``grpo_loss`` with its config (and backend/chunk size) held by the module."""

    def __init__(
        self,
        config: GRPOConfig | None = None,
        *,
        backend: str = "auto",
        chunk_size: int | None = None,
        process_group: object | None = None,
        batch_invariant: bool = False,
        sequence_group: object | None = None,
    ):
        super().__init__()
        self.config = config if config is not None else GRPOConfig()
        self.backend = backend
        self.chunk_size = chunk_size
        self.process_group = process_group
        self.batch_invariant = batch_invariant
        self.sequence_group = sequence_group

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        mask: Tensor,
        advantages: Tensor,
        old_logp: Tensor | None = None,
        ref_logp: Tensor | None = None,
        bias: Tensor | None = None,
        num_items_in_batch: int | float | Tensor | None = None,
        seq_ids: Tensor | None = None,
        sampling_logp: Tensor | None = None,
        importance_sampling_ratio: Tensor | None = None,
        entropy_gather: Callable[[Tensor], Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return grpo_loss(
            hidden,
            weight,
            targets,
            mask,
            advantages,
            old_logp,
            ref_logp,
            bias,
            self.config,
            num_items_in_batch,
            seq_ids=seq_ids,
            sampling_logp=sampling_logp,
            importance_sampling_ratio=importance_sampling_ratio,
            entropy_gather=entropy_gather,
            backend=self.backend,
            chunk_size=self.chunk_size,
            process_group=self.process_group,
            batch_invariant=self.batch_invariant,
            sequence_group=self.sequence_group,
        )

    def extra_repr(self) -> str:
        return f"{self.config}, backend={self.backend!r}, batch_invariant={self.batch_invariant}"


__all__ = ["grpo_loss", "GRPOLoss"]
