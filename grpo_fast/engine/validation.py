"""Input checks of the public API: each names the argument and what was expected, before any kernel runs;
except NaN and inf in ``hidden`` and the LM head ``weight``, which the pass's per-row results reveal at no
cost: those are looked for only when a result is not finite (:mod:`.finite_check`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import SCALE_MODES, GRPOConfig

# How far above 0 a given log-prob may be (rounding of p ~ 1 in low precision) before it is an error.
LOGP_ROUNDING = 1e-3
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _shape(x: Tensor) -> str:
    return "[" + ", ".join(str(d) for d in x.shape) + "]"


class ValueChecks:
    """Checks of tensor values and the counts a call needs, read together: one device-to-host transfer for
    all of them, so CUDA inputs cost one synchronization however many there are (the shape and dtype
    checks need none)."""

    def __init__(self) -> None:
        self._items: list[tuple[Tensor, tuple[Tensor, ...], Callable[..., str]]] = []
        self._counts: list[Tensor] = []

    def add(self, bad: Tensor, message: Callable[..., str], *values: Tensor) -> None:
        """``bad``: a 0-dim bool tensor; ``message(*values)`` (as floats) is the error when it is true."""
        self._items.append((bad, values, message))

    def count(self, value: Tensor) -> int:
        """Read a 0-dim integer tensor with the checks: its index in :meth:`run`'s list."""
        self._counts.append(value)
        return len(self._counts) - 1

    def any_bad(self) -> Tensor | None:
        """0-dim bool on the device: whether any check failed (no read); None without checks."""
        if not self._items:
            return None
        return torch.stack([bad.reshape(()) for bad, _, _ in self._items]).any()

    def run(self) -> list[int]:
        """Raise the first failed check's error, else return the counts (as ints, in :meth:`count` order)."""
        if not self._items and not self._counts:
            return []
        flat = [x.reshape(()).double() for bad, values, _ in self._items for x in (bad, *values)]
        host = torch.stack(flat + [c.reshape(()).double() for c in self._counts]).tolist()  # the one read
        i = 0
        for _, values, message in self._items:
            if host[i]:
                raise ValueError(message(*host[i + 1 : i + 1 + len(values)]))
            i += 1 + len(values)
        return [int(c) for c in host[i:]]


def device_type(name: str) -> str | None:
    """ "cpu" or "cuda" for a device string grpo_fast runs on (cuda:1 too), None for anything else."""
    try:
        kind = torch.device(name).type
    except RuntimeError:  # not a device string at all
        return None
    return kind if kind in ("cpu", "cuda") else None


