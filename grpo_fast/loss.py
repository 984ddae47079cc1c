"""Public ``grpo_loss`` and ``GRPOLoss``: the GRPO objective from hidden states, never the [N, V] logits."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .config import GRPOConfig
from .engine.chunk_loop import FusedGRPOLoss, LossPlan
from .engine.objective import TokenBatch, metric_names, segment_sum
from .engine.setup import check_batch_invariant, open_head
from .engine.validation import validate_loss_inputs


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
    if torch.compiler.is_compiling():  # one opaque op in the graph: see engine/compiled.py
        from .engine import compiled

        return compiled.grpo_loss(
            hidden, weight, targets, mask, advantages, old_logp, ref_logp, bias, config, num_items_in_batch,
            seq_ids=seq_ids, sampling_logp=sampling_logp, importance_sampling_ratio=importance_sampling_ratio,
            entropy_gather=entropy_gather, backend=backend, chunk_size=chunk_size,
            process_group=process_group, vocab_start=vocab_start, batch_invariant=batch_invariant,
        )  # fmt: skip
    h, weight, bias, plan = plan_loss(
        hidden,
        weight,
        targets,
        mask,
        advantages,
        old_logp,
        ref_logp,
        bias,
        config,
        num_items_in_batch,
        seq_ids=seq_ids,
        sampling_logp=sampling_logp,
        importance_sampling_ratio=importance_sampling_ratio,
        entropy_gather=entropy_gather,
        backend=backend,
        chunk_size=chunk_size,
        process_group=process_group,
        vocab_start=vocab_start,
        batch_invariant=batch_invariant,
    )
    return run_loss_plan(h, weight, bias, plan)


def plan_loss(
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
) -> tuple[Tensor, Tensor, Tensor | None, LossPlan]:
    """Validate once, then shard, resolve the backend and the tile size: what :func:`run_loss_plan` runs."""
    cfg = config if config is not None else GRPOConfig()
    head = open_head(hidden, weight, bias, process_group, vocab_start)
    inputs, weight, bias = validate_loss_inputs(
        hidden,
        head.weight,
        targets,
        mask,
        advantages,
        old_logp,
        ref_logp,
        head.bias,
        cfg,
        num_items_in_batch,
        seq_ids,
        vocab=head.vocab,
        sampling_logp=sampling_logp,
        importance_sampling_ratio=importance_sampling_ratio,
    )
    num_seqs = inputs.advantages.shape[0]
    seq_len = segment_sum(inputs.mask, inputs.seq_ids, num_seqs)

    # Masked tokens never reach the loss: drop them before the GEMMs (their hidden grad stays 0).
    keep = (inputs.mask != 0).nonzero().squeeze(1)
    compact = keep.numel() < inputs.mask.numel()
    pick = (lambda x: x.index_select(0, keep)) if compact else (lambda x: x)  # noqa: E731
    seq_ids, mask = pick(inputs.seq_ids), pick(inputs.mask)
    token_adv = inputs.token_advantages
    batch = TokenBatch(
        seq_ids=seq_ids,
        mask=mask,
        adv=inputs.advantages[seq_ids] if token_adv is None else pick(token_adv),
        old_logp=pick(inputs.old_logp) if inputs.old_logp is not None else None,
        ref_logp=pick(inputs.ref_logp) if inputs.ref_logp is not None else None,
        seq_adv=inputs.advantages,
        seq_len=seq_len,
        items=seq_len.sum() if inputs.num_items is None else inputs.num_items.to(seq_len),
        token_adv=token_adv is not None,
        sampling_logp=pick(inputs.sampling_logp) if inputs.sampling_logp is not None else None,
        is_ratio=pick(inputs.is_ratio) if inputs.is_ratio is not None else None,
    )
    h = pick(inputs.hidden)
    _, ops, chunk, pad = head.plan(
        "grpo_loss",
        backend,
        h.shape[0],
        h.dtype,
        h.device,
        chunk_size,
        check_batch_invariant(batch_invariant),
        softcap=cfg.logit_softcap is not None,
    )
    targets = head.local_targets(pick(inputs.targets))
    if entropy_gather is not None and not callable(entropy_gather):
        raise TypeError(f"entropy_gather must be callable, got {type(entropy_gather).__name__}")
    rows = keep if compact else None
    plan = LossPlan(targets, batch, cfg, ops, chunk, head.shard, pad, rows, entropy_gather)
    return h, weight, bias, plan


def run_loss_plan(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, plan: LossPlan
) -> tuple[Tensor, dict[str, Tensor]]:
    """Run what :func:`plan_loss` set up (the engine entry point; benchmarks swap ``plan.ops`` here)."""
    loss, metric_vec = FusedGRPOLoss.apply(hidden, weight, bias, plan)
    return loss, dict(zip(metric_names(plan.cfg), metric_vec.unbind(0), strict=True))


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
    ):
        super().__init__()
        self.config = config if config is not None else GRPOConfig()
        self.backend = backend
        self.chunk_size = chunk_size
        self.process_group = process_group
        self.batch_invariant = batch_invariant

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
        )

    def extra_repr(self) -> str:
        return f"{self.config}, backend={self.backend!r}, batch_invariant={self.batch_invariant}"


__all__ = ["grpo_loss", "GRPOLoss", "plan_loss", "run_loss_plan"]
