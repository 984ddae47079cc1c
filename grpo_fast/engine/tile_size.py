"""How many token rows go into one ``[C, V]`` logits tile."""

from __future__ import annotations

import os

import torch

# Bytes the tile and its fp32 temporaries may take; GRPO_FAST_CHUNK_BUDGET_MB overrides. CUDA: a share of
# the free memory (the rest is for activations, the fp32 dW and the allocator), at least 2 GiB on a big GPU
# (fewer, larger tiles: fewer passes over the dW accumulator), at most 4 GiB and half of what is free.
DEFAULT_BUDGET_MB = {"cpu": 96}
CUDA_FREE_SHARE = 1 / 8
CUDA_BIG_GPU, CUDA_BIG_MIN, CUDA_MAX = 40 * 2**30, 2 * 2**30, 4 * 2**30
# Rows of a tile are a multiple of this (GEMM tiles of 128 rows leave no partly filled block).
ROW_ALIGN = 128


def cuda_budget_bytes(device: torch.device) -> int:
    free, total = torch.cuda.mem_get_info(device)
    budget = int(free * CUDA_FREE_SHARE)
    if total >= CUDA_BIG_GPU:
        budget = max(budget, CUDA_BIG_MIN)
    return max(1, min(budget, CUDA_MAX, free // 2))


def chunk_budget_bytes(device: torch.device) -> int:
    env = os.environ.get("GRPO_FAST_CHUNK_BUDGET_MB")
    if env:
        try:
            mb = float(env)
        except ValueError as err:
            raise ValueError(f"GRPO_FAST_CHUNK_BUDGET_MB must be a number of MiB, got {env!r}") from err
        if mb <= 0:
            raise ValueError(f"GRPO_FAST_CHUNK_BUDGET_MB must be positive, got {env!r}")
    elif device.type == "cuda":
        return cuda_budget_bytes(device)
    else:
        mb = DEFAULT_BUDGET_MB.get(device.type, DEFAULT_BUDGET_MB["cpu"])
    return int(mb * 2**20)


def auto_chunk_size(
    num_tokens: int, vocab: int, dtype: torch.dtype, device: torch.device, fp32_temps: int
) -> int:
    """Rows per tile under the memory budget, the tokens split evenly (:func:`balanced_rows`).

    A row costs the tile's own row plus ``fp32_temps`` fp32 temporaries per logit of the backend's chunk
    pass (``ChunkOps.fp32_temps``): a backend that needs fewer gets more rows under the same budget.
    """
    per_row = vocab * (fp32_temps * 4 + torch.empty((), dtype=dtype).element_size())
    return balanced_rows(num_tokens, max(1, chunk_budget_bytes(device) // per_row))


def balanced_rows(num_tokens: int, max_rows: int) -> int:
    """Rows per tile: the fewest tiles of at most ``max_rows`` rows, the tokens shared evenly among them,
    each a multiple of :data:`ROW_ALIGN` (of 16 when the budget allows fewer rows than that).

    Even tiles, not full tiles and a remainder: 16384 tokens under a 14128-row budget are two GEMMs of
    8192 rows, not 14128 + 2256 (a thin last GEMM runs far below the GPU's rate, and every tile costs one
    pass over the dW accumulator either way)."""
    if num_tokens <= max_rows:
        return max(1, num_tokens)
    align = ROW_ALIGN if max_rows >= ROW_ALIGN else (16 if max_rows >= 16 else 1)
    tiles = -(-num_tokens // max_rows)
    while True:
        rows = -(-num_tokens // tiles)
        rows = -(-rows // align) * align
        if rows <= max_rows:
            return rows
        tiles += 1


def resolve_chunk_size(
    chunk_size: int | None, num_tokens: int, vocab: int, dtype, device, fp32_temps: int
) -> int:
    if chunk_size is None:
        return auto_chunk_size(num_tokens, vocab, dtype, device, fp32_temps)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size