def check_tensor(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_float(name: str, x: Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {x.dtype}")


def check_same_device(device: torch.device, **tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(
                f"{name} is on {t.device} but hidden is on {device}; put all inputs on one device"
            )


def check_lm_head(hidden: Tensor, weight: object, bias: object) -> tuple[Tensor, Tensor | None]:
    """hidden [..., H] and weight [V, H] of one float dtype and device; bias [V] or None."""
    check_tensor("hidden", hidden)
    weight = check_tensor("weight", weight)
    check_float("hidden", hidden)
    check_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be the LM head [V, H], got shape {_shape(weight)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dim must equal weight's H={weight.shape[1]} (weight is [V, H]); "
            f"got hidden {_shape(hidden)}, weight {_shape(weight)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocabulary row, got V=0")
    if weight.shape[1] == 0:
        raise ValueError("hidden size H must be at least 1, got H=0 (hidden [..., 0], weight [V, 0])")
    if hidden.device.type == "meta" or weight.device.type == "meta":
        raise ValueError("hidden and weight must hold data: got a tensor on the meta device")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if bias is not None:
        bias = check_tensor("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be [V]=[{weight.shape[0]}], got {_shape(bias)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias ({bias.dtype}) must have weight's dtype ({weight.dtype})")
    check_same_device(hidden.device, weight=weight, bias=bias)
    return weight, bias


def add_head_value_checks(
    checks: ValueChecks,
    hidden: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    rows: Tensor | None = None,
) -> None:
    """hidden (at the ``rows`` that count, default all), weight and bias must be finite (None: not
    checked): a NaN there would only show as a NaN loss. One read of each, in the checks' single transfer.

    The calls run this up front only where the result cannot tell (a soft cap turns an inf logit into a
    finite one); otherwise :mod:`.finite_check` runs it when a result is not finite."""
    if hidden is not None and hidden.numel():
        finite_rows = torch.isfinite(hidden).all(-1)
        bad = ~finite_rows if rows is None else ~finite_rows & rows.reshape(finite_rows.shape)
        checks.add(bad.any(), lambda: "hidden must be finite (NaN or inf found at a position that counts)")
    if weight is not None and weight.numel():
        checks.add(~torch.isfinite(weight).all(), lambda: "weight (the LM head) must be finite")
    add_bias_value_check(checks, bias)


def add_bias_value_check(checks: ValueChecks, bias: Tensor | None) -> None:
    """bias must be finite; checked up front always ([V] values: nothing to save), because a -inf bias
    (a banned token) leaves every row's statistics finite."""
    if bias is not None and bias.numel():
        checks.add(~torch.isfinite(bias).all(), lambda: "bias must be finite")


def check_targets(
    targets: object,
    shape: torch.Size,
    vocab: int,
    valid: Tensor | None = None,
    checks: ValueChecks | None = None,
) -> Tensor:
    """Integer ids of the given shape, in [0, V) wherever ``valid`` (the mask) is set.

    The range check runs now, or with ``checks`` when that collector runs."""
    targets = check_tensor("targets", targets)
    if targets.dtype not in INT_DTYPES:
        raise TypeError(f"targets must be an integer tensor of token ids, got {targets.dtype}")
    if targets.shape != shape:
        raise ValueError(
            f"targets must have shape {list(shape)} (hidden without its last dim), got {_shape(targets)}"
        )
    if targets.numel():
        where = "" if valid is None else " at unmasked positions"
        # Masked positions may hold anything (-100): neutral values there, without a boolean index.
        ids = targets.long()
        if valid is not None:
            big = torch.iinfo(torch.int64)
            lo, hi = torch.where(valid, ids, big.max).min(), torch.where(valid, ids, big.min).max()
        else:
            lo, hi = ids.min(), ids.max()
        own = checks if checks is not None else ValueChecks()
        own.add(
            (lo < 0) | (hi >= vocab),
            lambda lo, hi: f"targets{where} must lie in [0, V={vocab}), got values in [{lo:.0f}, {hi:.0f}]",
            lo,
            hi,
        )
        if checks is None:
            own.run()
    return targets


def check_logp(name: str, x: object, shape: torch.Size) -> Tensor | None:
    if x is None:
        return None
    x = check_tensor(name, x)
    check_float(name, x)
    if x.shape != shape:
        raise ValueError(f"{name} must have targets' shape {list(shape)}, got {_shape(x)}")
    return x.float()


@dataclass(frozen=True)
class LossInputs:
    """grpo_loss's inputs, flattened to [N] tokens and B sequences."""

    hidden: Tensor  # [N, H]
    targets: Tensor  # [N] int64 (0 where masked)
    mask: Tensor  # [N] fp32
    seq_ids: Tensor  # [N] int64
    advantages: Tensor  # [B] fp32
    old_logp: Tensor | None
    ref_logp: Tensor | None
    num_items: Tensor | None  # 0-dim fp32
    token_advantages: Tensor | None = None  # [N] fp32 when advantages were given per token ([B, T])
    sampling_logp: Tensor | None = None  # [N] fp32 (NaN: the sampler could not score the token)
    is_ratio: Tensor | None = None  # [N] fp32, per token (a per-sequence ratio repeated on its tokens)


def _check_num_items(num_items: object, device: torch.device, checks: ValueChecks) -> Tensor | None:
    if num_items is None:
        return None
    if isinstance(num_items, Tensor):
        if num_items.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a scalar, got shape {_shape(num_items)}")
        if num_items.dtype == torch.bool or num_items.is_complex():
            raise TypeError(f"num_items_in_batch must be a real count, got a {num_items.dtype} tensor")
        value = num_items.reshape(()).to(device=device, dtype=torch.float32)
        checks.add(
            ~torch.isfinite(value) | (value < 0),
            lambda v: f"num_items_in_batch must be a non-negative count, got {v!r}",
            value,
        )
        return value  # stays on the device: no synchronization
    value = float(num_items)  # an int or float: the call record checked its type
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"num_items_in_batch must be a non-negative count, got {value!r}")
    return torch.tensor(value, dtype=torch.float32, device=device)


def validate_loss_inputs(
    hidden: object,
    weight: object,
    targets: object,
    mask: object,
    advantages: object,
    old_logp: object,
    ref_logp: object,
    bias: object,
    cfg: GRPOConfig,
    num_items_in_batch: object,
    seq_ids: object,
    vocab: int | None = None,
    sampling_logp: object = None,
    importance_sampling_ratio: object = None,
    checks: ValueChecks | None = None,
) -> tuple[LossInputs, Tensor, Tensor | None]:
    """``vocab``: the global vocabulary when ``weight`` is one shard of a vocab-parallel head. The
    non-tensor arguments (``cfg``, the type of ``num_items_in_batch``) were checked by the call record
    (:mod:`.plan`). ``checks``: the value checks go there, for the caller to run with its counts (nothing
    here reads the device then; the inputs are safe to index before they run); default: run here."""
    hidden = check_tensor("hidden", hidden)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [B, T, H] or packed [N, H], got shape {_shape(hidden)}")
    weight, bias = check_lm_head(hidden, weight, bias)
    vocab = weight.shape[0] if vocab is None else vocab
    token_shape = hidden.shape[:-1]
    device = hidden.device

    mask = check_tensor("mask", mask)
    check_same_device(device, mask=mask, targets=check_tensor("targets", targets))
    if mask.shape != token_shape:
        raise ValueError(
            f"mask must have shape {list(token_shape)} (hidden without its last dim), got {_shape(mask)}"
        )
    if mask.dtype == torch.bool or mask.dtype in INT_DTYPES or mask.dtype in FLOAT_DTYPES:
        mask_f = mask.float()
    else:
        raise TypeError(f"mask must be a bool, integer or float tensor, got {mask.dtype}")
    own_checks = checks is None
    checks = ValueChecks() if own_checks else checks  # every value check, run in one transfer
    if mask_f.numel():
        checks.add(
            ~torch.isfinite(mask_f).all() | (mask_f < 0).any(),
            lambda: "mask must hold finite non-negative values (1 = token counts, 0 = padding)",
        )
    targets = check_targets(targets, token_shape, vocab, valid=mask_f != 0, checks=checks)
    if cfg.logit_softcap is not None:  # the cap hides an inf from the result: check up front
        add_head_value_checks(checks, hidden, weight, bias, rows=mask_f != 0)
    else:  # hidden and weight from the result (finite_check), bias now
        add_bias_value_check(checks, bias)

    advantages = check_tensor("advantages", advantages)
    check_float("advantages", advantages)
    token_adv = None
    if hidden.dim() == 3 and advantages.dim() == 2 and advantages.shape == token_shape:
        # Per-token advantages (TRL's (B, T) branch): the per-sequence vector is only a placeholder.
        token_adv = advantages.reshape(-1).float()
        advantages = advantages.new_zeros(advantages.shape[0])
    elif advantages.dim() == 2 and advantages.shape[1] == 1:
        advantages = advantages.squeeze(1)
    if advantages.dim() != 1:
        per_token = f" or [B, T] = {list(token_shape)} (one per token)" if hidden.dim() == 3 else ""
        raise ValueError(
            f"advantages must be [B] (one per sequence){per_token}, got shape {_shape(advantages)}"
        )
    if hidden.dim() == 3:
        if advantages.shape[0] != hidden.shape[0]:
            raise ValueError(
                f"advantages must have one value per sequence, B={hidden.shape[0]}, got {advantages.shape[0]}"
            )
        if seq_ids is not None:
            raise ValueError("seq_ids is only for packed [N, H] hidden; [B, T, H] already says the sequences")
        num_seqs, length = hidden.shape[0], hidden.shape[1]
        seq_ids_t = torch.arange(num_seqs, device=device).repeat_interleave(length)
    else:
        if seq_ids is None:
            raise ValueError("packed [N, H] hidden needs seq_ids [N]: the sequence index of every token")
        seq_ids_t = check_tensor("seq_ids", seq_ids)
        if seq_ids_t.dtype not in INT_DTYPES or seq_ids_t.shape != token_shape:
            raise ValueError(
                f"seq_ids must be an integer tensor of shape {list(token_shape)}, got "
                f"{seq_ids_t.dtype} {_shape(seq_ids_t)}"
            )
        num_seqs = advantages.shape[0]
        in_range = f"seq_ids must lie in [0, B={num_seqs}) where B = len(advantages)"
        if seq_ids_t.numel() and num_seqs == 0:
            raise ValueError(in_range)
        if seq_ids_t.numel():
            checks.add((seq_ids_t.min() < 0) | (seq_ids_t.max() >= num_seqs), lambda: in_range)
        # Indexable before the checks are read (an identity once they pass): no out-of-range gather then.
        seq_ids_t = seq_ids_t.long().clamp(0, max(num_seqs - 1, 0))
    checks.add(
        ~torch.isfinite(advantages if token_adv is None else token_adv).all(),
        lambda: "advantages must be finite (group_advantages maps unscorable completions to 0)",
    )

    old = check_logp("old_logp", old_logp, token_shape)
    ref = check_logp("ref_logp", ref_logp, token_shape)
    for name, logp in (("old_logp", old), ("ref_logp", ref)):
        if logp is not None and logp.numel() and logp.device == mask_f.device:
            # Log-probs: finite and <= 0 wherever they count (a little above 0 is rounding, e.g. bf16).
            bad = (~torch.isfinite(logp) | (logp > LOGP_ROUNDING)) & (mask_f != 0)
            checks.add(
                bad.any(),
                lambda name=name: (
                    f"{name} must hold finite log-probs (<= 0) at unmasked positions; "
                    "got NaN, inf or positive values"
                ),
            )
    sampling = check_logp("sampling_logp", sampling_logp, token_shape)
    if sampling is not None and sampling.numel() and sampling.device == mask_f.device:
        # NaN is allowed (vLLM could not score the token: it adds no KL evidence, as in TRL).
        checks.add(
            ((sampling > LOGP_ROUNDING) & (mask_f != 0)).any(),
            lambda: "sampling_logp must hold log-probs (<= 0) at unmasked positions; got positive values",
        )
    is_ratio, ratio_per_seq = _check_is_ratio(
        importance_sampling_ratio, token_shape, num_seqs, mask_f, checks
    )
    if ratio_per_seq and cfg.loss_type == "vespo":
        raise ValueError(
            "loss_type='vespo' takes a per-token importance_sampling_ratio (targets' shape), as TRL's "
            "token_truncate / token_mask modes give it; a per-sequence ratio is not defined for VESPO"
        )
    if cfg.beta != 0.0 and ref is None:
        raise ValueError(f"beta={cfg.beta} needs ref_logp (the reference model's per-token log-probs)")
    check_same_device(
        device,
        mask=mask,
        targets=targets,
        advantages=advantages,
        old_logp=old,
        ref_logp=ref,
        sampling_logp=sampling,
        seq_ids=seq_ids_t,
    )
    num_items = _check_num_items(num_items_in_batch, device, checks)
    if own_checks:
        checks.run()

    flat_mask = mask_f.reshape(-1)
    inputs = LossInputs(
        hidden=hidden.reshape(-1, hidden.shape[-1]),
        targets=torch.where(flat_mask != 0, targets.reshape(-1).long(), 0),
        mask=flat_mask,
        seq_ids=seq_ids_t.reshape(-1),
        advantages=advantages.float(),
        old_logp=old.reshape(-1) if old is not None else None,
        ref_logp=ref.reshape(-1) if ref is not None else None,
        num_items=num_items,
        token_advantages=token_adv,
        sampling_logp=sampling.reshape(-1) if sampling is not None else None,
        # a per-sequence ratio on its tokens (seq_ids clamped into range above)
        is_ratio=is_ratio[seq_ids_t.reshape(-1)] if ratio_per_seq else is_ratio,
    )
    return inputs, weight, bias


def _check_is_ratio(
    ratio: object, token_shape: torch.Size, num_seqs: int, mask: Tensor, checks: ValueChecks
) -> tuple[Tensor | None, bool]:
    """The vLLM importance-sampling ratio, flat: given per token (targets' shape) or per sequence ([B, 1],
    or [B] for [B, T] inputs), and whether it is per sequence; finite and >= 0 where it counts."""
    if ratio is None:
        return None, False
    ratio = check_tensor("importance_sampling_ratio", ratio)
    check_float("importance_sampling_ratio", ratio)
    per_seq_shapes = [(num_seqs, 1)] + ([(num_seqs,)] if len(token_shape) == 2 else [])
    per_seq = ratio.shape != token_shape
    if per_seq and tuple(ratio.shape) not in per_seq_shapes:
        raise ValueError(
            f"importance_sampling_ratio must be per token, {list(token_shape)}, or per sequence, "
            f"{' or '.join(str(list(s)) for s in per_seq_shapes)}; got {_shape(ratio)}"
        )
    check_same_device(mask.device, importance_sampling_ratio=ratio)
    flat = ratio.reshape(-1).float()
    if flat.numel():
        bad = ~torch.isfinite(flat) | (flat < 0)
        checks.add(
            (bad if per_seq else bad & (mask.reshape(-1) != 0)).any(),
            lambda: "importance_sampling_ratio must be finite and >= 0 at unmasked positions",
        )
    return flat, per_seq


def validate_advantage_inputs(
    rewards: object, group_size: object, scale: object, eps: object, reward_weights: object
) -> tuple[Tensor, Tensor, int]:
    """rewards -> [M, R] fp32, weights -> [R] fp32, and the group size."""
    rewards = check_tensor("rewards", rewards)
    check_float("rewards", rewards)
    if rewards.dim() not in (1, 2):
        raise ValueError(
            f"rewards must be [B*G] or [B*G, R] (R reward functions), got shape {_shape(rewards)}"
        )
    if rewards.device.type == "meta":
        raise ValueError("rewards must hold data: got a tensor on the meta device")
    if rewards.numel() == 0:
        raise ValueError(f"rewards is empty (shape {_shape(rewards)}): there are no completions to score")
    rewards2d = rewards.float().reshape(rewards.shape[0], -1)
    if torch.isinf(rewards2d).any():  # beyond fp32 too (1e39): an advantage of +-inf otherwise
        raise ValueError("rewards must be finite in fp32 (NaN means: this reward does not apply); got inf")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards2d.shape[0] % group_size:
        raise ValueError(
            f"group_size={group_size} must divide the number of completions, {rewards2d.shape[0]} "
            "(rewards hold B prompts x G completions)"
        )
    if scale not in SCALE_MODES:
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    num_funcs = rewards2d.shape[1]
    if reward_weights is None:
        weights = torch.ones(num_funcs, dtype=torch.float32, device=rewards.device)
    else:
        try:
            weights = torch.as_tensor(reward_weights, dtype=torch.float32, device=rewards.device)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(
                f"reward_weights must be numbers (a sequence or tensor of floats), got {reward_weights!r}"
            ) from err
        if weights.shape != (num_funcs,):
            raise ValueError(
                f"reward_weights must have one weight per reward function, [{num_funcs}], "
                f"got {_shape(weights)}"
            )
        if not torch.isfinite(weights).all():
            raise ValueError("reward_weights must be finite")
    return rewards2d.contiguous(), weights, group_size
