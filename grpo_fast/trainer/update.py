"""The optimizer updates of a step: ``num_iterations`` passes over the batch's micro-batches, each loss
from ``gf.grpo_loss`` on the backbone's hidden states (no logits formed), gradients accumulated (and
shared by the ranks), clipped, then an AdamW step on a warm-up + cosine schedule.

With several processes each rank's loss is scaled so that the summed gradient is that of one process
on the whole batch; see :mod:`grpo_fast.trainer.distributed`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import grpo_fast as gf
from grpo_fast.engine.objective import averaged_over_sequences, metric_names

from ..integrations.hf import lm_head, match_head_dtype
from . import distributed, sequence, sharding
from .config import TrainConfig
from .generation import Rollout
from .rollout import StepBatch, completion_states, pack_pass, packed_states


def cosine_schedule(warmup: int, total: int, min_ratio: float):
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total`` updates."""

    def factor(update: int) -> float:
        if update < warmup:
            return (update + 1) / (warmup + 1)
        progress = min(1.0, (update - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    # Matrices decay; norms and biases do not (the usual AdamW recipe).
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
    )


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    total_updates = cfg.max_steps * cfg.num_iterations
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_schedule(cfg.warmup_steps, total_updates, cfg.min_lr_ratio)
    )


def loss_share(
    loss_cfg: gf.GRPOConfig, rows: float, tokens: float, micro_rows: float, micro_tokens: float
) -> float:
    """A pass's loss on ``rows`` rows (``tokens`` loss tokens) of a micro-batch, times this, is its part of
    the micro-batch's loss (``micro_rows``/``micro_tokens`` over every rank and pass): the part a rank
    holds, or one forward of a micro-batch split by max_tokens_per_microbatch."""
    if loss_cfg.uses_num_items_in_batch:  # already divided by the whole batch's token count
        return 1.0
    if loss_cfg.normalizer == "batch_tokens":  # a token mean over the micro-batch
        return max(tokens, 1.0) / max(micro_tokens, 1.0)
    # sequence_mean, sequence_sum, fixed_length: a mean over the micro-batch's sequences
    return rows / micro_rows


class MetricMeans:
    """Token-weighted means of grpo_loss's metrics over micro-batches and iterations."""

    RENAME = {"clip_ratio_region": "clip_ratio"}  # the headline clip metric gets the short name

    # Reported for the first update of a step only: the noise of scoring the same tokens in two batches.
    FIRST_UPDATE_ONLY = ("ratio_not_one",)
    # Extremes, not means: the min (sign -1) or max (+1) over micro-batches and ranks, NaN ignored.
    EXTREMES = {"clip_ratio_low_min": -1.0, "clip_ratio_high_max": 1.0}

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.weight = 0.0
        self.extremes: dict[str, float] = {}  # sign * value, max-reduced; -inf: none yet
        self.declared: set[str] = set()

    def add(
        self,
        metrics: dict[str, Tensor],
        weight: float,
        weights: dict[str, float] | None = None,
        first_update: bool = True,
    ) -> None:
        """``weights`` overrides the weight of some metrics (their total weight is still ``weight``)."""
        for key, value in metrics.items():
            if key in self.FIRST_UPDATE_ONLY and not first_update:
                continue
            if key in self.EXTREMES:
                v = self.EXTREMES[key] * float(value)
                best = self.extremes.get(key, float("-inf"))
                self.extremes[key] = best if math.isnan(v) else max(best, v)
                continue
            w = weights.get(key, weight) if weights else weight
            self.sums[key] = self.sums.get(key, 0.0) + float(value) * w
            self.weights[key] = self.weights.get(key, 0.0) + weight
        self.weight += weight

    def declare(self, names: list[str]) -> None:
        """Report ``names`` even when no pass adds them (NaN then): every rank reduces the same keys."""
        self.declared.update(names)
        for key in names:
            if key in self.EXTREMES:
                self.extremes.setdefault(key, float("-inf"))
            else:
                self.sums.setdefault(key, 0.0)
                self.weights.setdefault(key, 0.0)

    def means(self) -> dict[str, float]:
        out = {self.RENAME.get(k, k): v / max(self.weights[k], 1e-12) for k, v in self.sums.items()}
        for k in self.declared:  # no token measured them (on any process, once the weights are summed)
            if k in self.weights and self.weights[k] == 0:
                out[self.RENAME.get(k, k)] = float("nan")
        for k, v in self.extremes.items():
            out[k] = self.EXTREMES[k] * v if v != float("-inf") else float("nan")
        return out


