"""The fused per-chunk pass of the token-level GRPO loss: statistics, ``g_t``, then dlogits in place.

One program per row: pass 1 walks the row's logits once for the online logsumexp, entropy and target
logit; the GRPO per-token terms then give ``g_t = w_t * dloss_t/dlogp_t`` in registers (a port of
``grpo_fast.objective.token_grad``, ties and clamp bounds included); pass 2 reads the row again and
overwrites it with ``g_t * (onehot - softmax) / T``. So the tile is read twice and written once, and
the statistics never leave the SM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import check_device, check_rows, check_tile, interpreting, row_block
from .chunk_stats import row_stats

# Loss families, as grpo_fast.objective numbers them (a test keeps the two in step).
FAMILY_CLIPPED, FAMILY_CISPO, FAMILY_SAPO = 0, 1, 2


@dataclass(frozen=True)
class TokenTerms:
    """Hyper-parameters of the per-token GRPO terms, all runtime kernel arguments (no recompiles).

    ``cispo_max`` is CISPO's cap on the ratio (TRL clamps at ``epsilon_high`` itself); ``lo``/``hi`` the
    clip range ``1 - epsilon_low`` / ``1 + epsilon_high``; ``delta`` the two-sided cap (None: off);
    ``beta`` the KL coefficient (0: no KL term, ref log-probs not read).
    """

    family: int = FAMILY_CLIPPED
    lo: float = 0.8
    hi: float = 1.2
    cispo_max: float = 0.2
    delta: float | None = None
    beta: float = 0.0
    bias_correction_kl: bool = True
    temperature: float = 1.0
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05


@triton.jit
def grpo_dlogp(
    logp,
    old,
    ref,
    adv,
    has_old,
    family,
    lo,
    hi,
    cispo_max,
    has_delta,
    delta,
    beta,
    bias_corr,
    tau_pos,
    tau_neg,
):
    """d loss_t / d logp_t of TRL's per-token GRPO loss (fp32 scalars); mirrors objective.token_grad."""
    # Start from fp32 values (not Python floats): both sides of a runtime branch must have one type.
    ratio = tl.full((), 1.0, tl.float32)
    if has_old != 0:
        ratio = tl.exp(logp - old)
    if family == 1:  # cispo: the clamped ratio is detached, so only logp's own factor is differentiated
        d = -tl.minimum(ratio, cispo_max) * adv
    elif family == 2:  # sapo: soft gate sigmoid(tau * (r - 1)) * 4 / tau
        tau = tl.where(adv > 0, tau_pos, tau_neg)
        sg = tl.sigmoid(tau * (ratio - 1.0))
        d = -adv * 4.0 * sg * (1.0 - sg) * ratio
    else:  # clipped surrogate -min(c1 * A, clamp(r, lo, hi) * A), c1 = min(r, delta) with delta set
        c1 = ratio
        dc1 = ratio
        if has_delta != 0:
            c1 = tl.minimum(ratio, delta)
            dc1 = tl.where(ratio <= delta, ratio, 0.0)  # clamp passes the gradient on its closed bound
        c2 = tl.minimum(tl.maximum(ratio, lo), hi)
        dc2 = tl.where((ratio >= lo) & (ratio <= hi), ratio, 0.0)
        a = c1 * adv
        b = c2 * adv
        # torch.min's backward splits the gradient evenly between equal arguments.
        tie = tl.where(a == b, 0.5, 0.0)
        ga = tl.where(a < b, 1.0, 0.0) + tie
        gb = tl.where(a > b, 1.0, 0.0) + tie
        d = -(ga * dc1 + gb * dc2) * adv
    if beta != 0.0:  # k3 KL: exp(ref - logp) - (ref - logp) - 1, times the ratio with bias correction
        diff = ref - logp
        e = tl.exp(diff)
        dkl = 1.0 - e
        if bias_corr != 0:
            dkl = (dkl + (e - diff - 1.0)) * ratio
        d = d + beta * dkl
    return d


