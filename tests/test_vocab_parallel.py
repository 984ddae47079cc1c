"""Vocab-parallel grpo_loss / selective_logprobs on 2 and 3 gloo ranks equal the single-process result.

Ranks rendezvous through a file (no fixed or free-port juggling). Each worker builds the same batch
from a seed, keeps its slice of the LM head (V not divisible by the world size) and checks loss,
metrics, hidden gradient and its weight/bias gradient rows against the unsharded computation.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import grpo_fast as gf

from .helpers import cast, make_batch
from .spawn import spawn

CASES = [
    dict(loss_type="dapo", importance_sampling_level="token", beta=0.04),
    dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04),
    dict(loss_type="cispo", importance_sampling_level="token", beta=0.0, epsilon_high=3.0),
    dict(loss_type="sapo", importance_sampling_level="token", beta=0.04, temperature=0.7),
]


def _shard_rows(V: int, world: int, rank: int) -> slice:
    bounds = torch.linspace(0, V, world + 1).round().long().tolist()
    return slice(bounds[rank], bounds[rank + 1])


def _worker(rank: int, world: int, init_file: str, backend: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        for i, options in enumerate(CASES):
            cfg = gf.GRPOConfig(**options)
            batch = cast(make_batch(seed=40 + i, dtype=torch.float64, V=1013), torch.float32)
            rows = _shard_rows(batch["weight"].shape[0], world, rank)
            args = (
                batch["targets"],
                batch["mask"],
                batch["advantages"],
                batch["old_logp"],
                batch["ref_logp"],
            )
            want, want_m = gf.grpo_loss(
                batch["hidden"],
                batch["weight"],
                *args,
                bias=batch["bias"],
                config=cfg,
                backend=backend,
                chunk_size=16,
            )
            wh, ww, wb = torch.autograd.grad(want, [batch["hidden"], batch["weight"], batch["bias"]])
            w_local = batch["weight"][rows].detach().clone().requires_grad_(True)
            b_local = batch["bias"][rows].detach().clone().requires_grad_(True)
            got, got_m = gf.grpo_loss(
                batch["hidden"],
                w_local,
                *args,
                bias=b_local,
                config=cfg,
                backend=backend,
                chunk_size=16 + rank,
                process_group=dist.group.WORLD,
            )
            gh, gw, gb = torch.autograd.grad(got, [batch["hidden"], w_local, b_local])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
            for k in want_m:
                torch.testing.assert_close(got_m[k], want_m[k], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(gh, wh, rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(gw, ww[rows], rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(gb, wb[rows], rtol=1e-4, atol=1e-7)

        # selective_logprobs: values, entropy and the gradient through the log-probs.
        h = batch["hidden"].detach().requires_grad_(True)
        tgt = batch["targets"].clamp(min=0)
        want_lp, want_ent = gf.selective_logprobs(
            h, batch["weight"], tgt, return_entropy=True, backend=backend
        )
        (want_g,) = torch.autograd.grad(want_lp.sum(), h)
        w_local = batch["weight"][rows].detach()
        got_lp, got_ent = gf.selective_logprobs(
            h, w_local, tgt, return_entropy=True, backend=backend, process_group=dist.group.WORLD
        )
        (got_g,) = torch.autograd.grad(got_lp.sum(), h)
        torch.testing.assert_close(got_lp, want_lp, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_ent, want_ent, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_g, want_g, rtol=1e-4, atol=1e-6)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_equals_single_process(world, tmp_path):
    # One intra-op thread per rank: 2-3 processes share this machine's cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    spawn(_worker, args=(world, str(tmp_path / "rendezvous"), "torch"), nprocs=world)


def test_process_group_needs_initialized_distributed():
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        gf.selective_logprobs(
            torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long), process_group=object()
        )
    with pytest.raises(ValueError, match="vocab_start is only meaningful with process_group"):
        gf.selective_logprobs(
            torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long), vocab_start=3
        )


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and dist.is_nccl_available()), reason="needs a CUDA GPU and NCCL"
)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_nccl_world_size_one_equals_plain_path(backend, tmp_path):
    """The vocab-parallel path over NCCL with one rank: every collective is real, the answer unchanged."""
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        for i, options in enumerate(CASES):
            cfg = gf.GRPOConfig(**options)
            batch = make_batch(seed=70 + i, dtype=torch.float64, V=4099)
            batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
            batch = cast(batch, torch.float32)
            args = tuple(batch[k] for k in ("targets", "mask", "advantages", "old_logp", "ref_logp"))
            leaves = [batch["hidden"], batch["weight"], batch["bias"]]
            results = []
            for group in (None, dist.group.WORLD):
                loss, metrics = gf.grpo_loss(
                    *leaves[:2], *args, bias=leaves[2], config=cfg, backend=backend, process_group=group
                )
                results.append((loss, metrics, torch.autograd.grad(loss, leaves)))
            (want, want_m, want_g), (got, got_m, got_g) = results
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
            for k in want_m:
                torch.testing.assert_close(got_m[k], want_m[k], rtol=1e-5, atol=1e-6)
            for g, w in zip(got_g, want_g, strict=True):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    finally:
        dist.destroy_process_group()