@dataclass
class UpdateStats:
    """What the updates of a step report; with several processes, this rank's parts (summed later)."""

    losses: list[float] = field(default_factory=list)  # one per update
    grad_norms: list[float] = field(default_factory=list)
    metrics: MetricMeans = field(default_factory=MetricMeans)


class UpdateMixin:
    """The policy's loss and optimizer updates; the Trainer sets these attributes."""

    cfg: TrainConfig
    device: torch.device
    group: distributed.Group
    model: nn.Module
    ddp: DistributedDataParallel | None
    sharded: bool
    sp: distributed.Group | None
    bf16: bool
    loss_config: gf.GRPOConfig
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR

    def policy_loss(
        self,
        rows: Rollout,
        loss_mask: Tensor,
        advantages: Tensor,
        old: Tensor | None,
        ref: Tensor | None,
        num_items: Tensor,
        num_micro: int = 1,
        bonus_scale: float = 1.0,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """grpo_loss of one micro-batch (one of ``num_micro`` in the update), or of one pass of it with
        ``bonus_scale`` (see :meth:`_micro_config`). With sequence parallelism, called inside
        :func:`sequence.attention <grpo_fast.trainer.sequence.attention>`."""
        # --offload-activations: what autograd saves for the backbone's backward waits in host memory
        # (pinned on CUDA) instead of on the device; the loss keeps no activations of its own.
        offload = (
            torch.autograd.graph.save_on_cpu(pin_memory=self.device.type == "cuda")
            if self.cfg.offload_activations
            else contextlib.nullcontext()
        )
        targets, seq_ids = rows.completion_ids, None
        with offload:
            if self.cfg.padding_free:  # the rows' real tokens only, the loss's inputs packed to match
                packing = pack_pass(self.model, rows, self.sp)  # or this rank's slice of them
                hidden = packed_states(self.model, packing, self.bf16, through=self.ddp)
                targets, loss_mask, seq_ids = packing.take(targets), packing.take(loss_mask), packing.seq_ids
                old = packing.take(old) if old is not None else None
                ref = packing.take(ref) if ref is not None else None
            else:
                hidden = completion_states(self.model, rows, self.bf16, through=self.ddp)
        # Under FSDP2 the root's forward has just gathered the head: this is the full weight.
        weight, bias = match_head_dtype(hidden, *lm_head(self.model))
        # Sequence parallelism: this rank's tokens of the rows the group shares; the loss is its share.
        group = {} if self.sp is None else {"sequence_group": self.sp.pg}
        return gf.grpo_loss(
            hidden,
            weight,
            targets,
            loss_mask,
            advantages,
            old,
            ref,
            bias,
            config=self._micro_config(num_micro, bonus_scale),
            num_items_in_batch=num_items,
            seq_ids=seq_ids,
            backend=self.cfg.backend,
            chunk_size=self.cfg.chunk_size,
            batch_invariant=self.cfg.batch_invariant,
            **group,
        )

    def _micro_config(self, num_micro: int, bonus_scale: float = 1.0) -> gf.GRPOConfig:
        """The loss config of one micro-batch. The entropy bonus is a mean over the micro-batch's tokens,
        scaled for accumulation only (as TRL's): losses over the whole batch's token count are not divided
        by the number of micro-batches afterwards, so their bonus is divided here. A pass over part of the
        micro-batch (a rank's rows, a token-budget chunk) has its loss scaled by its share of the
        micro-batch; ``bonus_scale`` = (its tokens / the micro-batch's) / share keeps the bonus a token
        mean over the whole micro-batch."""
        cfg = self.loss_config
        if cfg.entropy_coef == 0.0:
            return cfg
        coef = cfg.entropy_coef
        if cfg.uses_num_items_in_batch and num_micro > 1:
            coef = coef / num_micro
        if bonus_scale != 1.0:
            coef = coef * bonus_scale
        return cfg if coef == cfg.entropy_coef else dataclasses.replace(cfg, entropy_coef=coef)

    def update(self, batch: StepBatch) -> UpdateStats:
        """``num_iterations`` optimizer updates on the batch."""
        cfg, group, layout = self.cfg, self.group, batch.layout
        out, loss_mask, advantages, old, ref = (
            batch.out,
            batch.loss_mask,
            batch.advantages,
            batch.old,
            batch.ref,
        )
        loss_cfg = cfg.loss_config()
        local_tokens = [float(loss_mask[index].sum()) for index in batch.micro]
        # The ranks of a sequence-parallel group hold the same rows: counted once.
        size = cfg.sequence_parallel_size
        micro_tokens = (group.sum(torch.tensor(local_tokens, dtype=torch.float64)) / size).tolist()
        num_items = (
            torch.tensor(sum(micro_tokens), dtype=torch.float32, device=self.device)
            if group.active
            else loss_mask.sum().float()
        )
        # Losses divided by the whole batch's token count add up; the others average per micro-batch (as TRL).
        accumulate = 1.0 if loss_cfg.uses_num_items_in_batch else float(len(batch.micro))
        passes = []  # (micro-batch, rows, share of its loss, bonus scale, tokens, sequence-metric weight)
        for j, chunks in enumerate(batch.chunks):
            micro_rows = float(len(layout.micro[j]))
            for index in chunks:
                tokens = float(loss_mask[index].sum())
                share = loss_share(loss_cfg, float(len(index)), tokens, micro_rows, micro_tokens[j])
                bonus = tokens / micro_tokens[j] / share if tokens > 0 else 1.0  # (no tokens: no bonus)
                seq_weight = len(index) / micro_rows * micro_tokens[j]
                passes.append((j, index, share, bonus, tokens, seq_weight))

        stats = UpdateStats()
        if batch.skipped is not None:  # a rank may train on no row at all
            stats.metrics.declare(metric_names(self.loss_config))
        for iteration in range(cfg.num_iterations):
            total, backward = 0.0, False
            for k, (j, index, share, bonus, tokens, seq_weight) in enumerate(passes):
                if not len(index) and not group.active:  # every row skipped; no other process waits
                    continue
                last = k == len(passes) - 1
                # DDP: all-reduce the gradients once, after the update's last backward (FSDP2
                # reduce-scatters after each one: no unsharded gradients are kept).
                sync = self.ddp is None or last
                if self.sharded:  # the head stays gathered until the update's last backward
                    sharding.keep_head_gathered(self.model, not last)
                # An empty pass (FSDP2: another rank needs this forward) runs one row at weight 0.
                rows = index if len(index) else batch.micro[j][:1]
                # Sequence parallelism: Ulysses attention until the backward is done (gradient checkpointing
                # runs the forwards again there).
                with (
                    contextlib.nullcontext() if sync else self.ddp.no_sync(),
                    sequence.attention(self.model, self.sp),
                ):
                    loss, metrics = self.policy_loss(
                        out.rows(rows),
                        loss_mask[rows],
                        advantages[rows],
                        old[rows] if old is not None else None,
                        ref[rows] if ref is not None else None,
                        num_items,
                        len(batch.micro),
                        bonus,
                    )
                    # This pass's part of the micro-batch's loss; DDP/FSDP average over ranks: * world (with
                    # sequence parallelism the loss is the rank's share of the pass's: the group's add up).
                    weight = share * group.world if len(index) else 0.0
                    ((loss * weight) / accumulate).backward()
                backward = True
                if not len(index):
                    continue
                total += loss.item() * share / accumulate
                # Metrics are token means of each pass, but some (sequence-level ratios, VESPO's phi) are
                # averaged over sequences (weight: the pass's share of them, times the tokens), and the
                # policy loss is, like the loss, the sum of the passes' shares of it.
                if self.sp is not None and self.sp.rank > 0:  # the group's metrics, counted by its first rank
                    stats.metrics.declare(list(metrics))
                    continue
                weights = {k: seq_weight for k in metrics if averaged_over_sequences(k, self.loss_config)}
                if "policy_loss" in metrics:
                    weights["policy_loss"] = micro_tokens[j] * share
                stats.metrics.add(metrics, tokens, weights, first_update=iteration == 0)
            if not backward:  # every completion skipped: the update of an all-zero gradient, as unskipped
                self._zero_grads()
            stats.grad_norms.append(self._optimizer_step())
            stats.losses.append(total)
        return stats

    def _zero_grads(self) -> None:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)

    def _optimizer_step(self) -> float:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else math.inf
        norm = float(sharding.full_value(torch.nn.utils.clip_grad_norm_(params, max_norm)))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm
