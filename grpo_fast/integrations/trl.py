"""``FastGRPOTrainer``: TRL's GRPOTrainer with its loss step on grpo_fast.

The two-line change for a TRL user::

    from grpo_fast.integrations.trl import FastGRPOTrainer   # instead of: from trl import GRPOTrainer
    trainer = FastGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)

Everything but the loss step is TRL's own code: generation, rewards, advantages, old and reference
log-probs, logging, checkpoints. The loss step runs the backbone once and hands its final hidden
states and the LM head weight to ``gf.grpo_loss``, which never forms the ``[tokens, vocab]`` logits,
and returns the same number TRL's ``_compute_loss`` would (gradient-accumulation and ``num_items``
normalisation included) while logging TRL's metrics under TRL's names. Options grpo_fast does not
implement fall back to TRL's code for that step, with a one-time warning naming the option.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from accelerate.utils import is_peft_model
from torch import Tensor, nn
from trl import GRPOTrainer
from trl.trainer.utils import nanmax, nanmin

import grpo_fast as gf

from ..config import CLIPPED_LOSS_TYPES, LOSS_TYPES
from ..engine.objective import averaged_over_sequences
from .hf import HIDDEN_KWARG, add_hidden_forward, lm_head, match_head_dtype, unsupported_head

# Batch keys of vision-language inputs: the hidden states path here is text-only.
MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


class FastGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with the same constructor; ``grpo_fast_backend`` (keyword) picks gf's backend,
    ``grpo_fast_batch_invariant`` makes grpo_fast's log-probs independent of the batch (see
    ``gf.grpo_loss``; TRL's own old/reference log-prob passes are not affected)."""

    def __init__(
        self,
        *args: Any,
        grpo_fast_backend: str = "auto",
        grpo_fast_batch_invariant: bool = False,
        **kwargs: Any,
    ):
        if not isinstance(grpo_fast_batch_invariant, bool):
            raise TypeError(
                f"grpo_fast_batch_invariant must be a bool, got {type(grpo_fast_batch_invariant).__name__}"
            )
        super().__init__(*args, **kwargs)
        self.grpo_fast_backend = grpo_fast_backend
        self.grpo_fast_batch_invariant = grpo_fast_batch_invariant
        self._fallback_warned: set[str] = set()
        # Patch where TRL patched its fused head: under PEFT, the transformers model inside.
        add_hidden_forward(self.model.get_base_model() if is_peft_model(self.model) else self.model)
        self._static_fallback = self._unsupported_options()
        self._gf_config = None if self._static_fallback else self._loss_config()

    def _loss_config(self) -> gf.GRPOConfig | None:
        """gf.GRPOConfig from TRL's settings: every field has TRL's name, on the trainer (resolved values such
        as epsilon_low) or else on its args, so a new loss option needs no change here."""
        values = {}
        for f in dataclasses.fields(gf.GRPOConfig):
            for source in (self, self.args):
                if hasattr(source, f.name):
                    values[f.name] = getattr(source, f.name)
                    break
        try:
            return gf.GRPOConfig(**values)
        except (ValueError, TypeError) as err:  # settings TRL takes but grpo_fast's config rejects
            self._static_fallback = f"these loss settings ({err})"
            return None

    def _unsupported_options(self) -> str | None:
        """The first configured option grpo_fast does not implement, or None."""
        a = self.args
        checks = [
            (self.loss_type not in LOSS_TYPES, f"loss_type={self.loss_type!r}"),
            (self.off_policy_mask_threshold is not None, "off_policy_mask_threshold"),
            (self.top_entropy_quantile < 1.0, "top_entropy_quantile < 1"),
            (
                self.use_vllm and self.vllm_importance_sampling_correction,
                "vLLM importance sampling correction",
            ),
            (self._entropy_bonus_enabled, "the entropy bonus (entropy_coef / use_adaptive_entropy)"),
            (self.aux_loss_enabled, "the MoE auxiliary loss"),
            (bool(a.use_liger_kernel), "use_liger_kernel"),
        ]
        for failed, name in checks:
            if failed:
                return name
        return unsupported_head(self.model)

    def _batch_fallback(self, inputs: dict[str, Any]) -> str | None:
        if any(inputs.get(k) is not None for k in MULTIMODAL_KEYS):
            return "multimodal inputs"
        if inputs["advantages"].dim() != 1:
            return "per-token advantages"
        weight = lm_head(self.accelerator.unwrap_model(self.model))[0]
        if hasattr(weight, "ds_id") or type(weight).__name__ == "DTensor":
            return "a sharded LM head (FSDP / DeepSpeed ZeRO-3)"
        return None

    def _compute_loss(self, model: nn.Module, inputs: dict[str, Any]) -> Tensor:
        reason = self._static_fallback or self._batch_fallback(inputs)
        if reason is not None:
            if reason not in self._fallback_warned:
                self._fallback_warned.add(reason)
                warnings.warn(
                    f"FastGRPOTrainer: grpo_fast does not support {reason}; TRL's own loss computes "
                    "these steps (logits included)",
                    stacklevel=2,
                )
            return super()._compute_loss(model, inputs)
        return self._fast_loss(model, inputs)

    def _fast_loss(self, model: nn.Module, inputs: dict[str, Any]) -> Tensor:
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        num_completion = completion_ids.size(1)
        with self.accelerator.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask, **{HIDDEN_KWARG: True})
        hidden = out.last_hidden_state[:, -num_completion - 1 : -1]
        weight, bias = lm_head(self.accelerator.unwrap_model(model))
        if self.args.cast_lm_head_to_fp32:
            hidden, weight = hidden.float(), weight.float()
            bias = bias.float() if bias is not None else None
        else:
            weight, bias = match_head_dtype(hidden, weight, bias)

        mode = "train" if self.model.training else "eval"
        num_items, divide_by = None, 1.0
        if self._gf_config.uses_num_items_in_batch:
            # TRL: num_items_in_batch (the generation batch's tokens, all-gathered over processes) spans
            # the generation batch; rescale it to one accumulation window of one process. DDP then
            # averages the processes' gradients: the sum of their token losses over the global count.
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = (
                    normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
                )
            # grpo_loss clamps its normaliser at 1; TRL's may be below 1 (a few tokens, many processes).
            num_items = normalizer.clamp(min=1.0)
            divide_by = normalizer / num_items
        elif mode == "train":
            divide_by = self.current_gradient_accumulation_steps
        old_logp = inputs.get("old_per_token_logps")
        ref_logp = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
        loss, metrics = gf.grpo_loss(
            hidden,
            weight,
            completion_ids,
            mask,
            inputs["advantages"],
            old_logp,
            ref_logp,
            bias,
            config=self._gf_config,
            num_items_in_batch=num_items,
            backend=self.grpo_fast_backend,
            batch_invariant=self.grpo_fast_batch_invariant,
        )
        self._log_loss_metrics(
            mode, metrics, mask, inputs["advantages"], hidden, weight, bias, completion_ids, old_logp
        )
        return loss / divide_by

    # ----- TRL's metrics, same names and the same cross-process reductions --------------------------------
    def _global_mean(self, local_mean: Tensor, count: Tensor) -> float:
        totals = self.accelerator.reduce(torch.stack([local_mean.float() * count, count]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def _log_loss_metrics(
        self,
        mode: str,
        metrics: dict[str, Tensor],
        mask: Tensor,
        advantages: Tensor,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        completion_ids: Tensor,
        old_logp: Tensor | None,
    ) -> None:
        log = self._metrics[mode]
        tokens = mask.sum().float()
        sequence_level = self.importance_sampling_level == "sequence"
        ratio_count = torch.tensor(float(mask.shape[0]), device=mask.device) if sequence_level else tokens
        if self.beta != 0.0:
            log["kl"].append(self._global_mean(metrics["kl"], tokens))
        log["entropy"].append(self._global_mean(metrics["entropy"], tokens))
        if self.loss_type in CLIPPED_LOSS_TYPES:
            for side in ("low", "high", "region"):
                log[f"clip_ratio/{side}_mean"].append(
                    self._global_mean(metrics[f"clip_ratio_{side}"], ratio_count)
                )
            low, high = self._per_sequence_clip(
                mask, advantages, hidden, weight, bias, completion_ids, old_logp
            )
            log["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(low)).item())
            log["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(high)).item())
        seq_count = torch.tensor(float(mask.shape[0]), device=mask.device)
        for name, value in metrics.items():  # the loss type's own metrics (cispo_clip_ratio, vespo/...)
            # ratio_not_one is grpo_fast's, not TRL's: TRL's logs keep exactly TRL's names.
            if name not in ("kl", "entropy", "ratio_not_one") and not name.startswith("clip_ratio_"):
                count = seq_count if averaged_over_sequences(name, self._gf_config) else tokens
                log[name].append(self._global_mean(value, count))

    @torch.no_grad()
    def _per_sequence_clip(
        self,
        mask: Tensor,
        advantages: Tensor,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        completion_ids: Tensor,
        old_logp: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """Per-sequence clipped fractions (TRL's clip_ratio/low_min, high_max need them, not just the means).

        Without old log-probs the ratio is exactly 1 and nothing is computed; with them, the per-token
        log-probs cost one extra no-grad pass over the vocabulary.
        """
        mask = mask.float()
        if old_logp is None:
            log_ratio = torch.zeros_like(mask)
        else:
            logp = gf.selective_logprobs(
                hidden.detach(),
                weight.detach(),
                completion_ids,
                bias.detach() if bias is not None else None,
                self.temperature,
                backend=self.grpo_fast_backend,
                batch_invariant=self.grpo_fast_batch_invariant,
            )
            log_ratio = logp - old_logp
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        coef = torch.exp(log_ratio)
        if self.args.delta is not None:
            coef = torch.clamp(coef, max=self.args.delta)
        adv = advantages.unsqueeze(1)
        low = ((coef < 1 - self.epsilon_low) & (adv < 0)).float()
        high = ((coef > 1 + self.epsilon_high) & (adv > 0)).float()

        def seq_mean(x: Tensor) -> Tensor:  # TRL's masked_seq_mean: NaN for an empty completion
            return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

        return seq_mean(low), seq_mean(high)


__all__ = ["FastGRPOTrainer"]
