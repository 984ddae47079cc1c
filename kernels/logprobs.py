"""No-grad selective log-probs and entropy straight from ``hidden`` and ``W``: the logits never exist.

``logits = hidden @ W^T + b`` is computed tile by tile with ``tl.dot`` (fp32 accumulation) and folded at
once into an online logsumexp / entropy per row; the target logit is picked when its tile passes. The
grid is (row blocks) x (vocabulary splits): each program walks one split of the vocabulary for
``BLOCK_N`` rows and leaves fp32 partials (m, s, u, target logit), which a small second kernel merges.
Splitting the vocabulary fills the GPU when there are few row blocks; programs of one split walk the
same ``W`` tiles at about the same time, so ``W`` is re-read from L2 rather than HBM.
"""

from __future__ import annotations

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
    inv_t,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
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
    splits: int | None = None  # vocabulary splits; None: enough programs to fill the GPU


def default_config(dtype: torch.dtype) -> LogprobsConfig:
    if interpreting():  # numpy runs each tile: few, small programs keep the tests fast
        return LogprobsConfig(block_n=16, block_v=64, block_k=32, num_warps=4, num_stages=1, splits=2)
    if dtype == torch.float32:  # fp32 dot in IEEE mode keeps more registers busy
        return LogprobsConfig(block_n=64, block_v=64, block_k=32, num_warps=4, num_stages=2)
    return LogprobsConfig()


def _num_splits(cfg: LogprobsConfig, row_blocks: int, vocab: int, device: torch.device) -> int:
    max_splits = triton.cdiv(vocab, cfg.block_v)
    if cfg.splits is not None:
        return max(1, min(cfg.splits, max_splits))
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    # Two programs per SM hides the tail; more splits only add partials to merge.
    return max(1, min(triton.cdiv(2 * sms, row_blocks), max_splits))


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
    splits = _num_splits(cfg, row_blocks, vocab, hidden.device)
    # Whole blocks per split, so no split is empty (an empty split would merge 0 * -inf).
    cols_per_split = triton.cdiv(triton.cdiv(vocab, splits), cfg.block_v) * cfg.block_v
    splits = triton.cdiv(vocab, cols_per_split)
    part = torch.empty(4, splits, n, dtype=torch.float32, device=hidden.device)
    _logprobs_partial_kernel[(row_blocks, splits)](
        hidden,
        hidden.stride(0),
        weight,
        weight.stride(0),
        bias if bias is not None else weight,  # never read without HAS_BIAS
        targets,
        part,
        n,
        vocab,
        h,
        cols_per_split,
        1.0 / temperature,
        HAS_BIAS=bias is not None,
        IEEE=hidden.dtype == torch.float32,
        BLOCK_N=cfg.block_n,
        BLOCK_V=cfg.block_v,
        BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    block = 256 if not interpreting() else 64
    _logprobs_combine_kernel[(triton.cdiv(n, block),)](part, out, n, splits, BLOCK=block, num_warps=4)
    return out[0], out[1]
