"""grpo_loss of every CPU backend against the fp64 truth: all loss types, levels, dtypes, values and grads."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import grpo_fast as gf
from grpo_fast import backends
from grpo_fast.config import LOSS_TYPES

from .helpers import assert_within, cast, grads, make_batch


def cpu_backends(op: str) -> list[str]:
    """Backends that run `op` on CPU tensors here (Triton's interpreter runs has its own, smaller tests)."""
    out = []
    for name in ("torch", "native"):
        try:
            backends.resolve(name, torch.device("cpu"), op)
        except ValueError:
            continue
        out.append(name)
    return out


LOSS_BACKENDS = cpu_backends("grpo_loss")


def run_loss(batch: dict, cfg: gf.GRPOConfig, fn, **kw):
    args = {k: batch.get(k) for k in ("old_logp", "ref_logp", "bias")}
    loss, metrics = fn(
        batch["hidden"],
        batch["weight"],
        batch["targets"],
        batch["mask"],
        batch["advantages"],
        config=cfg,
        **args,
        **kw,
    )
    return loss, metrics, grads(loss, batch)


def check_against_truth(
    batch64: dict,
    cfg: gf.GRPOConfig,
    dtype: torch.dtype,
    backend: str,
    device: str | None = None,
    data: dict | None = None,
    **kw,
) -> None:
    """``backend`` (on ``device``, default: where the batch is) vs the fp64 truth, by the tolerance rule;
    ``data``: more inputs of both (sampling_logp, importance_sampling_ratio)."""
    data = data or {}
    truth = run_loss(cast(batch64, torch.float64), cfg, gf.reference.grpo_loss, **data)
    same = run_loss(cast(batch64, dtype), cfg, gf.reference.grpo_loss, **data)
    if device is not None:
        batch64 = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch64.items()}
        data = {k: v.to(device) for k, v in data.items()}
    got = run_loss(cast(batch64, dtype), cfg, gf.grpo_loss, backend=backend, **data, **kw)
    assert_within("loss", got[0], same[0], truth[0], dtype)
    assert set(got[1]) == set(truth[1])
    for k in truth[1]:
        assert_within(f"metric {k}", got[1][k], same[1][k], truth[1][k], dtype)
    for k in truth[2]:
        assert got[2][k].dtype == dtype and got[2][k].shape == truth[2][k].shape
        assert_within(f"grad {k}", got[2][k], same[2][k], truth[2][k], dtype)


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_matches_truth(backend, dtype, level, loss_type, beta):
    cfg = gf.GRPOConfig(
        loss_type=loss_type,
        importance_sampling_level=level,
        beta=beta,
        epsilon_high=0.28,
        max_completion_length=40,
        temperature=0.8,
    )
    # crc32, not hash(): str hashes change per process, and a failure must reproduce.
    seed = zlib.crc32(f"{level}-{loss_type}-{beta}".encode()) % 1000
    batch = make_batch(seed=seed, dtype=torch.float64, with_ref=beta > 0)
    check_against_truth(batch, cfg, dtype, backend, chunk_size=16)


TRL_OPTIONS = [
    "entropy_quantile",
    "off_policy",
    "entropy_bonus",
    "is_token",
    "is_sequence",
    "token_adv",
    "all",
]


