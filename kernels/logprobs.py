"""No-grad selective log-probs and entropy straight from ``hidden`` and ``W``: the logits never exist.

``logits = hidden @ W^T + b`` is computed tile by tile with ``tl.dot`` (fp32 accumulation) and folded at
once into an online logsumexp / entropy per row; the target logit is picked when its tile passes. The work
is (row blocks) x (vocabulary splits) items: each walks one split of the vocabulary for ``BLOCK_N`` rows
and leaves fp32 partials (m, s, u, target logit), which a small second kernel merges.

A persistent grid: as many programs as the GPU holds at once (SMs x the CTAs per SM that the compiled
kernel's registers and shared memory allow), each taking every ``programs``-th item. Items go in grouped
order, as in Triton's matmul tutorial: ``group`` row blocks x every split, row blocks fastest. The programs
resident together then work on few row blocks and many splits: each hidden block they re-read for every
vocabulary tile is shared by about ``splits`` programs, and each ``W`` tile by about ``group``, so the
working set (``(group + splits) x 128 x H`` elements) stays in L2 instead of every resident program
streaming its own hidden block (row blocks fastest: 132 x 1 MiB at H = 4096, more than an H100's 50 MB).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import check_device, check_rows, interpreting, online_update

_GEMM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _logprobs_partial_kernel(
    h_ptr,
    stride_h,
    w_ptr,
    stride_w,
    b_ptr,
    targets_ptr,
    part_ptr,
    n_rows,
    n_vocab,
    n_hidden,
    cols_per_split,
    n_row_blocks,
    n_splits,
    group_rows,
    inv_t,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Persistent: this program takes items pid, pid + programs, ... of the grouped order (module docstring).
    n_items = n_row_blocks * n_splits
    per_group = group_rows * n_splits
    for item in tl.range(tl.program_id(0), n_items, tl.num_programs(0)):
        group = item // per_group
        first = group * group_rows
        rows_in_group = tl.minimum(n_row_blocks - first, group_rows)
        within = item - group * per_group
        _partial_item(
            h_ptr, stride_h, w_ptr, stride_w, b_ptr, targets_ptr, part_ptr, n_rows, n_vocab, n_hidden,
            cols_per_split, n_splits, inv_t, first + within % rows_in_group, within // rows_in_group,
            HAS_BIAS, IEEE, BLOCK_N, BLOCK_V, BLOCK_K,
        )  # fmt: skip


@triton.jit
def _partial_item(
    h_ptr,
    stride_h,
    w_ptr,
    stride_w,
    b_ptr,
    targets_ptr,
    part_ptr,
    n_rows,
    n_vocab,
    n_hidden,
    cols_per_split,
    n_splits,
    inv_t,
    pid_n,
    split,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One item: row block ``pid_n`` over vocabulary split ``split``, its partials stored."""
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    # 64-bit offsets: rows * stride and cols * stride pass 2**31 for large N*H or V*H.
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
    target = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    m = tl.full((BLOCK_N,), -float("inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    u = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    v_begin = split * cols_per_split
    v_end = tl.minimum(v_begin + cols_per_split, n_vocab)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_w
        acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
        for k0 in range(0, n_hidden, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < n_hidden
            a = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_cols + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if IEEE:  # fp32 inputs: full-precision products, as the fp32 reference (no TF32)
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        z = tl.where(col_ok[None, :], acc * inv_t, -float("inf"))
        m, s, u = online_update(m, s, u, z, col_ok[None, :], 1)
        t += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)
    # part: fp32 [4, n_splits, n_rows]
    n_rows64 = tl.cast(n_rows, tl.int64)
    base = split.to(tl.int64) * n_rows64 + rows
    plane = tl.cast(n_splits, tl.int64) * n_rows64
    tl.store(part_ptr + base, m, mask=row_ok)
    tl.store(part_ptr + plane + base, s, mask=row_ok)
    tl.store(part_ptr + 2 * plane + base, u, mask=row_ok)
    tl.store(part_ptr + 3 * plane + base, t, mask=row_ok)


@triton.jit
def _logprobs_combine_kernel(part_ptr, out_ptr, n_rows, n_splits, BLOCK: tl.constexpr):
    """Merge the splits' partials of BLOCK rows into logp and entropy (out: fp32 [2, n_rows])."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < n_rows
    # tl.cast, not .to(): an argument equal to 1 arrives as a compile-time constant.
    n_rows64 = tl.cast(n_rows, tl.int64)
    plane = tl.cast(n_splits, tl.int64) * n_rows64
    big_m = tl.full((BLOCK,), -float("inf"), tl.float32)
    for k in range(0, n_splits):
        big_m = tl.maximum(big_m, tl.load(part_ptr + k * n_rows64 + rows, mask=ok, other=0.0))
    big_s = tl.zeros((BLOCK,), tl.float32)
    big_u = tl.zeros((BLOCK,), tl.float32)
    t = tl.zeros((BLOCK,), tl.float32)
    for k in range(0, n_splits):
        base = k * n_rows64 + rows
        m = tl.load(part_ptr + base, mask=ok, other=0.0)
        s = tl.load(part_ptr + plane + base, mask=ok, other=0.0)
        u = tl.load(part_ptr + 2 * plane + base, mask=ok, other=0.0)
        r = tl.exp(m - big_m)
        big_s += r * s
        big_u += r * (u + s * (m - big_m))
        t += tl.load(part_ptr + 3 * plane + base, mask=ok, other=0.0)
    log_s = tl.log(big_s)
    tl.store(out_ptr + rows, t - big_m - log_s, mask=ok)
    tl.store(out_ptr + n_rows + rows, log_s - big_u / big_s, mask=ok)


@dataclass(frozen=True)
class LogprobsConfig:
    """Launch configuration of the fused kernel (tuned on the GPU; the interpreter wants small tiles)."""

    block_n: int = 128
    block_v: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    splits: int | None = None  # vocabulary splits; None: the resident programs over `group` row blocks
    group: int | None = None  # row blocks per group of the order; None: about sqrt(resident programs)
    programs: int | None = None  # the persistent grid; None: SMs x CTAs per SM of the compiled kernel


def default_config(dtype: torch.dtype) -> LogprobsConfig:
    if interpreting():  # numpy runs each tile: few, small programs keep the tests fast
        return LogprobsConfig(
            block_n=16, block_v=64, block_k=32, num_warps=4, num_stages=1, splits=2, group=2, programs=3
        )
    if dtype == torch.float32:  # fp32 dot in IEEE mode keeps more registers busy
        return LogprobsConfig(block_n=64, block_v=64, block_k=32, num_warps=4, num_stages=2)
    return LogprobsConfig()


@dataclass(frozen=True)
class Launch:
    programs: int  # the persistent grid
    group: int  # row blocks per group
    splits: int  # vocabulary splits
    cols_per_split: int


def plan_launch(cfg: LogprobsConfig, n: int, vocab: int, resident: int) -> Launch:
    """Grid, group and splits for ``n`` rows when ``resident`` programs fit on the GPU at once.

    The resident programs should cover few row blocks and many splits (module docstring): ``group`` about
    sqrt(resident), ``splits`` the rest; fewer row blocks than that: more splits, to fill the GPU. No
    split is empty (an empty one would merge 0 * -inf): whole vocabulary blocks per split."""
    row_blocks = triton.cdiv(n, cfg.block_n)
    group = cfg.group or max(1, math.isqrt(resident))
    group = max(1, min(group, row_blocks))
    splits = cfg.splits or triton.cdiv(resident, group)
    splits = max(1, min(splits, triton.cdiv(vocab, cfg.block_v)))
    cols_per_split = triton.cdiv(triton.cdiv(vocab, splits), cfg.block_v) * cfg.block_v
    splits = triton.cdiv(vocab, cols_per_split)
    programs = max(1, min(cfg.programs or resident, row_blocks * splits))
    return Launch(programs, group, splits, cols_per_split)


def occupancy(kernel: object, num_warps: int, device: torch.device) -> int:
    """CTAs of a compiled kernel that fit on one SM at once, from its registers and shared memory (what
    the hardware allows, not an assumption)."""
    props = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)
    kernel._init_handles()
    threads = num_warps * props["warpSize"]
    by_regs = props["max_num_regs"] // max(1, kernel.n_regs * threads)
    by_smem = props["max_shared_mem"] // max(1, kernel.metadata.shared)
    max_threads = torch.cuda.get_device_properties(device).max_threads_per_multi_processor
    return max(1, min(by_regs, by_smem, max_threads // threads))


_OCCUPANCY: dict[tuple, int] = {}  # (device, dtype, config, bias) -> CTAs per SM


def fused_logprobs(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    temperature: float,
    config: LogprobsConfig | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token (logp, entropy) fp32 ``[N]`` of ``log_softmax((hidden @ W^T + b) / T)`` without logits.

    hidden ``[N, H]`` and weight ``[V, H]`` of one dtype (fp16/bf16/fp32) with contiguous rows, bias
    ``[V]`` or None, targets ``[N]`` ids in ``[0, V)``. No autograd: for old/ref log-probs and metrics.
    """
    op = "fused_logprobs"
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        shapes = f"{tuple(hidden.shape)} and {tuple(weight.shape)}"
        raise ValueError(f"{op}: hidden must be [N, H] and weight [V, H], got {shapes}")
    if hidden.dtype not in _GEMM_DTYPES or weight.dtype != hidden.dtype:
        dtypes = f"{hidden.dtype} and {weight.dtype}"
        raise TypeError(f"{op}: hidden and weight must share a float16/bfloat16/float32 dtype, got {dtypes}")
    for name, x in (("hidden", hidden), ("weight", weight)):
        if x.shape[1] > 1 and x.stride(1) != 1:
            raise ValueError(f"{op}: {name} rows must be contiguous (stride(1) == 1)")
    n, h = hidden.shape
    vocab = weight.shape[0]
    if bias is not None:
        check_rows(op, "bias", bias, vocab, (hidden.dtype,))
    check_rows(op, "targets", targets, n, (torch.int64, torch.int32))
    check_device(op, hidden, weight, bias, targets)
    if vocab == 0 or h == 0:
        raise ValueError(f"{op}: empty vocabulary or hidden size ({vocab}, {h})")
    out = torch.empty(2, n, dtype=torch.float32, device=hidden.device)
    if n == 0:
        return out[0], out[1]
    cfg = config or default_config(hidden.dtype)
    row_blocks = triton.cdiv(n, cfg.block_n)
    constants = dict(
        HAS_BIAS=bias is not None,
        IEEE=hidden.dtype == torch.float32,
        BLOCK_N=cfg.block_n,
        BLOCK_V=cfg.block_v,
        BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )

    def args(launch: Launch, part: Tensor) -> tuple:
        b = bias if bias is not None else weight  # never read without HAS_BIAS
        split = (launch.cols_per_split, row_blocks, launch.splits, launch.group)
        return (hidden, hidden.stride(0), weight, weight.stride(0), b, targets, part, n, vocab, h, *split,
                1.0 / temperature)  # fmt: skip

    resident = cfg.programs or 1
    if cfg.programs is None and hidden.device.type == "cuda":
        sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count
        key = (hidden.device, hidden.dtype, cfg, bias is not None)
        if key not in _OCCUPANCY:  # compile (as the launch will) to read its registers and shared memory
            guess = plan_launch(cfg, n, vocab, sms)
            kernel = _logprobs_partial_kernel.warmup(*args(guess, out), grid=(1,), **constants)
            _OCCUPANCY[key] = occupancy(kernel, cfg.num_warps, hidden.device)
        resident = sms * _OCCUPANCY[key]
    launch = plan_launch(cfg, n, vocab, resident)
    part = torch.empty(4, launch.splits, n, dtype=torch.float32, device=hidden.device)
    _logprobs_partial_kernel[(launch.programs,)](*args(launch, part), **constants)
    block = 256 if not interpreting() else 64
    _logprobs_combine_kernel[(triton.cdiv(n, block),)](part, out, n, launch.splits, BLOCK=block, num_warps=4)
    return out[0], out[1]
