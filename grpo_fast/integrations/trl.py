"""``FastGRPOTrainer``: TRL's GRPOTrainer with its loss step on grpo_fast.

The two-line change for a TRL user::

    from grpo_fast.integrations.trl import FastGRPOTrainer   # instead of: from trl import GRPOTrainer
    trainer = FastGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)

Everything but the loss step is TRL's own code: generation, rewards, advantages, old and reference
log-probs, logging, checkpoints. The loss step runs the backbone once and hands its final hidden
states and the LM head weight to ``gf.grpo_loss``, which never forms the ``[tokens, vocab]`` logits,
and returns the same number TRL's ``_compute_loss`` would (gradient-accumulation and ``num_items``
normalisation included) while logging TRL's metrics under TRL's names. TRL's loss options all run
on this path: the entropy quantile, the off-policy mask, the entropy bonus (static or adaptive), the vLLM
importance-sampling correction, per-token advantages, the MoE auxiliary loss; so do scaled and soft-capped
heads and heads sharded by FSDP2 or DeepSpeed ZeRO-3. What grpo_fast cannot run (multimodal inputs, a head
scaled by a negative factor, Liger's loss) falls back to TRL's code for that step, with a one-time warning
naming it.
"""

from __future__ import annotations

import dataclasses
import warnings
from contextlib import AbstractContextManager
from typing import Any

import torch
from accelerate.utils import is_peft_model
from torch import Tensor, nn
from trl import GRPOTrainer

import grpo_fast as gf

from ..config import CLIPPED_LOSS_TYPES, LOSS_TYPES
from ..engine.objective import averaged_over_sequences
from ..trainer.update import loss_share
from .causal_lm import completion_states, head_inputs
from .hf import add_hidden_forward, head_transform, unsupported_head
from .packing import Packing, check_packable
from .trl_skip import ZeroAdvantageSkip
from .trl_version import check_trl_version, nanmax, nanmin

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


