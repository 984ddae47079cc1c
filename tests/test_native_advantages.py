"""grpo_fast::group_advantages (the compiled op) against TRL 1.16's GRPOTrainer lines, on the CPU."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from grpo_fast.backends import _native
from grpo_fast.config import SCALE_MODES

try:  # TRL's own helper; trl.trainer.utils needs `datasets`, which the bare GPU image lacks
    from trl.trainer.utils import nanstd
except ImportError:  # then grpo_fast.reference's copy, held to TRL's by tests/test_reference_vs_trl.py
    from grpo_fast.reference import nanstd

pytestmark = pytest.mark.skipif(
    not _native.available(), reason=f"grpo_fast._C not built: {_native.load_error()}"
)

SCALES = SCALE_MODES  # the numbers grpo_fast::group_advantages takes


def trl_advantages(rewards_per_func, weights, group_size, scale, eps=1e-4):
    """TRL 1.16 GRPOTrainer._generate_and_score_completions, "sum_then_normalize", written out."""
    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable_mask] = torch.nan
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, group_size), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(group_size, dim=0)
    if scale in ("group", "none"):
        if group_size > 1:
            std_rewards = nanstd(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size, dim=0)
        else:
            std_rewards = torch.zeros_like(rewards)
    else:
        std_rewards = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale != "none":
        advantages = advantages / (std_rewards + eps)
    return torch.nan_to_num(advantages, nan=0.0)


def native(rewards, weights, group_size, scale, eps=1e-4):
    return torch.ops.grpo_fast.group_advantages(rewards, weights, group_size, SCALES[scale], eps)


def make_rewards(num_groups, group_size, num_funcs, seed, nan_frac=0.0, all_nan_rows=0):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(num_groups * group_size, num_funcs, generator=gen) * 2 + 0.5
    if nan_frac:
        rewards[torch.rand(rewards.shape, generator=gen) < nan_frac] = torch.nan
    for row in torch.randperm(rewards.shape[0], generator=gen)[:all_nan_rows]:
        rewards[row] = torch.nan
    return rewards


def check(rewards, weights, group_size, scale, eps=1e-4):
    expected = trl_advantages(rewards, weights, group_size, scale, eps)
    got = native(rewards, weights, group_size, scale, eps)
    assert got.dtype == torch.float32 and got.shape == (rewards.shape[0],)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    return got


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize(
    ("num_groups", "group_size", "weights"),
    [(5, 8, [1.0]), (3, 4, [1.0, 0.5, -2.0]), (7, 3, [0.25, 1.0, 3.0]), (2, 33, [1.0, 2.0])],
)
def test_matches_trl(scale, num_groups, group_size, weights):
    w = torch.tensor(weights)
    check(make_rewards(num_groups, group_size, len(weights), seed=group_size), w, group_size, scale)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("num_funcs", [1, 3])
def test_nan_entries_and_unscorable_rows(scale, num_funcs):
    rewards = make_rewards(6, 5, num_funcs, seed=7, nan_frac=0.3, all_nan_rows=4)
    weights = torch.tensor([1.0, -0.5, 2.0][:num_funcs])
    got = check(rewards, weights, 5, scale)
    assert (got[torch.isnan(rewards).all(dim=1)] == 0).all()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_with_one_or_no_scorable_row(scale):
    rewards = make_rewards(3, 4, 2, seed=3)
    rewards[0:3] = torch.nan  # group 0: a single scorable row -> nanstd is NaN -> advantage 0
    rewards[4:8] = torch.nan  # group 1: nothing scorable
    got = check(rewards, torch.tensor([1.0, 1.0]), 4, scale)
    assert (got[:8] == 0).all()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_constant_group_gets_zero(scale):
    rewards = make_rewards(4, 6, 2, seed=11)
    rewards[6:12] = torch.tensor([0.3, 1.7])  # group 1: every completion has the same rewards
    weights = torch.tensor([2.0, 0.5])
    got = native(rewards, weights, 6, scale)
    assert (got[6:12] == 0).all()
    # TRL's fp32 mean of six equal values can be 1 ulp off, and with a ~1e-7 std that leaves it advantages
    # of ~1e-3 for this group under "group" scaling; the double accumulation here gives the exact 0.
    expected = trl_advantages(rewards, weights, 6, scale)
    keep = torch.ones(24, dtype=torch.bool)
    keep[6:12] = False
    torch.testing.assert_close(got[keep], expected[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[6:12], expected[6:12], rtol=0, atol=2e-3)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_size_one(scale):
    rewards = make_rewards(9, 1, 3, seed=5, nan_frac=0.2, all_nan_rows=2)
    got = check(rewards, torch.tensor([1.0, 2.0, 3.0]), 1, scale)
    assert (got == 0).all()


def test_single_row_and_empty():
    check(torch.tensor([[2.5]]), torch.ones(1), 1, "batch")
    out = native(torch.empty(0, 2), torch.ones(2), 4, "group")
    assert out.shape == (0,) and out.dtype == torch.float32


def test_infinities_become_finite():
    rewards = torch.tensor([[1.0], [float("inf")], [2.0], [3.0], [-1.0], [float("-inf")]])
    for scale in SCALES:
        got = native(rewards, torch.ones(1), 3, scale)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, trl_advantages(rewards, torch.ones(1), 3, scale))


def test_large_batch_runs_in_parallel_chunks():
    rewards = make_rewards(1000, 16, 2, seed=13, nan_frac=0.05, all_nan_rows=20)
    for scale in SCALES:
        check(rewards, torch.tensor([1.0, 0.5]), 16, scale)


def test_wrapper_maps_scale_names():
    rewards = make_rewards(4, 4, 2, seed=2)
    weights = torch.tensor([1.0, 3.0])
    for scale in SCALES:
        got = _native.native_group_advantages(rewards, weights, 4, scale, 1e-4)
        torch.testing.assert_close(got, trl_advantages(rewards, weights, 4, scale))
    with pytest.raises(ValueError, match="scale"):
        _native.native_group_advantages(rewards, weights, 4, "global", 1e-4)


@pytest.mark.parametrize("scale", [0, 1, 2])
def test_opcheck(scale):
    rewards = make_rewards(3, 4, 2, seed=1, nan_frac=0.1)
    torch.library.opcheck(
        torch.ops.grpo_fast.group_advantages.default, (rewards, torch.ones(2), 4, scale, 1e-4)
    )


def test_torch_compile_fullgraph():
    rewards = make_rewards(4, 8, 2, seed=9)
    weights = torch.tensor([1.0, 0.5])

    def fn(r, w):
        return torch.ops.grpo_fast.group_advantages(r * 1.0, w, 8, 0, 1e-4)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(rewards, weights), fn(rewards, weights))


def test_errors():
    rewards = torch.randn(6, 2)
    weights = torch.ones(2)
    with pytest.raises(RuntimeError, match="group_size=4 must divide the number of rows M=6"):
        native(rewards, weights, 4, "group")
    with pytest.raises(RuntimeError, match="group_size must be positive"):
        native(rewards, weights, 0, "group")
    with pytest.raises(RuntimeError, match="rewards must be float32, got Double"):
        native(rewards.double(), weights, 3, "group")
    with pytest.raises(RuntimeError, match="reward_weights must be float32"):
        native(rewards, weights.half(), 3, "group")
    with pytest.raises(
        RuntimeError, match=r"reward_weights must be 1-D \[R\] with R = rewards.size\(1\) = 2"
    ):
        native(rewards, torch.ones(3), 3, "group")
    with pytest.raises(RuntimeError, match="rewards must be 2-D"):
        native(torch.randn(6), torch.ones(1), 3, "group")
    with pytest.raises(RuntimeError, match="rewards must be contiguous"):
        native(torch.randn(2, 6).t(), weights, 3, "group")
    with pytest.raises(RuntimeError, match="scale_mode must be 0"):
        torch.ops.grpo_fast.group_advantages(rewards, weights, 3, 5, 1e-4)


def test_load_reports_missing_extension(monkeypatch):
    monkeypatch.setattr(_native, "_module", None)
    monkeypatch.setattr(_native, "_error", ImportError("no module named grpo_fast._C"))
    monkeypatch.setattr(_native, "_tried", True)
    assert not _native.available() and not _native.cuda_built()
    with pytest.raises(RuntimeError, match="grpo_fast._C is not available.*no module named grpo_fast._C"):
        _native.load()


def test_cuda_built_when_possible():
    """A torch with CUDA plus an nvcc at build time must give a build with the CUDA kernels."""
    import grpo_fast._C

    has_nvcc = shutil.which("nvcc") or any(os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH"))
    if not (torch.version.cuda and has_nvcc) or os.environ.get("GRPO_FAST_NO_CUDA", "0") not in ("", "0"):
        pytest.skip("no CUDA toolkit: a CPU-only build is expected")
    assert grpo_fast._C.cuda_built()
    assert _native.cuda_built()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize(
    ("num_groups", "group_size", "num_funcs"), [(5, 8, 1), (300, 16, 3), (3, 100, 2), (9, 1, 2)]
)
def test_cuda_matches_cpu(scale, num_groups, group_size, num_funcs):
    if not _native.cuda_built():
        pytest.skip("grpo_fast._C built without CUDA kernels")
    rewards = make_rewards(num_groups, group_size, num_funcs, seed=group_size, nan_frac=0.1, all_nan_rows=3)
    weights = torch.tensor([1.0, -0.5, 2.0][:num_funcs])
    expected = trl_advantages(rewards, weights, group_size, scale)
    got = native(rewards.cuda(), weights.cuda(), group_size, scale)
    assert got.is_cuda
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.cpu(), native(rewards, weights, group_size, scale), rtol=1e-6, atol=1e-6)
