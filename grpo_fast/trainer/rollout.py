"""The step's batch: G sampled completions per prompt, their rewards and advantages, and the old and
reference log-probs the loss compares against.

:class:`RolloutMixin` holds the Trainer methods that build it; ``rollout``, ``generate``, ``rewards``
and ``logprobs`` are public so that tests and subclasses (e.g. a custom sampler) can call or override them.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import grpo_fast as gf

from ..engine.objective import zero_advantage_blocker
from ..integrations.hf import HIDDEN_KWARG, backbone, completion_hidden, lm_head, match_head_dtype
from ..integrations.packing import VARLEN_ATTENTION, Packing, attention_implementation
from . import distributed, sequence, sharding
from .config import TrainConfig
from .data import Prompt, PromptDataset, PromptSampler, repeat_each
from .generation import Rollout, context_length, encode_prompts, prompt_text, sample
from .rewards import RewardError, RewardFn, score


@dataclass
class StepBatch:
    """What a step's updates train on. Tensors hold this rank's completions unless said otherwise."""

    rows: list[dict[str, Any]]  # the step's dataset rows (every rank's)
    out: Rollout
    prompts: list[Prompt]  # the prompt of each completion
    layout: distributed.Layout
    rewards: Tensor  # [N, R] of all N completions of the step, in step order
    advantages: Tensor
    loss_mask: Tensor
    micro: list[Tensor]  # the rows of each micro-batch, on the device
    chunks: list[list[Tensor]]  # each micro-batch's forward passes (one, or by max_tokens_per_microbatch)
    old: Tensor | None  # log-probs before the first update (only when num_iterations > 1)
    ref: Tensor | None  # log-probs of the reference model (only when beta > 0)
    # skip_zero_advantage: the completions left out of the updates (gradient exactly 0); None when off.
    # ``chunks`` then hold the trained rows only, ``micro`` every row (the loss normalizers count them all).
    skipped: Tensor | None = None


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def completion_states(
    model: nn.Module, rows: Rollout, bf16: bool, through: nn.Module | None = None
) -> Tensor:
    """Final hidden states of the completion positions, from ``model`` or a wrapper of it (DDP)."""
    num_completion = rows.completion_ids.shape[1]
    with autocast(rows.input_ids.device, bf16):
        if through is None and not sharding.is_sharded(model):
            return completion_hidden(model, rows.input_ids, rows.attention_mask, num_completion)
        out = (through or model)(
            input_ids=rows.input_ids, attention_mask=rows.attention_mask, **{HIDDEN_KWARG: True}
        )
    return out.last_hidden_state[:, -num_completion - 1 : -1]


def pack(model: nn.Module, rows: Rollout) -> Packing:
    """The rows' real tokens packed for a padding-free forward (one row for varlen flash attention)."""
    return Packing.build(
        rows.prompt_ids,
        rows.prompt_mask,
        rows.completion_ids,
        rows.completion_mask,
        one_row=attention_implementation(model) in VARLEN_ATTENTION,
    )


def pack_pass(
    model: nn.Module, rows: Rollout, sp: distributed.Group | None
) -> Packing | sequence.SequenceSlice:
    """The rows packed for a padding-free forward; with sequence parallelism, this rank's slice of them."""
    packing = pack(model, rows)
    return packing if sp is None else sequence.SequenceSlice.of(packing, sp.world, sp.rank)


def packed_states(
    model: nn.Module, packing: Packing | sequence.SequenceSlice, bf16: bool, through: nn.Module | None = None
) -> Tensor:
    """``[n, H]`` hidden states predicting the packed completion tokens (``packing.seq_ids``/``cols``); a
    sequence slice's forward runs inside ``sequence.attention``."""
    with autocast(packing.input_ids.device, bf16):
        if through is None and not sharding.is_sharded(model):
            out = backbone(model)(**packing.forward_kwargs(), use_cache=False)
        else:
            out = (through or model)(**packing.forward_kwargs(), **{HIDDEN_KWARG: True})
    return packing.hidden(out.last_hidden_state)


def row_tokens(out: Rollout, padding_free: bool) -> list[int]:
    """Tokens each row costs a forward: its prompt and completion, or the padded width."""
    if not padding_free:
        return [out.prompt_ids.shape[1] + out.completion_ids.shape[1]] * out.prompt_ids.shape[0]
    return (out.prompt_mask.sum(1) + out.completion_mask.sum(1)).tolist()


