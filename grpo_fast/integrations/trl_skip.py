"""FastGRPOTrainer's ``grpo_fast_skip_zero_advantage``: completions whose every token has a gradient of
exactly 0 leave the loss step and the old log-prob pass (docs/skip-zero-advantage.md)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

import grpo_fast as gf

from ..advantages import equal_reward_groups
from ..engine.objective import zero_advantage_blocker


class ZeroAdvantageSkip:
    """The part of FastGRPOTrainer that finds and leaves out the zero-gradient completions (a mixin before
    ``trl.GRPOTrainer``: its overrides call TRL's methods through ``super()``)."""

    def _skip_blocker(self, config: gf.GRPOConfig | None = None) -> str | None:
        """Why a completion at advantage 0 may still have a gradient in this trainer (None: it has none)."""
        config = config if config is not None else self._gf_config
        if config is None:
            return "TRL's own loss (grpo_fast does not run this configuration)"
        if self._entropy_bonus_enabled:
            return "an entropy bonus: it has a gradient at advantage 0"
        if self.aux_loss_enabled:
            return "an auxiliary loss: the router's balancing loss has a gradient on every token"
        return zero_advantage_blocker(config)

    def _skipping(self) -> bool:
        """Whether this trainer skips zero-gradient completions (said once when the option cannot)."""
        if not self.grpo_fast_skip_zero_advantage:
            return False
        blocker = self._skip_blocker()
        if blocker is not None and "skip_zero_advantage" not in self._fallback_warned:
            self._fallback_warned.add("skip_zero_advantage")
            warnings.warn(
                f"FastGRPOTrainer: grpo_fast_skip_zero_advantage skips nothing with {blocker}", stacklevel=3
            )
        return blocker is None

    def _calculate_rewards(
        self, inputs: Any, prompts: Any, completions: Any, completion_ids_list: Any
    ) -> Tensor:
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._rewards_per_func = rewards
        return rewards

    def _generate_and_score_completions(self, inputs: Any) -> dict[str, Any]:
        """TRL's generation batch; with skip_zero_advantage, exact advantages and the old log-probs of the
        completions that train only (TRL computes them before the rewards: the pass is held until then)."""
        if not self._skipping():
            return super()._generate_and_score_completions(inputs)
        # vLLM's importance-sampling correction reads every old log-prob right away: no deferring then.
        defer = not (self.use_vllm and self.vllm_importance_sampling_correction)
        self._deferred_old = {} if defer else None
        try:
            output = super()._generate_and_score_completions(inputs)
            deferred, self._deferred_old = self._deferred_old, None
        finally:
            self._deferred_old = None
        self._exact_advantages(output)
        if deferred:
            output["old_per_token_logps"] = self._old_logps_of_trained_rows(output, **deferred)
        return output

    def _exact_advantages(self, output: dict[str, Any]) -> None:
        """TRL's advantages (sum_then_normalize) from ``gf.group_advantages``, in fp64, so equal rewards give
        exactly 0; ``frac_reward_zero_std`` counts the groups whose rewards are exactly equal."""
        rewards_per_func, self._rewards_per_func = self._rewards_per_func, None
        if rewards_per_func is None or self.multi_objective_aggregation != "sum_then_normalize":
            return  # normalize_then_sum centres on the batch: an equal group's advantage is not 0 there
        mode = "train" if self.model.training else "eval"
        G = self.num_generations if mode == "train" else self.num_generations_eval
        weights = self.reward_weights.to(rewards_per_func.device)
        advantages = gf.group_advantages(rewards_per_func, G, self.scale_rewards, 1e-4, weights)
        local = output["advantages"].shape[0]
        start = self.accelerator.process_index * local
        output["advantages"] = advantages[start : start + local].to(output["advantages"])
        totals = (rewards_per_func * weights).nansum(1)
        totals[torch.isnan(rewards_per_func).all(1)] = float("nan")
        self._metrics[mode]["frac_reward_zero_std"][-1] = equal_reward_groups(totals, G).float().mean().item()
        logged = self._logs["advantages"]
        for _ in range(min(len(advantages), len(logged))):
            logged.pop()
        logged.extend(advantages.tolist())

    def _trained_rows(self, advantages: Tensor, mask: Tensor) -> Tensor:
        """[B] bool: the completions with a non-zero advantage on some completion token."""
        if advantages.dim() == 1:
            return advantages != 0
        return ((advantages != 0) & (mask != 0)).any(1)

    def _old_logps_of_trained_rows(
        self,
        output: dict[str, Any],
        input_ids: Tensor,
        attention_mask: Tensor,
        logits_to_keep: int,
        batch_size: int,
    ) -> Tensor:
        """The old log-prob pass over the completions that train (0 for the others: never read). Every
        process runs as many rows (padded with copies of its first row), so that the forwards that are
        collectives (FSDP2, ZeRO-3, DDP's buffer broadcast) match."""
        live = self._trained_rows(output["advantages"], output["completion_mask"]).nonzero().squeeze(1)
        rows = live.numel()
        if self.accelerator.num_processes > 1:
            count = torch.tensor([float(rows)], device=input_ids.device)
            rows = int(self.accelerator.gather(count).max().item())
        old = torch.zeros(input_ids.size(0), logits_to_keep, device=input_ids.device)
        if rows == 0:
            return old
        index = torch.cat([live, live.new_zeros(rows - live.numel())])
        with torch.no_grad():
            logps, _, _ = self._get_per_token_logps_and_entropies(
                self.model, input_ids[index], attention_mask[index], logits_to_keep, batch_size
            )
        return old.index_copy_(0, live, logps[: live.numel()].to(old))
