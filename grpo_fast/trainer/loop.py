"""The GRPO loop: sample G completions per prompt, score them, and update the policy with ``gf.grpo_loss``.

One *step* samples ``prompts_per_step * num_generations`` completions and makes ``num_iterations``
optimizer updates on them, each over ``gradient_accumulation_steps`` micro-batches. The LM head's
logits are never formed: old/reference log-probs come from ``gf.selective_logprobs`` and the loss
from ``gf.grpo_loss``, both on the backbone's final hidden states and the head weight.

Failure policy: a reward function that raises or returns bad output skips its step (no update,
a warning naming the function); after ``max_reward_failures`` such steps in a row the run saves
a checkpoint and stops with :class:`RewardError`, so ``--resume`` continues once it is fixed.

Under ``torchrun`` (or with torch.distributed initialised by the caller) the step's completions are
shared by the ranks and the model is wrapped in DDP or sharded with FSDP2 (``parallelism``); see
:mod:`grpo_fast.trainer.distributed` for how the update stays that of one process on the same global
batch, and :mod:`grpo_fast.trainer.sharding` for FSDP2.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import math
import random
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import grpo_fast as gf

from ..integrations.hf import (
    HIDDEN_KWARG,
    add_hidden_forward,
    completion_hidden,
    lm_head,
    match_head_dtype,
    unsupported_head,
)
from . import checkpoint as ckpt
from . import distributed, sharding
from .config import DEMO, TrainConfig
from .data import PromptDataset, PromptSampler, load_prompts, repeat_each
from .generation import Rollout, context_length, encode_prompts, prompt_text, sample
from .models import disable_dropout, enable_checkpointing, load_model_and_tokenizer, resolve_device
from .reporting import PLOT_FILE, MetricsLog, Progress, format_samples, peak_memory_mb, plot_metrics
from .rewards import RewardError, RewardFn, load_reward, reward_name, score, weighted_sum

# Options that may differ on --resume without changing the run's numbers (others are reported).
RESUME_FREE = {
    "progress",
    "print_completions_every",
    "num_completions_to_print",
    "save_every",
    "save_total_limit",
    "max_reward_failures",
    "output_dir",
    "device",
    "num_threads",
    "parallelism",
}


@dataclass
class TrainResult:
    steps: int  # steps completed in total (a resumed run counts the earlier ones)
    interrupted: bool
    checkpoint: Path | None
    metrics_path: Path
    plot_path: Path | None


def cosine_schedule(warmup: int, total: int, min_ratio: float):
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total`` updates."""

    def factor(update: int) -> float:
        if update < warmup:
            return (update + 1) / (warmup + 1)
        progress = min(1.0, (update - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed % 2**32)


class Trainer:
    """A thin GRPO trainer. Objects given here replace the config's ``model``/``dataset``/``rewards``."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        model: nn.Module | None = None,
        tokenizer: Any = None,
        dataset: Any = None,
        reward_funcs: Sequence[RewardFn] | None = None,
    ):
        self.cfg = cfg = config
        if distributed.init_from_env(cfg.device):  # torchrun, used as a library: the CLI destroys its own
            atexit.register(distributed.destroy)
        self.device = distributed.rank_device(resolve_device(cfg.device))
        self.group = distributed.Group(self.device)
        if cfg.num_threads is not None:
            torch.set_num_threads(cfg.num_threads)
        seed_everything(cfg.seed + self.group.rank)
        # Cheap checks first: a typo in a reward name should not wait for a model to load.
        self._setup_rewards(reward_funcs)
        self._setup_model(model, tokenizer)
        self._setup_data(dataset)
        # Several processes: every micro-batch must give each of them a completion (fails now, not later).
        distributed.Layout.build(
            cfg.prompts_per_step * cfg.num_generations,
            cfg.gradient_accumulation_steps,
            self.group.world,
            self.group.rank,
        )
        self.loss_config = cfg.loss_config()
        self.optimizer = self._make_optimizer()
        total_updates = cfg.max_steps * cfg.num_iterations
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_schedule(cfg.warmup_steps, total_updates, cfg.min_lr_ratio)
        )
        self.bf16 = (
            cfg.bf16
            if cfg.bf16 is not None
            else (self.device.type == "cuda" and torch.cuda.is_bf16_supported())
        )
        self.run_dir = Path(cfg.output_dir)
        self.metrics = MetricsLog(self.run_dir)
        self.step = 0
        self.last_samples: tuple[list, list, list] = ([], [], [])  # prompts, completions, rewards
        self._stop_requested = False
        self._warned: set[str] = set()

    # ----- set-up -------------------------------------------------------------------------------------
    def _setup_rewards(self, reward_funcs: Sequence[RewardFn] | None) -> None:
        cfg = self.cfg
        self.reward_funcs = (
            list(reward_funcs) if reward_funcs is not None else [load_reward(s) for s in cfg.rewards]
        )
        if not self.reward_funcs:
            raise ValueError(
                "no reward function: pass --reward module:function (TRL's signature "
                "f(prompts, completions, **columns) -> list[float | None])"
            )
        weights = cfg.reward_weights or [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(weights)} values for {len(self.reward_funcs)} reward functions"
            )
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        self.reward_names = [reward_name(f) for f in self.reward_funcs]

    def _setup_model(self, model: nn.Module | None, tokenizer: Any) -> None:
        cfg = self.cfg
        if model is None:
            model, loaded_tokenizer = load_model_and_tokenizer(cfg.model, seed=cfg.seed)
            tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        if tokenizer is None:
            raise ValueError("a model object needs its tokenizer: Trainer(config, model=..., tokenizer=...)")
        if tokenizer.pad_token_id is None:
            raise ValueError(
                "the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos_token)"
            )
        reason = unsupported_head(model)
        if reason is not None:
            raise ValueError(f"grpo_fast cannot train this model: {reason}")
        self.model, self.tokenizer = model.to(self.device).train(), tokenizer
        disable_dropout(self.model)
        if cfg.freeze_lm_head:
            lm_head(self.model)[0].requires_grad_(False)
        if cfg.gradient_checkpointing:
            enable_checkpointing(self.model)
        # The reference is the policy as it starts; built before any --resume loads later weights.
        self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False) if cfg.beta > 0 else None
        # Several processes: the loss's forward goes through DDP (its gradient hooks), asking for the
        # backbone's hidden states; generation and the no-grad log-probs use the bare model. FSDP2
        # shards policy and reference in place; every forward then goes through the model's own hooks.
        self.ddp: DistributedDataParallel | None = None
        self.sharded = self.group.active and cfg.parallelism == "fsdp"
        if self.sharded:
            for m in (self.model, self.ref_model):
                if m is not None:
                    add_hidden_forward(m)
                    sharding.shard(m, self.device)
        elif self.group.active:
            add_hidden_forward(self.model)
            self.ddp = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,
                # The LM head gets its gradient from grpo_loss, outside the module's forward graph.
                find_unused_parameters=False,
            )

    def _setup_data(self, dataset: Any) -> None:
        cfg = self.cfg
        source = dataset if dataset is not None else cfg.dataset
        if source is None:
            raise ValueError("no dataset: pass --dataset (a JSONL file or hub id), or use --model demo")
        self.data: PromptDataset = load_prompts(
            source, prompt_column=cfg.prompt_column, split=cfg.dataset_split, seed=cfg.seed
        )
        self._check_prompt_lengths()
        self.sampler = PromptSampler(len(self.data), cfg.prompts_per_step, cfg.seed)

    def _check_prompt_lengths(self, chunk: int = 512) -> None:
        """Every prompt must leave room for max_completion_length in the context: tell now, not mid-run."""
        prompts, context = self.data.prompts(), context_length(self.model)
        for start in range(0, len(prompts), chunk):
            texts = [prompt_text(self.tokenizer, p) for p in prompts[start : start + chunk]]
            encode_prompts(
                self.tokenizer,
                texts,
                list(range(start, start + len(texts))),
                context=context,
                max_completion_length=self.cfg.max_completion_length,
                source=self.data.source,
            )

    def _make_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        # Matrices decay; norms and biases do not (the usual AdamW recipe).
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": self.cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(
            [g for g in groups if g["params"]],
            lr=self.cfg.learning_rate,
            betas=(self.cfg.adam_beta1, self.cfg.adam_beta2),
            eps=self.cfg.adam_epsilon,
        )

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ----- one step -----------------------------------------------------------------------------------
    def rollout(
        self, indices: list[int], select: Tensor | None = None
    ) -> tuple[list[dict[str, Any]], Rollout]:
        """Prompt rows of ``indices`` and a completion for each of the ``len(indices) * G`` rows in
        ``select`` (default: all of them; several processes each generate their share)."""
        cfg, G = self.cfg, self.cfg.num_generations
        rows = [self.data[i] for i in indices]
        prompts = [self.data.prompt(r) for r in rows]
        texts = [prompt_text(self.tokenizer, p) for p in prompts]
        ids, mask = encode_prompts(
            self.tokenizer,
            texts,
            indices,
            context=context_length(self.model),
            max_completion_length=cfg.max_completion_length,
            source=self.data.source,
        )
        # Padded to the longest prompt of the whole step on every rank: a row's numbers do not
        # depend on which rank generates it.
        ids, mask = ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)
        select = torch.arange(ids.shape[0]) if select is None else select
        if len(select) != ids.shape[0]:
            ids, mask = ids[select], mask[select]
        out = self.generate(
            ids.to(self.device), mask.to(self.device), not isinstance(prompts[0], str), select
        )
        return rows, out

    def generate(
        self, prompt_ids: Tensor, prompt_mask: Tensor, conversational: bool, rows: Tensor
    ) -> Rollout:
        """One sampled completion per row; ``rows`` are their ids in the step's batch of N completions."""
        cfg = self.cfg
        with self._autocast():
            return sample(
                self.model,
                self.tokenizer,
                prompt_ids,
                prompt_mask,
                max_completion_length=cfg.max_completion_length,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                top_k=cfg.top_k,
                repetition_penalty=cfg.repetition_penalty,
                conversational=conversational,
                synced=self.sharded,
            )

    def rewards(self, rows: list[dict[str, Any]], out: Rollout, select: Tensor | None = None) -> Tensor:
        """Rewards ``[n, R]`` of the rollout's completions (rows ``select`` of the step's N)."""
        G = self.cfg.num_generations
        prompts = repeat_each([self.data.prompt(r) for r in rows], G)
        columns = {k: repeat_each(v, G) for k, v in self.data.columns(rows).items()}
        if select is not None and len(select) != len(prompts):
            pick = select.tolist()
            prompts = [prompts[i] for i in pick]
            columns = {k: [v[i] for i in pick] for k, v in columns.items()}
        ids = [c[m.bool()].tolist() for c, m in zip(out.completion_ids, out.completion_mask, strict=True)]
        return score(self.reward_funcs, prompts, out.completions, columns, completion_ids=ids)

    def _warn_not_applicable(self, values: Tensor) -> None:
        for j, name in enumerate(self.reward_names):
            if torch.isnan(values[:, j]).all() and name not in self._warned:
                self._warned.add(name)
                if self.group.is_main:
                    warnings.warn(
                        f"reward function {name!r} returned None/NaN for every completion of step "
                        f"{self.step + 1}: it applies to none of them (its weight is skipped)",
                        stacklevel=3,
                    )

    def _all_rewards(self, rows: list[dict[str, Any]], out: Rollout, layout: distributed.Layout) -> Tensor:
        """Rewards of all N completions, in step order; a failure on any rank fails the step on all."""
        if not self.group.active:
            values = self.rewards(rows, out)
            self._warn_not_applicable(values)
            return values
        error: RewardError | None = None
        try:
            values = self.rewards(rows, out, layout.local)
        except RewardError as err:
            error = err
        if self.group.any(error is not None):
            errors = self.group.gather_objects(None if error is None else (error.name, str(error)))
            if error is not None:
                raise error
            rank, (name, text) = next((r, e) for r, e in enumerate(errors) if e is not None)
            raise RewardError(name, f"failed on rank {rank}: {text}")
        values = self.group.gather_rows(values, layout)
        self._warn_not_applicable(values)
        return values

    def _hidden(self, model: nn.Module, rows: Rollout, through: nn.Module | None = None) -> Tensor:
        """Final hidden states of the completion positions, from ``model`` or a wrapper of it (DDP)."""
        num_completion = rows.completion_ids.shape[1]
        with self._autocast():
            if through is None and not sharding.is_sharded(model):
                return completion_hidden(model, rows.input_ids, rows.attention_mask, num_completion)
            out = (through or model)(
                input_ids=rows.input_ids, attention_mask=rows.attention_mask, **{HIDDEN_KWARG: True}
            )
        return out.last_hidden_state[:, -num_completion - 1 : -1]

    @torch.no_grad()
    def logprobs(self, model: nn.Module, out: Rollout, micro: list[Tensor]) -> Tensor:
        """Per-token log-probs ``[N, L]`` of the sampled completions under ``model`` (no logits formed)."""
        parts = []
        for index in micro:
            rows = out.rows(index)
            hidden = self._hidden(model, rows)
            weight, bias = match_head_dtype(hidden, *lm_head(model))
            parts.append(
                gf.selective_logprobs(
                    hidden,
                    weight,
                    rows.completion_ids,
                    bias,
                    self.cfg.temperature,
                    backend=self.cfg.backend,
                    chunk_size=self.cfg.chunk_size,
                )
            )
        return torch.cat(parts)

    def policy_loss(
        self,
        rows: Rollout,
        loss_mask: Tensor,
        advantages: Tensor,
        old: Tensor | None,
        ref: Tensor | None,
        num_items: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        hidden = self._hidden(self.model, rows, through=self.ddp)
        # Under FSDP2 the root's forward has just gathered the head: this is the full weight.
        weight, bias = match_head_dtype(hidden, *lm_head(self.model))
        return gf.grpo_loss(
            hidden,
            weight,
            rows.completion_ids,
            loss_mask,
            advantages,
            old,
            ref,
            bias,
            config=self.loss_config,
            num_items_in_batch=num_items,
            backend=self.cfg.backend,
            chunk_size=self.cfg.chunk_size,
        )

    def train_step(self) -> dict[str, Any]:
        """Sample, score, update; raises RewardError (before any update) if a reward function fails."""
        cfg, G, group = self.cfg, self.cfg.num_generations, self.group
        start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        indices = self.sampler.next_batch()
        layout = distributed.Layout.build(
            len(indices) * G, cfg.gradient_accumulation_steps, group.world, group.rank
        )
        if group.active:  # each rank samples differently, reproducibly from any checkpoint
            torch.manual_seed(distributed.step_seed(cfg.seed, self.step, group.rank))
        rows, out = self.rollout(indices, layout.local if group.active else None)
        rewards = self._all_rewards(rows, out, layout)  # all N completions: groups are normalised whole
        advantages = gf.group_advantages(rewards, G, cfg.scale_rewards, reward_weights=self.reward_weights)
        if group.active:
            advantages = advantages[layout.local]
        advantages = advantages.to(self.device)

        loss_mask = out.completion_mask
        if cfg.mask_truncated_completions:
            loss_mask = loss_mask * (~out.truncated).unsqueeze(1).long()
        micro = [index.to(self.device) for index in layout.local_micro()]
        # Later iterations see a moved policy; the first one's ratio is exactly 1, as in TRL.
        old = self.logprobs(self.model, out, micro) if cfg.num_iterations > 1 else None
        ref = None
        if self.ref_model is not None:
            ref = self.logprobs(self.ref_model, out, micro)
            sharding.release(self.ref_model)  # FSDP2: its embeddings and head, gathered, are not kept
        local_tokens = [float(loss_mask[index].sum()) for index in micro]
        if group.active:  # tokens of each micro-batch over all ranks; their sum is dapo's normaliser
            micro_tokens = group.sum(torch.tensor(local_tokens, dtype=torch.float64)).tolist()
            num_items = torch.tensor(sum(micro_tokens), dtype=torch.float32, device=self.device)
            shares = [self._share(j, layout, local_tokens[j], micro_tokens[j]) for j in range(len(micro))]
        else:
            num_items = loss_mask.sum().float()
        # dapo/cispo divide by the whole batch's tokens; the others average per micro-batch (as TRL does).
        accumulate = 1.0 if cfg.loss_type in ("dapo", "cispo") else float(len(micro))
        sequence_level = cfg.importance_sampling_level == "sequence"

        losses, grad_norms, stats = [], [], _Mean()
        for _ in range(cfg.num_iterations):
            total = 0.0
            for j, index in enumerate(micro):
                # DDP: all-reduce the gradients once, after the last micro-batch of the update
                # (FSDP2 reduce-scatters after each one: no unsharded gradients are kept).
                sync = self.ddp is None or j == len(micro) - 1
                if self.sharded:  # the head stays gathered until the update's last backward
                    sharding.keep_head_gathered(self.model, j < len(micro) - 1)
                with contextlib.nullcontext() if sync else self.ddp.no_sync():
                    loss, metrics = self.policy_loss(
                        out.rows(index),
                        loss_mask[index],
                        advantages[index],
                        old[index] if old is not None else None,
                        ref[index] if ref is not None else None,
                        num_items,
                    )
                    if not group.active:
                        (loss / accumulate).backward()
                        total += loss.item() / accumulate
                        stats.add(metrics, local_tokens[j])
                        continue
                    # This rank's part of the micro-batch's loss; DDP/FSDP average over ranks: * world.
                    share = shares[j]
                    (loss * (share * group.world / accumulate)).backward()
                    total += loss.item() * share / accumulate
                    # Metrics are token means of each micro-batch, but sequence-level ratios are
                    # averaged over sequences (weight: this rank's share of them, times the tokens).
                    seq_weight = len(layout.pieces[j][group.rank]) / len(layout.micro[j]) * micro_tokens[j]
                    stats.add(
                        metrics,
                        local_tokens[j],
                        {k: seq_weight for k in metrics if "clip_ratio" in k} if sequence_level else None,
                    )
            grad_norms.append(self._optimizer_step())
            losses.append(total)

        reward_total = weighted_sum(rewards, self.reward_weights)
        grouped_std = torch.nan_to_num(gf.reference.nanstd(reward_total.view(-1, G), dim=1), nan=0.0)
        completion_len = out.completion_mask.sum(1).float()
        len_sum, len_count = float(completion_len.sum()), float(completion_len.numel())
        truncated = float(out.truncated.float().sum())
        means = stats.means()
        if group.active:  # everything a row reports is over all ranks
            keys = sorted(stats.sums)
            packed = group.sum(
                torch.tensor(
                    [*losses, *(stats.sums[k] for k in keys), stats.weight, len_sum, len_count, truncated],
                    dtype=torch.float64,
                )
            ).tolist()
            losses = packed[: len(losses)]
            stats.sums = dict(zip(keys, packed[len(losses) : len(losses) + len(keys)], strict=True))
            stats.weight, len_sum, len_count, truncated = packed[len(losses) + len(keys) :]
            means = stats.means()
        elapsed = time.perf_counter() - start
        timing = torch.tensor([elapsed, peak_memory_mb(self.device)], dtype=torch.float64)
        elapsed, peak_mem = group.max(timing).tolist()
        row: dict[str, Any] = {
            "step": self.step + 1,
            "reward_mean": _nanmean(reward_total),
            "reward_std": float(gf.reference.nanstd(reward_total)),
            **{f"rewards/{name}": _nanmean(rewards[:, j]) for j, name in enumerate(self.reward_names)},
            "frac_reward_zero_std": float((grouped_std < 1e-8).float().mean()),
            "loss": sum(losses) / len(losses),
            **means,
            "grad_norm": sum(grad_norms) / len(grad_norms),
            "lr": self.scheduler.get_last_lr()[0],
            "completion_len": len_sum / len_count if group.active else float(completion_len.mean()),
            "truncated_frac": truncated / len_count if group.active else float(out.truncated.float().mean()),
            "tokens_per_s": len_sum / elapsed,
            "step_time_s": elapsed,
            "peak_mem_mb": peak_mem,
        }
        local_rewards = reward_total[layout.local] if group.active else reward_total
        prompts = repeat_each([self.data.prompt(r) for r in rows], G)
        self.last_samples = (
            [prompts[i] for i in layout.local.tolist()] if group.active else prompts,
            out.completions,
            local_rewards.tolist(),
        )
        return row

    def _share(self, j: int, layout: distributed.Layout, tokens: float, micro_tokens: float) -> float:
        """This rank's loss on micro-batch j times this is its part of the micro-batch's loss."""
        loss_type = self.cfg.loss_type
        if loss_type in ("dapo", "cispo"):  # already divided by the global token count
            return 1.0
        if loss_type == "bnpo":  # a token mean over the micro-batch
            return max(tokens, 1.0) / max(micro_tokens, 1.0)
        # grpo, sapo, luspo, dr_grpo: a mean over the micro-batch's sequences
        return len(layout.pieces[j][layout.rank]) / len(layout.micro[j])

    def _optimizer_step(self) -> float:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else math.inf
        norm = float(sharding.full_value(torch.nn.utils.clip_grad_norm_(params, max_norm)))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    # ----- the run ------------------------------------------------------------------------------------
    def save(self) -> Path:
        """Write a checkpoint: once, by rank 0 (under FSDP2 every rank first helps gather the whole state)."""
        self.group.barrier()
        path = self.run_dir / f"{ckpt.PREFIX}{self.step:06d}"
        gathered = ckpt.training_state(self.model, self.optimizer) if self.sharded else (None, None)
        if self.group.is_main:
            path = ckpt.save_checkpoint(
                self.run_dir,
                self.step,
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                tokenizer=self.tokenizer,
                keep=self.cfg.save_total_limit,
                weights=gathered[0],
                optimizer_state=gathered[1],
                # The data position counts prompts of the whole run: any world size can resume it.
                state={
                    "sampler": self.sampler.state_dict(),
                    "config": self.cfg.to_dict(),
                    "world_size": self.group.world,
                },
            )
        self.group.barrier()
        return path

    def resume(self, path: str | Path | None = None) -> Path | None:
        """Load ``path`` (or the run's latest checkpoint); None when there is nothing to resume.

        Several processes: rank 0 picks the checkpoint and every rank loads it (so the run directory
        must be on a filesystem that every node sees).
        """
        if path is None:
            latest = ckpt.latest_checkpoint(self.run_dir) if self.group.is_main else None
            path = self.group.broadcast_object(latest)
        if path is None:
            return None
        path = Path(path)
        if self.group.active and not path.is_dir():
            raise FileNotFoundError(
                f"rank {self.group.rank} cannot see checkpoint {path}: with several nodes the output "
                "directory must be on a filesystem that all of them share"
            )
        state = ckpt.load_checkpoint(
            path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler
        )
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        changed = {
            k: (v, getattr(self.cfg, k))
            for k, v in state.get("config", {}).items()
            if k not in RESUME_FREE and hasattr(self.cfg, k) and getattr(self.cfg, k) != v
        }
        if changed and self.group.is_main:  # said once, not by every rank
            diffs = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            warnings.warn(f"resuming {path} with options that differ from its run: {diffs}", stacklevel=2)
        return path

    def train(self, resume: bool | str | Path = False) -> TrainResult:
        """Run to ``max_steps``; Ctrl-C finishes the current step, saves a checkpoint and returns."""
        cfg, main = self.cfg, self.group.is_main
        if main:
            ckpt.clean_partial(self.run_dir)
        self.group.barrier()
        resumed = self.resume(None if resume is True else resume) if resume else None
        if resume and resumed is None and main:
            print(f"no checkpoint in {self.run_dir} to resume from; starting a new run", flush=True)
        self.group.barrier()  # every rank has read the checkpoint (or found none) before any is removed
        if main:
            if resumed is None:
                self._forget_old_run()
            self.metrics.start(resume_step=self.step if resumed else None)
        progress = Progress(cfg.max_steps, self.step, cfg.progress and main)
        last_saved: Path | None = resumed
        failures = 0
        try:
            with self._stop_on_sigint(progress):
                while self.step < cfg.max_steps and not self._stop_all_ranks():
                    try:
                        row = self.train_step()
                    except RewardError as err:
                        failures += 1
                        self.optimizer.zero_grad(set_to_none=True)
                        if main:
                            progress.write(
                                f"step {self.step + 1} skipped ({failures}/{cfg.max_reward_failures}): {err}"
                            )
                        if failures >= cfg.max_reward_failures:
                            path = self.save()
                            raise RewardError(
                                err.name,
                                f"failed {failures} steps in a row; stopped after saving "
                                f"{path} (fix it, then --resume). Last error: {err}",
                            ) from err
                        continue
                    failures = 0
                    self.step += 1
                    if main:
                        self.metrics.write(row)
                    progress.update(row)
                    every = cfg.print_completions_every
                    if every and self.step % every == 0 and main:
                        progress.write(
                            format_samples(self.step, *self.last_samples, cfg.num_completions_to_print)
                        )
                    if cfg.save_every and self.step % cfg.save_every == 0:
                        last_saved = self.save()
                if last_saved is None or last_saved.name != f"{ckpt.PREFIX}{self.step:06d}":
                    last_saved = self.save()
        finally:
            progress.close()
        plot = plot_metrics(self.metrics.path, self.run_dir / PLOT_FILE) if main else None
        return TrainResult(self.step, self._stop_requested, last_saved, self.metrics.path, plot)

    def _stop_all_ranks(self) -> bool:
        """Ctrl-C on any rank stops every rank after the same step."""
        if self.group.active:
            self._stop_requested = self.group.any(self._stop_requested)
        return self._stop_requested

    def _forget_old_run(self) -> None:
        """A new run in a used directory: its old checkpoints would otherwise be what --resume finds."""
        old = ckpt.checkpoints(self.run_dir)
        if old:
            print(
                f"new run in {self.run_dir}: removing {len(old)} checkpoint(s) of the previous run "
                "(pass --resume to continue it instead)",
                flush=True,
            )
            for path in old:
                shutil.rmtree(path)

    @contextlib.contextmanager
    def _stop_on_sigint(self, progress: Progress) -> Iterator[None]:
        """First Ctrl-C: stop after this step and save. Second: stop now, without saving."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            if self.group.is_main:
                progress.write(
                    "Ctrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to quit now)"
                )

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


class _Mean:
    """Token-weighted means of grpo_loss's metrics over micro-batches and iterations."""

    RENAME = {"clip_ratio_region": "clip_ratio"}  # the headline clip metric gets the short name

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weight = 0.0

    def add(self, metrics: dict[str, Tensor], weight: float, weights: dict[str, float] | None = None) -> None:
        """``weights`` overrides the weight of some metrics (their total weight is still ``weight``)."""
        for key, value in metrics.items():
            w = weights.get(key, weight) if weights else weight
            self.sums[key] = self.sums.get(key, 0.0) + float(value) * w
        self.weight += weight

    def means(self) -> dict[str, float]:
        w = max(self.weight, 1e-12)
        return {self.RENAME.get(k, k): v / w for k, v in self.sums.items()}


def _nanmean(x: Tensor) -> float:
    value = torch.nanmean(x.float())
    return float(value) if not torch.isnan(value) else 0.0


def train(config: TrainConfig, resume: bool | str | Path = False, **objects: Any) -> TrainResult:
    """``Trainer(config, **objects).train(resume)``."""
    return Trainer(config, **objects).train(resume)


__all__ = ["DEMO", "TrainResult", "Trainer", "cosine_schedule", "train"]