def option_inputs(option: str, batch: dict, seed: int) -> tuple[dict, dict]:
    """GRPOConfig fields and extra grpo_loss inputs for one of TRL 1.16's loss options (or all of them)."""
    g = torch.Generator().manual_seed(seed)
    B, T = batch["targets"].shape
    opts, data = {}, {}
    if option in ("entropy_quantile", "all"):
        opts["top_entropy_quantile"] = 0.3
    if option in ("off_policy", "all"):
        opts["off_policy_mask_threshold"] = 0.02
        sampling = batch["old_logp"].double() - 0.1 * torch.rand(B, T, generator=g, dtype=torch.float64)
        sampling[0, 2] = float("nan")  # unscored by the sampler
        data["sampling_logp"] = sampling.float()
    if option in ("entropy_bonus", "all"):
        opts["entropy_coef"] = 0.05
    if option in ("is_token", "is_sequence", "all"):
        shape = (B, 1) if option == "is_sequence" else (B, T)
        ratio = torch.exp(0.3 * torch.randn(*shape, generator=g, dtype=torch.float64))
        if shape[1] > 1:
            ratio = torch.where(batch["mask"] != 0, ratio, 1.0)
        data["importance_sampling_ratio"] = ratio.float()
    if option in ("token_adv", "all"):
        batch["advantages"] = torch.randn(B, T, generator=g, dtype=torch.float64)
    return opts, data


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("option", TRL_OPTIONS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_trl_loss_options_match_truth(backend, option, loss_type, level):
    if loss_type == "vespo" and option == "is_sequence":
        pytest.skip("TRL's VESPO takes token-level IS modes only (a named ValueError here)")
    seed = zlib.crc32(f"{option}-{loss_type}-{level}".encode()) % 1000
    batch = make_batch(seed=seed, dtype=torch.float64)
    opts, data = option_inputs(option, batch, seed)
    cfg = gf.GRPOConfig(
        loss_type=loss_type, importance_sampling_level=level, beta=0.04, epsilon_high=0.28,
        max_completion_length=40, temperature=0.8, **opts,
    )  # fmt: skip
    # fp32: the entropy quantile is a threshold, and bf16's entropy error moves tokens across it.
    check_against_truth(batch, cfg, torch.float32, backend, data=data, chunk_size=16)


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "cispo", "sapo"])
def test_on_policy_without_old_logp(backend, loss_type):
    cfg = gf.GRPOConfig(loss_type=loss_type, beta=0.04, epsilon_high=5.0 if loss_type == "cispo" else 0.28)
    batch = make_batch(seed=3, dtype=torch.float64, with_old=False)
    check_against_truth(batch, cfg, torch.float32, backend)


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize(
    "options",
    [
        dict(delta=1.2),
        dict(use_bias_correction_kl=False, beta=0.1),
        dict(epsilon_low=0.05, epsilon_high=0.05),
        dict(sapo_temperature_pos=2.0, sapo_temperature_neg=0.5, loss_type="sapo"),
    ],
)
def test_options(backend, options):
    cfg = gf.GRPOConfig(**{"beta": 0.04, **options})
    check_against_truth(make_batch(seed=5, dtype=torch.float64), cfg, torch.float32, backend, chunk_size=7)


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("num_items", [None, 17, 1000.0, torch.tensor(250)])
def test_num_items_in_batch(backend, num_items):
    batch = make_batch(seed=6, dtype=torch.float64)
    cfg = gf.GRPOConfig(loss_type="dapo", beta=0.04)
    args = dict(
        bias=batch["bias"],
        old_logp=batch["old_logp"],
        ref_logp=batch["ref_logp"],
        config=cfg,
        num_items_in_batch=num_items,
    )
    common = (batch["hidden"], batch["weight"], batch["targets"], batch["mask"], batch["advantages"])
    want, _ = gf.reference.grpo_loss(*common, **args)
    got, _ = gf.grpo_loss(*common, **args, backend=backend)
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_packed_input_matches_padded(backend, level):
    """[N, H] + seq_ids gives the [B, T, H] answer (tokens of sequences interleaved on purpose)."""
    batch = make_batch(seed=7, dtype=torch.float64, B=4, T=9)
    cfg = gf.GRPOConfig(loss_type="grpo", importance_sampling_level=level, beta=0.04)
    B, T, H = batch["hidden"].shape
    perm = torch.randperm(B * T, generator=torch.Generator().manual_seed(0))
    seq_ids = torch.arange(B).repeat_interleave(T)[perm]
    flat = lambda x: x.reshape(B * T, *x.shape[2:])[perm]  # noqa: E731
    want = run_loss(batch, cfg, gf.reference.grpo_loss)
    packed = dict(
        batch,
        hidden=flat(batch["hidden"]),
        targets=flat(batch["targets"]),
        mask=flat(batch["mask"]),
        old_logp=flat(batch["old_logp"]),
        ref_logp=flat(batch["ref_logp"]),
    )
    for fn, kw in ((gf.reference.grpo_loss, {}), (gf.grpo_loss, dict(backend=backend))):
        got = run_loss(packed, cfg, fn, seq_ids=seq_ids, **kw)
        # fp64 inputs; the fused path keeps fp32 per-token statistics, hence ~1e-7 absolute.
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got[2]["hidden"], flat(want[2]["hidden"]), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(got[2]["weight"], want[2]["weight"], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_all_masked_gives_zero_loss_and_grads(backend, loss_type):
    batch = cast(make_batch(seed=8, dtype=torch.float64), torch.float32)
    batch["mask"] = torch.zeros_like(batch["mask"])
    cfg = gf.GRPOConfig(loss_type=loss_type, beta=0.04, max_completion_length=40)
    loss, metrics, g = run_loss(batch, cfg, gf.grpo_loss, backend=backend)
    assert loss.item() == 0.0
    # VESPO's phi of a sequence without tokens is phi(w=1) = 1, as TRL has it; the per-sequence clip
    # extremes have no sequence with tokens: NaN, as TRL's nanmin/nanmax; every other metric is 0.
    special = {"vespo/phi_seq_mean": 1.0, "clip_ratio_low_min": math.nan, "clip_ratio_high_max": math.nan}
    for k, v in metrics.items():
        want = special.get(k, 0.0)
        assert math.isnan(v.item()) if math.isnan(want) else v.item() == want, (k, v)
    assert all(torch.count_nonzero(v) == 0 for v in g.values())


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_float_mask_weights_and_frozen_head(backend):
    """Fractional mask values weight tokens as in TRL; a frozen weight gets no gradient work."""
    batch = make_batch(seed=9, dtype=torch.float64)
    batch["mask"] = batch["mask"] * torch.rand(
        batch["mask"].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    batch = cast(batch, torch.float32)
    batch["weight"].requires_grad_(False)
    batch.pop("bias")
    cfg = gf.GRPOConfig(loss_type="bnpo", beta=0.04)
    common = (batch["hidden"], batch["weight"], batch["targets"], batch["mask"], batch["advantages"])
    kw = dict(old_logp=batch["old_logp"], ref_logp=batch["ref_logp"], config=cfg)
    want, _ = gf.reference.grpo_loss(*common, **kw)
    (gw,) = torch.autograd.grad(want, batch["hidden"])
    got, _ = gf.grpo_loss(*common, **kw, backend=backend)
    (gg,) = torch.autograd.grad(got, batch["hidden"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gg, gw, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_backward_scales_by_upstream_grad_and_module(backend):
    batch = cast(make_batch(seed=10, dtype=torch.float64), torch.float32)
    loss_fn = gf.GRPOLoss(gf.GRPOConfig(beta=0.04), backend=backend)
    args = (
        batch["hidden"],
        batch["weight"],
        batch["targets"],
        batch["mask"],
        batch["advantages"],
        batch["old_logp"],
        batch["ref_logp"],
        batch["bias"],
    )
    loss, _ = loss_fn(*args)
    (g1,) = torch.autograd.grad(loss, batch["hidden"])
    loss, _ = loss_fn(*args)
    (g3,) = torch.autograd.grad(3.0 * loss, batch["hidden"])
    torch.testing.assert_close(g3, 3.0 * g1)
    assert "backend='" + backend + "'" in repr(loss_fn)


def test_auto_chunk_size_respects_budget(monkeypatch):
    from grpo_fast.engine.tile_size import auto_chunk_size

    monkeypatch.setenv("GRPO_FAST_CHUNK_BUDGET_MB", "1")
    rows = auto_chunk_size(10_000, 1013, torch.float32, torch.device("cpu"), 3)
    assert 1 <= rows and rows * 1013 * 16 <= 2**20
    monkeypatch.setenv("GRPO_FAST_CHUNK_BUDGET_MB", "-3")
    with pytest.raises(ValueError, match="GRPO_FAST_CHUNK_BUDGET_MB"):
        auto_chunk_size(10, 10, torch.float32, torch.device("cpu"), 3)


@pytest.mark.parametrize(
    "n, v, want",
    [(16384, 151936, [8192, 8192]), (32768, 152064, [11008, 11008, 10752]), (8192, 151936, [8192])],
)
def test_tiles_are_balanced(monkeypatch, n, v, want):
    """The tokens are shared evenly among the fewest tiles the budget allows, in multiples of 128 rows: no
    thin remainder tile (16384 tokens under a 14128-row budget are not 14128 + 2256)."""
    from grpo_fast.engine import tile_size, tiles

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (130 * 2**30, 141 * 2**30))
    rows = tile_size.auto_chunk_size(n, v, torch.bfloat16, torch.device("cuda"), fp32_temps=0)
    assert [e - s for s, e in tiles.chunks(n, rows)] == want
    assert rows % 128 == 0 and rows * v * 2 <= 4 * 2**30


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_weight_gradient_accumulator_needs_no_zero_fill(monkeypatch, dtype):
    """The fp32 dW accumulator starts as garbage (here NaN) and the first chunk overwrites it (beta = 0)."""
    from grpo_fast.engine import gradients

    original = gradients.Grads.allocate

    def poisoned(*args, **kwargs):
        grads = original(*args, **kwargs)
        if grads.weight is not None:
            grads.weight.fill_(float("nan"))
        return grads

    batch = make_batch(seed=40, dtype=torch.float64)
    cfg = gf.GRPOConfig(beta=0.04)
    want = run_loss(cast(batch, dtype), cfg, gf.grpo_loss, backend="torch", chunk_size=7)
    monkeypatch.setattr(gradients.Grads, "allocate", staticmethod(poisoned))
    got = run_loss(cast(batch, dtype), cfg, gf.grpo_loss, backend="torch", chunk_size=7)
    assert torch.equal(got[0], want[0])
    assert got[2].keys() == want[2].keys() and "weight" in got[2]
    assert all(torch.equal(got[2][k], want[2][k]) for k in want[2])


def test_cuda_tile_budget_follows_free_memory(monkeypatch):
    """CUDA tiles: 1/8 of the free memory, at least 2 GiB on a big GPU, at most 4 GiB and half the free
    memory; the env override still wins. With no fp32 temporaries (Triton, native) the tile is all of it."""
    from grpo_fast.engine import tile_size

    cuda = torch.device("cuda")
    gib = 2**30
    for (free, total), want in {
        (130 * gib, 141 * gib): 4 * gib,  # H200: capped
        (12 * gib, 80 * gib): 2 * gib,  # a big GPU, mostly full: still 2 GiB
        (3 * gib, 80 * gib): 1.5 * gib,  # ... but never more than half of what is free
        (8 * gib, 16 * gib): 1 * gib,  # a small GPU: 1/8 of the free memory
    }.items():
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, f=free, t=total: (f, t))
        assert tile_size.chunk_budget_bytes(cuda) == int(want)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (130 * gib, 141 * gib))
    assert 4 * gib // (151936 * 2) == 14134  # the budget's rows: N=8192 is 1 chunk instead of 17
    assert tile_size.auto_chunk_size(8192, 151936, torch.bfloat16, cuda, fp32_temps=0) == 8192
    # more tokens than that: even tiles, each a multiple of 128, within the budget
    assert tile_size.auto_chunk_size(10**6, 151936, torch.bfloat16, cuda, fp32_temps=0) == 13952
    monkeypatch.setenv("GRPO_FAST_CHUNK_BUDGET_MB", "64")
    assert tile_size.chunk_budget_bytes(cuda) == 64 * 2**20


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("spread", [4.0, 8.0])
def test_far_from_reference_kl_accuracy(backend, spread):
    # ref - logp ~ +-spread: exp(ref - logp) of the bias-corrected KL reaches e^(3 spread), where an
    # imprecise kernel loses gradient accuracy against TRL's own.
    batch = make_batch(seed=5, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    noise = spread * torch.randn(batch["ref_logp"].shape, generator=g, dtype=torch.float64)
    batch["ref_logp"] = (batch["ref_logp"].double() + noise).clamp(max=0.0).float()
    cfg = gf.GRPOConfig(loss_type="dapo", beta=0.04, use_bias_correction_kl=True)
    check_against_truth(batch, cfg, torch.float32, backend, chunk_size=16)


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("level", ["token", "sequence"])  # one pass over the head, and two
def test_soft_capped_logits_match_truth(backend, dtype, level):
    # Gemma 2's final_logit_softcapping: cap * tanh(logits / cap) before the temperature; a small cap
    # so that tanh bends (the logits here reach ~ +-6).
    cfg = gf.GRPOConfig(
        loss_type="dapo", importance_sampling_level=level, beta=0.04, temperature=0.8, logit_softcap=3.0
    )
    batch = make_batch(seed=31, dtype=torch.float64)
    check_against_truth(batch, cfg, dtype, backend, chunk_size=16)
