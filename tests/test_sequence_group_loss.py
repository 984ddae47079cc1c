"""Sequence-parallel grpo_loss on 2 and 4 gloo ranks equals one process on the whole sequences.

Every rank holds a contiguous slice of one packed row of several sequences (uneven cuts: a rank holds no
token of some sequences, and at 4 ranks one holds no token at all). The ranks' losses add up to the
one-process loss, each rank's hidden gradient is its rows of the one-process one, the weight and bias
gradients add up to its, and every rank's metrics are the one-process metrics.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import grpo_fast as gf
from grpo_fast.config import LOSS_TYPES
from grpo_fast.engine import compile_ops
from grpo_fast.engine.plan import LossCall

from .spawn import spawn

LENGTHS = (9, 3, 14, 6, 5)  # tokens of each sequence in the packed row; sequence 1 fully masked
CUTS = {2: (0, 15, 37), 4: (0, 4, 20, 37, 37)}  # rank r holds tokens [cut[r], cut[r + 1])
V, H = 29, 12

BASE = dict(beta=0.04, max_completion_length=16)
CASES = [
    dict(BASE, loss_type=loss_type, importance_sampling_level=level)
    for loss_type in LOSS_TYPES
    for level in ("token", "sequence")
] + [
    dict(loss_type="dapo"),  # beta 0: zero-advantage rows skipped (one walk)
    dict(loss_type="grpo", importance_sampling_level="sequence"),  # the same, two walks
    dict(loss_type="grpo", delta=1.1, epsilon_high=0.28),
    dict(loss_type="luspo", importance_sampling_level="sequence", delta=1.05),
    dict(loss_type="bnpo", off_policy_mask_threshold=0.02),
    dict(loss_type="vespo", off_policy_mask_threshold=0.02, beta=0.04),
    dict(loss_type="grpo", top_entropy_quantile=0.5, entropy_coef=0.01),
    dict(loss_type="sapo", importance_sampling_level="sequence", top_entropy_quantile=0.3, entropy_coef=0.02),
    dict(loss_type="dr_grpo", max_completion_length=16, entropy_coef=0.05),
    dict(loss_type="cispo", importance_sampling_level="sequence", entropy_coef=0.05, beta=0.04),
]
SAMPLER_CASES = [
    dict(loss_type="vespo", off_policy_mask_threshold=0.01),
    dict(loss_type="grpo", importance_sampling_level="sequence", off_policy_mask_threshold=0.01),
    dict(loss_type="dapo", beta=0.04),
]
PADDED_CASES = [
    dict(loss_type="grpo", importance_sampling_level="sequence"),
    dict(loss_type="vespo", beta=0.04),
    dict(loss_type="bnpo", top_entropy_quantile=0.6, entropy_coef=0.01),
    dict(loss_type="dapo"),
]
SUBGROUP_CASES = [
    dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04),
    dict(loss_type="dapo", top_entropy_quantile=0.5, entropy_coef=0.01, off_policy_mask_threshold=0.02),
]
PADDED_CUTS = {2: (0, 5, 9), 4: (0, 2, 2, 7, 9)}  # columns of every row
IS_RATIO = torch.linspace(0.7, 1.3, sum(LENGTHS)).float()
# (dtype, backends, relative tolerance of loss, metrics and gradients)
TOLERANCES = ((torch.float64, ("torch",), 1e-6), (torch.float32, ("torch", "native"), 1e-6))


def _packed_batch(dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n, b = sum(LENGTHS), len(LENGTHS)
    seq_ids = torch.repeat_interleave(torch.arange(b), torch.tensor(LENGTHS))
    mask = (torch.rand(n, generator=g) > 0.2).float()
    mask[seq_ids == 1] = 0.0
    hidden = torch.randn(n, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * H**-0.5 * 2
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.1
    targets = torch.randint(0, V, (n,), generator=g)
    logp = torch.log_softmax(hidden @ weight.T + bias, -1).gather(1, targets[:, None])[:, 0]
    advantages = torch.tensor([0.7, -0.4, -1.1, 0.0, 0.9], dtype=torch.float64)
    return dict(
        hidden=hidden.to(dtype),
        weight=weight.to(dtype),
        bias=bias.to(dtype),
        targets=targets,
        mask=mask,
        advantages=advantages.to(dtype),
        old_logp=(logp + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)).float(),
        ref_logp=(logp + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)).float(),
        seq_ids=seq_ids,
    )


TOKEN_ARGS = (
    "targets",
    "mask",
    "old_logp",
    "ref_logp",
    "seq_ids",
    "sampling_logp",
    "importance_sampling_ratio",
)


def _loss(batch: dict, rows: object, cfg: gf.GRPOConfig, backend: str, group: object | None, **kwargs):
    """Loss, metrics and (hidden rows, weight, bias) gradients of the tokens ``rows`` of ``batch``."""
    leaves = [batch[k].detach().clone().requires_grad_(True) for k in ("hidden", "weight", "bias")]
    tokens = {k: batch[k][rows] for k in TOKEN_ARGS if batch.get(k) is not None}
    advantages = batch["advantages"]
    if advantages.dim() == 2:  # per token, padded layout
        advantages = advantages[rows]
    loss, metrics = gf.grpo_loss(
        leaves[0][rows], leaves[1], advantages=advantages, bias=leaves[2], config=cfg, backend=backend,
        chunk_size=8, sequence_group=group, **tokens, **kwargs,
    )  # fmt: skip
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), metrics, (grads[0][rows], grads[1], grads[2])


def _check(
    batch: dict, mine: object, cfg: gf.GRPOConfig, backend: str, rtol: float, group: object = None, **kwargs
) -> None:
    """This rank's share against one process on the whole batch (collectives: every rank calls it)."""
    where = f"{backend} {batch['hidden'].dtype} {cfg}"
    want, want_m, want_g = _loss(batch, slice(None), cfg, backend, None, **kwargs)
    group = dist.group.WORLD if group is None else group
    got, got_m, got_g = _loss(batch, mine, cfg, backend, group, **kwargs)
    total = got.clone()
    dist.all_reduce(total, group=group)
    torch.testing.assert_close(total, want, rtol=rtol, atol=1e-7, msg=lambda m: f"{where} loss: {m}")
    assert set(got_m) == set(want_m)
    for k in want_m:  # the whole sequences' metrics on every rank
        torch.testing.assert_close(
            got_m[k], want_m[k], rtol=rtol, atol=1e-6, equal_nan=True, msg=lambda m, k=k: f"{where} {k}: {m}"
        )
    torch.testing.assert_close(
        got_g[0], want_g[0][mine], rtol=rtol, atol=1e-7, msg=lambda m: f"{where} dh: {m}"
    )
    for name, got_w, want_w in zip(("dW", "db"), got_g[1:], want_g[1:], strict=True):
        dist.all_reduce(got_w, group=group)
        torch.testing.assert_close(
            got_w, want_w, rtol=rtol, atol=1e-7, msg=lambda m, n=name: f"{where} {n}: {m}"
        )