@triton.jit
def _token_pass_kernel(
    logits_ptr,
    stride_row,
    targets_ptr,
    old_ptr,
    ref_ptr,
    adv_ptr,
    w_ptr,
    out_ptr,
    n_rows,
    n_cols,
    inv_t,
    has_old,
    family,
    lo,
    hi,
    cispo_max,
    has_delta,
    delta,
    beta,
    bias_corr,
    tau_pos,
    tau_neg,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    m, s, u, t = row_stats(row_ptr, target, n_cols, inv_t, BLOCK_V)
    log_s = tl.log(s)
    lse = m + log_s
    logp = t - lse
    tl.store(out_ptr + row, logp)
    tl.store(out_ptr + n_rows + row, log_s - u / s)

    old = logp
    if has_old != 0:
        old = tl.load(old_ptr + row)
    ref = logp
    if beta != 0.0:
        ref = tl.load(ref_ptr + row)
    adv = tl.load(adv_ptr + row)
    d = grpo_dlogp(
        logp, old, ref, adv, has_old, family, lo, hi, cispo_max, has_delta, delta, beta, bias_corr,
        tau_pos, tau_neg,
    )  # fmt: skip
    scale = tl.load(w_ptr + row) * d * inv_t

    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        valid = cols < n_cols
        z = tl.load(row_ptr + cols, mask=valid, other=0.0).to(tl.float32) * inv_t
        p = tl.exp(z - lse)
        onehot = (cols == target).to(tl.float32)
        tl.store(row_ptr + cols, (scale * (onehot - p)).to(logits_ptr.dtype.element_ty), mask=valid)


def token_pass_(
    logits: Tensor,
    targets: Tensor,
    old_logp: Tensor | None,
    ref_logp: Tensor | None,
    adv: Tensor,
    w: Tensor,
    terms: TokenTerms,
) -> tuple[Tensor, Tensor]:
    """Per-token (logp, entropy), fp32 ``[C]``; ``logits [C, V]`` is overwritten with dlogits.

    targets in ``[0, V)``; old_logp None means on-policy (ratio 1); ref_logp is read only when
    ``terms.beta != 0`` (and must then be given); adv and w (the reduction weight of each token) fp32 ``[C]``.
    """
    op = "token_pass_"
    check_tile(op, logits)
    rows, cols = logits.shape
    check_rows(op, "targets", targets, rows, (torch.int64, torch.int32))
    for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp), ("adv", adv), ("w", w)):
        check_rows(op, name, x, rows, (torch.float32,))
    check_device(op, logits, targets, old_logp, ref_logp, adv, w)
    if terms.beta != 0.0 and ref_logp is None:
        raise ValueError(f"{op}: beta={terms.beta} needs ref_logp (the KL term's reference log-probs)")
    if cols == 0:
        raise ValueError(f"{op}: the tile has no vocabulary columns")
    out = torch.empty(2, rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return out[0], out[1]
    block = row_block(cols, 1024 if interpreting() else 4096)
    _token_pass_kernel[(rows,)](
        logits,
        logits.stride(0),
        targets,
        old_logp if old_logp is not None else adv,  # never read without the flag
        ref_logp if ref_logp is not None else adv,
        adv,
        w,
        out,
        rows,
        cols,
        1.0 / terms.temperature,
        int(old_logp is not None),
        int(terms.family),
        float(terms.lo),
        float(terms.hi),
        float(terms.cispo_max),
        int(terms.delta is not None),
        float(terms.delta) if terms.delta is not None else 0.0,
        float(terms.beta),
        int(terms.bias_correction_kl),
        float(terms.sapo_tau_pos),
        float(terms.sapo_tau_neg),
        BLOCK_V=block,
        num_warps=8 if block >= 2048 else 4,
    )
    return out[0], out[1]