def token_chunks(index: Tensor, tokens: list[int], budget: int | None) -> list[Tensor]:
    """``index`` (rows of a micro-batch) split in order into runs of at most ``budget`` tokens; a row over
    the budget runs alone. One chunk without a budget."""
    if budget is None or len(index) <= 1:
        return [index]
    sizes, total, count = [], 0, 0
    for i in index.tolist():
        if count and total + tokens[i] > budget:
            sizes.append(count)
            total, count = 0, 0
        total, count = total + tokens[i], count + 1
    sizes.append(count)
    return list(index.split(sizes))


def pad_chunks(chunks: list[Tensor], count: int) -> list[Tensor]:
    """``count`` chunks (FSDP2: every rank runs as many forwards): the largest split in two while one has
    two rows, then empty chunks (a rank with fewer rows than chunks runs a zero-weight pass)."""
    chunks = list(chunks)
    while len(chunks) < count:
        j = max(range(len(chunks)), key=lambda k: len(chunks[k]))
        if len(chunks[j]) < 2:
            chunks.append(chunks[j][:0])
            continue
        half = len(chunks[j]) // 2
        chunks[j : j + 1] = [chunks[j][:half], chunks[j][half:]]
    return chunks


class RolloutMixin:
    """Sampling, scoring and the no-grad log-probs of a step; the Trainer sets these attributes."""

    cfg: TrainConfig
    device: torch.device
    group: distributed.Group
    model: nn.Module
    ref_model: nn.Module | None
    tokenizer: Any
    sharded: bool
    bf16: bool
    data: PromptDataset
    sampler: PromptSampler
    reward_funcs: list[RewardFn]
    reward_weights: Tensor
    reward_names: list[str]
    sp: distributed.Group | None  # this rank's sequence-parallel group (None: sequence_parallel_size 1)
    step: int
    _warned: set[str]

    def build_batch(self) -> StepBatch:
        """The next prompts, sampled, scored and ready for the loss; raises RewardError on a failure."""
        cfg, G, group, size = self.cfg, self.cfg.num_generations, self.group, self.cfg.sequence_parallel_size
        indices = self.sampler.next_batch()
        # Rows per data-parallel rank (a sequence-parallel group), then the share each of its ranks samples.
        layout = distributed.Layout.build(
            len(indices) * G, cfg.gradient_accumulation_steps, group.world // size, group.rank // size
        )
        sampled = layout.refine(size, group.rank % size)
        if group.active:  # each rank samples differently, reproducibly from any checkpoint
            torch.manual_seed(distributed.step_seed(cfg.seed, self.step, group.rank))
        rows, out = self.rollout(indices, sampled.local if group.active else None)
        rewards = self._all_rewards(rows, out, sampled)  # all N completions: groups are normalised whole
        advantages = gf.group_advantages(rewards, G, cfg.scale_rewards, reward_weights=self.reward_weights)
        if group.active:
            advantages = advantages[layout.local]
        advantages = advantages.to(self.device)
        if self.sp is not None:  # every rank of the group trains on all of the group's rows
            out = sequence.share_rollout(out, self.sp, sampled, layout, self.tokenizer.pad_token_id)

        loss_mask = out.completion_mask
        if cfg.mask_truncated_completions:
            loss_mask = loss_mask * (~out.truncated).unsqueeze(1).long()
        micro = [index.to(self.device) for index in layout.local_micro()]
        skipped, chunks = self.plan_passes(out, micro, advantages)
        # Later iterations see a moved policy; the first one's ratio is exactly 1, as in TRL.
        passes = [c for cs in chunks for c in cs]
        old = self._rows_logprobs(self.model, out, passes) if cfg.num_iterations > 1 else None
        ref = None
        if self.ref_model is not None:
            ref = self._rows_logprobs(self.ref_model, out, passes)
            sharding.release(self.ref_model)  # FSDP2: its embeddings and head, gathered, are not kept
        prompts = repeat_each([self.data.prompt(r) for r in rows], G)
        if group.active:
            prompts = [prompts[i] for i in layout.local.tolist()]
        return StepBatch(
            rows, out, prompts, layout, rewards, advantages, loss_mask, micro, chunks, old, ref, skipped
        )

    def plan_passes(
        self, out: Rollout, micro: list[Tensor], advantages: Tensor
    ) -> tuple[Tensor | None, list[list[Tensor]]]:
        """(the completions skip_zero_advantage leaves out or None, each micro-batch's forward passes over
        the rest)."""
        skipped = self._zero_gradient_completions(advantages)
        trained = micro if skipped is None else [index[~skipped[index]] for index in micro]
        return skipped, self._chunks(out, trained)

    def _zero_gradient_completions(self, advantages: Tensor) -> Tensor | None:
        """skip_zero_advantage: [n] bool, this rank's completions whose every token's gradient is exactly 0
        (advantage 0 under a loss config that leaves nothing else: none where it does, said once); None
        when the option is off."""
        if not self.cfg.skip_zero_advantage:
            return None
        blocker = zero_advantage_blocker(self.loss_config)
        if blocker is None:
            return advantages == 0
        if "skip_zero_advantage" not in self._warned:
            self._warned.add("skip_zero_advantage")
            if self.group.is_main:
                warnings.warn(f"skip_zero_advantage skips nothing with {blocker}", stacklevel=3)
        return torch.zeros_like(advantages, dtype=torch.bool)

    def _rows_logprobs(self, model: nn.Module, out: Rollout, passes: list[Tensor]) -> Tensor:
        """:meth:`logprobs` as ``[N, L]`` for all N rows of ``out`` when ``passes`` cover some of them only
        (the others' rows hold 0: skipped completions, never read)."""
        logp = self.logprobs(model, out, passes)
        num_rows = out.completion_ids.shape[0]
        if logp.shape[0] == num_rows:
            return logp
        full = logp.new_zeros(num_rows, out.completion_ids.shape[1])
        return full.index_copy_(0, torch.cat(passes), logp) if logp.shape[0] else full

    def _chunks(self, out: Rollout, micro: list[Tensor]) -> list[list[Tensor]]:
        """Each micro-batch's forward passes under ``max_tokens_per_microbatch`` (FSDP2: as many on every
        rank, since each forward gathers the shards together)."""
        tokens = row_tokens(out, self.cfg.padding_free)
        chunks = [token_chunks(index, tokens, self.cfg.max_tokens_per_microbatch) for index in micro]
        if self.sharded:
            counts = self.group.max(torch.tensor([float(len(c)) for c in chunks], dtype=torch.float64))
            chunks = [pad_chunks(c, int(n)) for c, n in zip(chunks, counts.tolist(), strict=True)]
        return chunks

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
            [self.data.where(i) for i in indices],
            context=context_length(self.model),
            max_completion_length=cfg.max_completion_length,
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
        with autocast(self.device, self.bf16):
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

    @torch.no_grad()
    def logprobs(self, model: nn.Module, out: Rollout, passes: list[Tensor]) -> Tensor:
        """Per-token log-probs ``[N, L]`` of the sampled completions under ``model`` (no logits formed),
        one forward per index tensor of ``passes`` (in row order; an empty one runs a row for FSDP2's
        collectives and is dropped), packed with ``padding_free`` (0 at unattended positions)."""
        parts = []
        for index in passes:
            if not len(index) and not self.sharded:  # only FSDP2's collectives need the empty forward
                continue
            rows = out.rows(index if len(index) else torch.arange(1, device=index.device))
            length = rows.completion_ids.shape[1]
            if self.cfg.padding_free:
                packing = pack_pass(model, rows, self.sp)
                with sequence.attention(model, self.sp):
                    hidden = packed_states(model, packing, self.bf16)
                targets = packing.take(rows.completion_ids)
            else:
                hidden, targets = completion_states(model, rows, self.bf16), rows.completion_ids
            weight, bias = match_head_dtype(hidden, *lm_head(model))
            if not targets.numel():  # a sequence slice may hold no completion token's state
                logp = hidden.new_zeros(0, dtype=torch.float32)
            else:
                logp = gf.selective_logprobs(
                    hidden,
                    weight,
                    targets,
                    bias,
                    self.loss_config.temperature,  # the head's scale folded in (loop.py)
                    backend=self.cfg.backend,
                    chunk_size=self.cfg.chunk_size,
                    batch_invariant=self.cfg.batch_invariant,
                    logit_softcap=self.loss_config.logit_softcap,
                )
            if len(index):
                parts.append(packing.unpack(logp, length) if self.cfg.padding_free else logp)
        if not parts:  # every row skipped
            return torch.zeros(0, out.completion_ids.shape[1], device=out.completion_ids.device)
        return torch.cat(parts)