def _padded_batch(dtype: torch.dtype) -> dict:
    """The packed batch's first 36 tokens as 4 rows of 9, with per-token advantages (row 2 all 0)."""
    packed = _packed_batch(dtype)
    rows, length = 4, 9
    out = {}
    for k in ("hidden", "targets", "mask", "old_logp", "ref_logp"):
        x = packed[k][: rows * length]
        out[k] = x.reshape(rows, length, *x.shape[1:])
    out["weight"], out["bias"] = packed["weight"], packed["bias"]
    g = torch.Generator().manual_seed(1)
    adv = torch.randn(rows, length, generator=g, dtype=torch.float64)
    adv[2] = 0.0  # a row without gradient
    out["advantages"] = adv.to(dtype)
    return out


def _worker(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cut = CUTS[world]
        mine = slice(cut[rank], cut[rank + 1])
        for dtype, backends, rtol in TOLERANCES:
            batch = _packed_batch(dtype)
            for backend in backends:
                for options in CASES:
                    _check(batch, mine, gf.GRPOConfig(**options), backend, rtol)
            # The sampler's log-probs (one NaN: unscored) and the vLLM importance-sampling ratios.
            sampler = dict(batch, sampling_logp=batch["old_logp"] - 0.05, importance_sampling_ratio=IS_RATIO)
            sampler["sampling_logp"][5] = float("nan")
            for options in SAMPLER_CASES:
                _check(sampler, mine, gf.GRPOConfig(**options), "torch", rtol)
            # A global token count given (dapo), and the padded layout: rank r holds columns of every row.
            _check(batch, mine, gf.GRPOConfig(loss_type="dapo"), "torch", rtol, num_items_in_batch=41)
            padded = _padded_batch(dtype)
            columns = (slice(None), slice(*PADDED_CUTS[world][rank : rank + 2]))
            for options in PADDED_CASES:
                _check(padded, columns, gf.GRPOConfig(**options), "torch", rtol)
        # GRPOLoss holds the group; a sequence_group that is not a ProcessGroup is named.
        batch, cfg = (
            _packed_batch(torch.float32),
            gf.GRPOConfig(loss_type="grpo", importance_sampling_level="sequence"),
        )
        args = [batch[k][mine] for k in ("hidden", "weight", "targets", "mask")]
        args[1] = batch["weight"]
        kwargs = dict(old_logp=batch["old_logp"][mine], seq_ids=batch["seq_ids"][mine])
        module = gf.GRPOLoss(cfg, sequence_group=dist.group.WORLD)
        got = module(*args, batch["advantages"], **kwargs)[0]
        want = gf.grpo_loss(
            *args, batch["advantages"], config=cfg, sequence_group=dist.group.WORLD, **kwargs
        )[0]
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        with pytest.raises(TypeError, match="sequence_group must be a torch.distributed ProcessGroup"):
            gf.grpo_loss(*args, batch["advantages"], sequence_group="sp", **kwargs)
        if world == 2:
            _refused_together(rank, args, batch["advantages"], cfg, kwargs)
        if world == 4:  # 2 x 2: two sequence groups side by side, each on its own sequences
            groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
            group, sp_rank = groups[rank // 2], rank % 2
            mine = slice(*CUTS[2][sp_rank : sp_rank + 2])
            batch = _packed_batch(torch.float32, seed=1 + rank // 2)
            for options in SUBGROUP_CASES:
                _check(batch, mine, gf.GRPOConfig(**options), "native", 1e-6, group=group)
    finally:
        dist.destroy_process_group()


def _refused_together(rank: int, args: list, advantages: torch.Tensor, cfg: gf.GRPOConfig, kwargs: dict):
    """Inputs refused on one rank, or unlike across the ranks, stop every rank of the group with an error
    (none waits for the others in a collective); the group then works as before."""
    group = dist.group.WORLD
    nan_adv = advantages.clone()
    nan_adv[0] = float("nan")
    bad_targets = [args[0], args[1], args[2][:-1], args[3]]  # one target short: a shape error
    cases = [  # (this rank's args, advantages, kwargs; rank 1's error, rank 0's)
        (args, nan_adv, kwargs, "advantages must be finite", "another rank of the sequence group refused"),
        (bad_targets, advantages, kwargs, "targets", "another rank of the sequence group refused"),
        (args, advantages[:-1], kwargs, "seq_ids", "another rank of the sequence group refused"),
        (
            args,
            advantages,
            dict(kwargs, old_logp=None),
            "old_logp is given on some ranks",
            "old_logp is given on some ranks",
        ),
    ]
    for theirs, adv, extra, rank1_error, rank0_error in cases:
        mine = (theirs, adv, extra) if rank == 1 else (args, advantages, kwargs)
        with pytest.raises(ValueError, match=rank1_error if rank == 1 else rank0_error):
            gf.grpo_loss(*mine[0], mine[1], config=cfg, sequence_group=group, **mine[2])
    assert torch.isfinite(gf.grpo_loss(*args, advantages, config=cfg, sequence_group=group, **kwargs)[0])


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_group_equals_one_process(world, tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # several processes share this machine's cores
    spawn(_worker, args=(world, str(tmp_path / "rendezvous")), nprocs=world)


def test_sequence_group_refusals():
    hidden, weight = torch.randn(3, 4), torch.randn(5, 4)
    args = (hidden, weight, torch.zeros(3, dtype=torch.long), torch.ones(3), torch.ones(1))
    seq_ids = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="sequence_group was given but torch.distributed is not initialized"):
        gf.grpo_loss(*args, seq_ids=seq_ids, sequence_group=object())
    with pytest.raises(ValueError, match="sequence_group .* with process_group .* is not supported"):
        gf.grpo_loss(*args, seq_ids=seq_ids, sequence_group=object(), process_group=object())
    with pytest.raises(ValueError, match="sequence_group .* is not supported under torch.compile"):
        compile_ops.grpo_loss(LossCall(*args, seq_ids=seq_ids, sequence_group=object()))