class FastGRPOTrainer(ZeroAdvantageSkip, GRPOTrainer):
    """``trl.GRPOTrainer`` with the same constructor; ``grpo_fast_backend`` (keyword) picks gf's backend,
    ``grpo_fast_batch_invariant`` makes grpo_fast's log-probs independent of the batch (see
    ``gf.grpo_loss``; TRL's own old/reference log-prob passes are not affected).

    ``grpo_fast_padding_free=True`` runs the backbone on each batch's real tokens only, packed (see
    :mod:`grpo_fast.integrations.packing`), in the loss step and in the old/reference log-prob passes;
    the model needs an attention implementation that isolates packed sequences (sdpa, eager, flex, flash).

    ``grpo_fast_skip_zero_advantage=True`` leaves completions whose gradient is exactly 0 (advantage 0 on
    every completion token, with beta 0, no entropy bonus, top_entropy_quantile 1, no auxiliary loss) out of
    the loss step's forward/backward and of the old log-prob pass; the loss normalizers still count them,
    so loss and gradients are unchanged. The advantages then come from ``gf.group_advantages`` (TRL's
    formula in fp64: a group of equal rewards gets exactly 0, not fp32 rounding noise), and
    ``frac_reward_zero_std`` counts the groups whose rewards are exactly equal; ``skipped_completions``
    logs the fraction left out. See docs/skip-zero-advantage.md.

    The installed TRL must be within ``trl_version.VERIFIED_TRL``; ``grpo_fast_allow_untested_trl=True``
    runs on another release anyway, with one warning.
    """

    def __init__(
        self,
        *args: Any,
        grpo_fast_backend: str = "auto",
        grpo_fast_batch_invariant: bool = False,
        grpo_fast_padding_free: bool = False,
        grpo_fast_allow_untested_trl: bool = False,
        grpo_fast_skip_zero_advantage: bool = False,
        **kwargs: Any,
    ):
        for name, value in (
            ("grpo_fast_batch_invariant", grpo_fast_batch_invariant),
            ("grpo_fast_padding_free", grpo_fast_padding_free),
            ("grpo_fast_allow_untested_trl", grpo_fast_allow_untested_trl),
            ("grpo_fast_skip_zero_advantage", grpo_fast_skip_zero_advantage),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        check_trl_version(grpo_fast_allow_untested_trl)
        if grpo_fast_padding_free:  # before TRL's set-up: a model that cannot pack fails fast
            model = kwargs.get("model", args[0] if args else None)
            if isinstance(model, nn.Module):
                check_packable(model)
        super().__init__(*args, **kwargs)
        if grpo_fast_padding_free:
            for m in (self.model, getattr(self, "ref_model", None)):
                if m is not None:
                    check_packable(self.accelerator.unwrap_model(m))
        self.grpo_fast_backend = grpo_fast_backend
        self.grpo_fast_batch_invariant = grpo_fast_batch_invariant
        self.grpo_fast_padding_free = grpo_fast_padding_free
        self.grpo_fast_skip_zero_advantage = grpo_fast_skip_zero_advantage
        self._fallback_warned: set[str] = set()
        self._rewards_per_func: Tensor | None = None  # the last generation batch's, every process's
        self._deferred_old: dict[str, Any] | None = None  # the old log-prob pass, waiting for advantages
        # Patch where TRL patched its fused head: under PEFT, the transformers model inside.
        add_hidden_forward(self.model.get_base_model() if is_peft_model(self.model) else self.model)
        if getattr(self, "ref_model", None) is not None:
            add_hidden_forward(self.accelerator.unwrap_model(self.ref_model))
        self._static_fallback = self._unsupported_options()
        self._gf_config = None if self._static_fallback else self._loss_config()
        # A scaled or soft-capped head (logit_scale, logits_scaling, final_logit_softcapping, ...), as TRL's
        # fused head applies it: folded into grpo_fast's temperature and logit_softcap (every backend).
        if self._gf_config is not None:
            temperature, cap = head_transform(self.model, self.temperature)
            self._gf_config = dataclasses.replace(self._gf_config, temperature=temperature, logit_softcap=cap)

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
            (bool(a.use_liger_kernel), "use_liger_kernel"),
        ]
        for failed, name in checks:
            if failed:
                return name
        return unsupported_head(self.model, scale_ok=True)

    def _batch_fallback(self, inputs: dict[str, Any]) -> str | None:
        if any(inputs.get(k) is not None for k in MULTIMODAL_KEYS):
            return "multimodal inputs"
        return None

    def _hidden(
        self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor, keep: int, **forward_kwargs: Any
    ) -> tuple[Any, Tensor, Packing | None]:
        """The backbone's output and the hidden states predicting the last ``keep`` tokens. Padding-free:
        the hidden states of the attended completion tokens only, ``[n, H]``, and the packing that
        places them."""
        with self.accelerator.autocast():
            return completion_states(
                model, self.accelerator.unwrap_model(model), input_ids, attention_mask, keep,
                self.grpo_fast_padding_free, **forward_kwargs,
            )  # fmt: skip

    def _head(self, model: nn.Module, hidden: Tensor) -> AbstractContextManager:
        """``(hidden, weight, bias)`` for the fused ops, inside a block (see causal_lm.head_inputs): fp32 with
        cast_lm_head_to_fp32, else the head in the hidden states' dtype; a sharded head gathered (FSDP2,
        DeepSpeed ZeRO-3 as TRL's fused head does: grpo_fast's loss computes the weight gradient in its
        forward, inside the block)."""
        return head_inputs(self.accelerator.unwrap_model(model), hidden, self.args.cast_lm_head_to_fp32)

    def _get_per_token_logps_and_entropies(
        self,
        model: nn.Module,
        input_ids: Tensor,
        attention_mask: Tensor,
        logits_to_keep: int,
        batch_size: int | None = None,
        compute_entropy: bool = False,
        compute_aux_loss: bool = False,
        **multimodal: Any,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """TRL's old and reference log-prob passes (no grad) through ``gf.selective_logprobs``: the numerics
        of the loss pass, so an on-policy ratio is exactly 1 when the batches match (bf16 too; with
        ``grpo_fast_batch_invariant`` whatever the LM head's batch). TRL's own pass where grpo_fast falls
        back, for multimodal inputs, the auxiliary loss, and anything with a gradient (TRL's loss path)."""
        trl_pass = (
            getattr(self, "_static_fallback", None) is not None
            or torch.is_grad_enabled()
            or compute_aux_loss
            or any(v is not None for v in multimodal.values())
        )
        if self._deferred_old is not None and not self._deferred_old and model is self.model and not trl_pass:
            # The old log-prob pass of a generation batch: run once the advantages say which rows train.
            self._deferred_old.update(
                input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep,
                batch_size=batch_size,
            )  # fmt: skip
            placeholder = torch.zeros(input_ids.size(0), logits_to_keep, device=input_ids.device)
            return placeholder, None, None
        # The reference model is its own: its head's scale and soft-capping are read from its config.
        trl_pass = trl_pass or unsupported_head(model, scale_ok=True) is not None
        if trl_pass:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy,
                compute_aux_loss, **multimodal,
            )  # fmt: skip
        batch_size = batch_size or input_ids.size(0)
        temperature, cap = head_transform(model, self.temperature)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):  # TRL's chunks: the same backbone batches
            ids, am = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
            _, hidden, packing = self._hidden(model, ids, am, logits_to_keep)
            targets = ids[:, -logits_to_keep:]
            with self._head(model, hidden) as (hidden, w, b):
                logp, entropy = gf.selective_logprobs(
                    hidden, w, targets if packing is None else packing.take(targets), b, temperature,
                    return_entropy=True, backend=self.grpo_fast_backend,
                    batch_invariant=self.grpo_fast_batch_invariant, logit_softcap=cap,
                )  # fmt: skip
            if packing is not None:  # 0 where nothing was attended
                logp, entropy = packing.unpack(logp, logits_to_keep), packing.unpack(entropy, logits_to_keep)
            keep = am[:, -logits_to_keep:] != 0  # TRL's fused head: 0 where the label is -100
            logps.append(torch.where(keep, logp, 0.0))
            entropies.append(torch.where(keep, entropy, 0.0))
        logps_t = torch.cat(logps)
        return logps_t, torch.cat(entropies) if compute_entropy else None, None

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
        if not self._skipping():
            return self._fast_loss_rows(model, inputs)
        mask = inputs["completion_mask"]
        mask = mask if "tool_mask" not in inputs else mask * inputs["tool_mask"]
        rows = mask.shape[0]
        live = self._trained_rows(inputs["advantages"], mask).nonzero().squeeze(1)
        kept = live.numel()
        mode = "train" if self.model.training else "eval"
        skipped, count = (torch.tensor(x, device=mask.device) for x in (1.0 - kept / rows, float(rows)))
        self._metrics[mode]["skipped_completions"].append(self._global_mean(skipped, count))
        if kept == rows:
            return self._fast_loss_rows(model, inputs)
        # No row trains: one row runs at weight 0, so that every process makes the same collectives.
        index = live if kept else live.new_zeros(1)
        part = {
            k: v.index_select(0, index) if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == rows else v
            for k, v in inputs.items()
        }
        # The loss normalizers count the skipped rows: this part's loss, times its share, is the batch's.
        tokens = float(mask.sum()) if self._gf_config.normalizer == "batch_tokens" else 0.0
        kept_tokens = float(mask.index_select(0, live).sum()) if tokens else 0.0
        share = loss_share(self._gf_config, float(kept), kept_tokens, float(rows), tokens) if kept else 0.0
        return self._fast_loss_rows(model, part, share)

    def _fast_loss_rows(self, model: nn.Module, inputs: dict[str, Any], share: float = 1.0) -> Tensor:
        """The loss of ``inputs``' rows, times ``share`` (their part of the batch's loss; 0: a row run only
        for the collectives, its metrics not counted)."""
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        # MoE: the backbone returns its router logits for the balancing loss
        router = {"output_router_logits": True} if self.aux_loss_enabled else {}
        keep = completion_ids.size(1)
        out, hidden, packing = self._hidden(model, input_ids, attention_mask, keep, **router)

        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        num_items, divide_by = None, float(accumulation)
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
        # The entropy bonus is a mean over tokens scaled for accumulation only, whatever the loss type's
        # normalizer: inside grpo_loss (its gradient comes from the same pass) it is divided by divide_by
        # with the rest, so its coefficient carries divide_by / accumulation.
        bonus = self._entropy_bonus_coef() if self._entropy_bonus_enabled else 0.0
        config = self._gf_config
        if bonus != 0.0:
            # (a float for the config: one host read of divide_by, only for steps with a bonus)
            config = dataclasses.replace(config, entropy_coef=bonus * float(divide_by) / accumulation)
        elif config.entropy_coef != 0.0:
            config = dataclasses.replace(config, entropy_coef=0.0)
        old_logp = inputs.get("old_per_token_logps")
        ref_logp = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
        is_ratio = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            is_ratio = inputs["importance_sampling_ratio"]
        gather = self._gather_entropies if self.accelerator.num_processes > 1 else None
        advantages, sampling_logp = inputs["advantages"], inputs.get("sampling_per_token_logps")
        targets, loss_mask, seq_ids = completion_ids, mask, None
        if packing is not None and advantages.dim() == 2:
            # Per-token advantages exist in the padded layout only: the packed states go back into it.
            padded = hidden.new_zeros(*completion_ids.shape, hidden.shape[-1])
            hidden = padded.index_put((packing.seq_ids, packing.cols), hidden)
        elif packing is not None:  # the loss's per-token inputs packed like the hidden states
            take = lambda x: packing.take(x) if x is not None else None  # noqa: E731
            targets, loss_mask, seq_ids = take(completion_ids), take(mask), packing.seq_ids
            old_logp, ref_logp, sampling_logp = take(old_logp), take(ref_logp), take(sampling_logp)
            if is_ratio is not None and is_ratio.shape == completion_ids.shape:
                is_ratio = take(is_ratio)
        with self._head(model, hidden) as (hidden, weight, bias):
            loss, metrics = gf.grpo_loss(
                hidden,
                weight,
                targets,
                loss_mask,
                advantages,
                old_logp,
                ref_logp,
                bias,
                config=config,
                num_items_in_batch=num_items,
                seq_ids=seq_ids,
                sampling_logp=sampling_logp,
                importance_sampling_ratio=is_ratio,
                entropy_gather=gather if config.top_entropy_quantile < 1.0 else None,
                backend=self.grpo_fast_backend,
                batch_invariant=self.grpo_fast_batch_invariant,
            )
        self._log_loss_metrics(mode, metrics, mask, token_adv=inputs["advantages"].dim() == 2, weight=share)
        if self._entropy_bonus_enabled:
            # TRL's policy_loss: the policy term as its normalizer has it, before accumulation scaling
            policy = metrics.get("policy_loss", loss).detach()
            if self._gf_config.uses_num_items_in_batch:
                policy = policy / divide_by
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy).nanmean().item())
            self._entropy_bonus_step(mode, metrics, mask)
        loss = loss / divide_by if share == 1.0 else loss * share / divide_by
        if self.aux_loss_enabled:
            aux_loss = self._aux_loss(model, out, attention_mask if packing is None else packing.real)
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(aux_loss).mean().item()
            )
        return loss

    # ----- TRL's entropy bonus, auxiliary loss and the cross-process entropy quantile ----------------------
    def _entropy_bonus_coef(self) -> float:
        """The coefficient applied this step: TRL's adaptive gate from the previous step's entropy."""
        if self.use_adaptive_entropy:
            return self.entropy_coef if self._last_world_entropy <= self.args.entropy_target else 0.0
        return self.entropy_coef

    def _entropy_bonus_step(self, mode: str, metrics: dict[str, Tensor], mask: Tensor) -> None:
        """TRL's adaptive entropy controller update and entropy_coef log, from the loss's metrics."""
        if self.use_adaptive_entropy and mode == "train":
            if "entropy_mask/tokens" in metrics:
                count = metrics["entropy_mask/tokens"]
                total = metrics["entropy_mask/entropy"] * count
            else:
                count = mask.sum().float()
                total = metrics["entropy"] * count
            stats = torch.stack([total.float(), count.float()]).detach()
            window = self._entropy_window_stats
            self._entropy_window_stats = stats if window is None else window + stats
            if self.accelerator.sync_gradients:
                window_stats = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                world_entropy = (window_stats[0] / window_stats[1].clamp(min=1.0)).item()
                a = self.args
                if world_entropy <= a.entropy_target:
                    self.entropy_coef = min(self.entropy_coef + a.entropy_coef_delta, a.entropy_coef_max)
                else:
                    self.entropy_coef = max(self.entropy_coef - a.entropy_coef_delta, a.entropy_coef_min)
                self._last_world_entropy = world_entropy
                self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

    def _gather_entropies(self, local: Tensor) -> Tensor:
        """Every process's entropies (TRL's get_high_entropy_mask pads with a sentinel, then gathers)."""
        pad_value = -1e9  # entropies are >= 0: the sentinel cannot be one
        padded = self.accelerator.pad_across_processes(local, dim=0, pad_index=pad_value)
        gathered = self.accelerator.gather(padded)
        return gathered[gathered != pad_value]

    def _aux_loss(self, model: nn.Module, out: Any, attention_mask: Tensor) -> Tensor:
        """The MoE load-balancing loss of TRL's fused head (Mixtral's, which every MoE family uses)."""
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

        config = self.accelerator.unwrap_model(model).config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        num_experts = getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None)
        return load_balancing_loss_func(
            out.router_logits, num_experts, text.num_experts_per_tok, attention_mask
        )

    # ----- TRL's metrics, same names and the same cross-process reductions --------------------------------
    def _global_mean(self, local_mean: Tensor, count: Tensor) -> float:
        totals = self.accelerator.reduce(torch.stack([local_mean.float() * count, count]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def _log_loss_metrics(
        self, mode: str, metrics: dict[str, Tensor], mask: Tensor, token_adv: bool, weight: float = 1.0
    ) -> None:
        """TRL's metric lines from grpo_loss's metrics, weighted as TRL's global_masked_mean weighs them:
        one value per sequence for sequence-level ratios (and VESPO's phi), per token otherwise, and per
        token whenever the advantages are per token ((B, T) broadcasts). ``weight`` 0: the same collectives,
        nothing counted (a row run only for them)."""
        log = self._metrics[mode]
        tokens = mask.sum().float()
        seqs = torch.tensor(float(mask.shape[0]), device=mask.device)
        if weight == 0.0:
            tokens, seqs = tokens * 0.0, seqs * 0.0
            extremes = ("clip_ratio_low_min", "clip_ratio_high_max")
            metrics = {k: v.new_full((), float("nan")) if k in extremes else v for k, v in metrics.items()}
        if self.beta != 0.0:
            log["kl"].append(self._global_mean(metrics["kl"], tokens))
        log["entropy"].append(self._global_mean(metrics["entropy"], tokens))
        for name, value in metrics.items():
            if name in self._NOT_TRL_METRICS or name.startswith("entropy_mask/"):
                continue
            if name.startswith("clip_ratio_") and self.loss_type not in CLIPPED_LOSS_TYPES:
                continue  # always 0 there: TRL logs no clip ratios for cispo, sapo, vespo
            if name in ("clip_ratio_low_min", "clip_ratio_high_max"):  # this batch's extremes, same pass
                extreme, trl_name = (nanmin, "low_min") if name.endswith("min") else (nanmax, "high_max")
                log[f"clip_ratio/{trl_name}"].append(extreme(self.accelerator.gather(value)).item())
                continue
            per_seq = averaged_over_sequences(name, self._gf_config) and not token_adv
            count = seqs if per_seq else tokens
            trl_name = self._TRL_NAMES.get(name, name)
            log[trl_name].append(self._global_mean(value, count))

    _TRL_NAMES = {f"clip_ratio_{s}": f"clip_ratio/{s}_mean" for s in ("low", "high", "region")}
    # grpo_fast's own metrics and those logged elsewhere: TRL's logs keep exactly TRL's names.
    _NOT_TRL_METRICS = ("kl", "entropy", "ratio_not_one", "policy_loss")


__all__ = ["FastGRPOTrainer"]
