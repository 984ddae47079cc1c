"""Shared by the per-chunk op tests of every backend (native, Triton): logits tiles on odd sizes, their
fp64 truth, and the GRPO cases that reach every branch of the per-token terms."""

from __future__ import annotations

import torch

import grpo_fast as gf

C, V, H = 37, 1013, 67


def tile(dtype: torch.dtype, seed: int = 0, rows: int = C, cols: int = V, device: str = "cpu"):
    """A logits tile with a wide spread (some rows peaked, some flat) and its targets."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.linspace(0.1, 8.0, rows, dtype=torch.float64).unsqueeze(1)
    logits = (torch.randn(rows, cols, generator=g, dtype=torch.float64) * spread + 3.0).to(dtype)
    return logits.to(device), torch.randint(0, cols, (rows,), generator=g).to(device)


def truth_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    z = logits.double() / temperature
    lse = torch.logsumexp(z, -1)
    log_probs = z - lse.unsqueeze(1)
    probs = log_probs.exp()
    entropy = -torch.where(probs > 0, probs * log_probs, 0.0).sum(-1)  # -inf logits (masked) add 0
    return lse, log_probs.gather(1, targets.unsqueeze(1)).squeeze(1), entropy


def truth_dlogits(logits, targets, lse, g, temperature):
    z = logits.double() / temperature
    onehot = torch.nn.functional.one_hot(targets, logits.shape[1]).double()
    return g.double().unsqueeze(1) / temperature * (onehot - torch.exp(z - lse.double().unsqueeze(1)))


def grpo_cases():
    """(name, config, with_old, with_ref): every family, ties (on-policy), delta, the KL variants."""
    yield "dapo", gf.GRPOConfig(loss_type="dapo", epsilon_high=0.28, beta=0.04), True, True
    yield "dapo-onpolicy", gf.GRPOConfig(loss_type="dapo", beta=0.04), False, True
    yield "grpo-delta", gf.GRPOConfig(loss_type="grpo", delta=1.1, beta=0.0), True, False
    yield (
        "bnpo-nobiascorr",
        gf.GRPOConfig(loss_type="bnpo", beta=0.1, use_bias_correction_kl=False),
        True,
        True,
    )
    yield "cispo", gf.GRPOConfig(loss_type="cispo", epsilon_high=1.1, beta=0.04), True, True
    yield "sapo", gf.GRPOConfig(loss_type="sapo", sapo_temperature_neg=2.0, beta=0.0), True, False
    yield "sapo-onpolicy", gf.GRPOConfig(loss_type="sapo", beta=0.04), False, True
    yield "ref-unused", gf.GRPOConfig(loss_type="dapo", beta=0.0), True, True  # beta 0: ref never read
    # Ratio exactly 1 sits on every closed bound at once: delta = 1 - epsilon_low = 1 + epsilon_high = 1.
    closed = gf.GRPOConfig(loss_type="grpo", delta=1.0, epsilon_low=0.0, epsilon_high=0.0)
    yield "grpo-closed-bounds", closed, True, False


CASES = list(grpo_cases())
CASE_IDS = [c[0] for c in CASES]


def token_inputs(logp64: torch.Tensor, with_old: bool, with_ref: bool, seed: int):
    """old/ref log-probs within ~0.3 nats of logp64, advantages (some 0: ties) and token weights."""
    gen = torch.Generator().manual_seed(seed)
    n, device = logp64.shape[0], logp64.device
    noise = lambda: 0.3 * torch.randn(n, generator=gen, dtype=torch.float64).to(device)  # noqa: E731
    old = (logp64 + noise()).float() if with_old else None
    ref = (logp64 + noise()).float() if with_ref else None
    adv = torch.randn(n, generator=gen).to(device)
    adv[:4] = 0.0  # zero advantage: ties between the two clipped branches
    w = torch.rand(n, generator=gen).to(device) / n
    return old, ref, adv, w


def ratio_spread(logp: torch.Tensor, with_old: bool) -> torch.Tensor | None:
    """Old log-probs putting ratios over both clip bounds and delta, and exactly 1 (ties) for some."""
    if not with_old:
        return None
    old = logp - torch.linspace(-0.6, 0.6, logp.shape[0], device=logp.device)
    old[:3] = logp[:3]
    return old


def truth_entropy_grad(logits, targets, g, e, temperature):
    """fp64 autograd of sum(g * logp[target]) + sum(e * H) w.r.t. the raw logits. A target outside the tile
    (another shard's token) adds its logit, a constant here: logp = -lse + const. Masked -inf logits are
    taken as -1e4, whose exp is exactly 0 in fp64 too."""
    x = logits.double().nan_to_num(neginf=-1e4).requires_grad_(True)
    z = x / temperature
    lse = torch.logsumexp(z, -1)
    owned = (targets >= 0) & (targets < x.shape[1])
    logp = z.gather(1, targets.clamp(0, x.shape[1] - 1).unsqueeze(1)).squeeze(1) * owned - lse
    log_probs = z - lse.unsqueeze(1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    loss = (g.double() * logp).sum() + (e.double() * entropy).sum()
    return torch.autograd.grad(loss, x)[0]


def run_logprobs(fn, batch, temperature, **kw):
    """logp, entropy and the gradients of a fixed weighting of logp."""
    logp, ent = fn(
        batch["hidden"], batch["weight"], batch["targets"], batch.get("bias"), temperature,
        return_entropy=True, **kw,
    )  # fmt: skip
    weights = torch.linspace(-1, 1, logp.numel(), dtype=torch.float64, device=logp.device)
    names = [k for k in ("hidden", "weight", "bias") if batch.get(k) is not None]
    g = torch.autograd.grad((logp.double() * weights.reshape(logp.shape)).sum(), [batch[k] for k in names])
    return logp.cpu(), ent.cpu(), {k: v.cpu() for k, v in zip(names, g, strict=True)}
