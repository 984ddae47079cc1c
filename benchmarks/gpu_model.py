"""The GPU run's preamble measurements and the roofline model every table row is compared with.

- :func:`preamble`: library versions, the same-run cuBLAS GEMM rate (TFLOP/s, the table's dtype) and the
  device copy bandwidth (GB/s, read + write);
- :func:`predicted_ms`: what a row should take if the GEMMs ran at the preamble's rate and every other
  byte moved at its copy bandwidth: ``flops / gemm rate + tile bytes / copy rate`` (plus, where the weight
  gradient cannot accumulate in fp32 inside the GEMM, a half ``[V, H]`` temporary per chunk added into the
  fp32 accumulator). A row far above its prediction says where to look.
"""

from __future__ import annotations

import importlib.metadata
import math

import torch

from grpo_fast import backends
from grpo_fast.benchmarking import harness as bench
from grpo_fast.engine import chunk_loop
from grpo_fast.engine.tile_size import auto_chunk_size

# FLOPs per N*H*V of each implementation's step: forward + backward of the loss, or a no-grad forward.
LOGPROB_IMPLS = ("grpo_fast-triton-logprobs", "grpo_fast-triton-logprobs-fused")


def flops(impl: str, n: int, h: int, v: int) -> float:
    return (2.0 if impl in LOGPROB_IMPLS else 6.0) * n * h * v


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gemm_ms(n: int, h: int, v: int, dtype: torch.dtype, device: str, iters: int) -> float:
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, h, generator=gen).to(device, dtype)  # random: never time zeros
    b = (torch.randn(v, h, generator=gen) * h**-0.5).to(device, dtype)
    return bench._median_ms([lambda: torch.mm(a, b.t())], device, iters, warmup=2)


def _copy_ms(mib: int, device: str, iters: int) -> float:
    src = torch.randn(mib * 2**20 // 4, generator=torch.Generator().manual_seed(1)).to(device)
    dst = torch.empty_like(src)
    return bench._median_ms([lambda: dst.copy_(src)], device, iters, warmup=2)


def preamble(device: str, dtype: str, shape: tuple[int, int, int], copy_mb: int, iters: int) -> dict:
    """Versions, the GEMM rate at ``shape`` (N, H, V) in ``dtype`` and the copy bandwidth, measured now."""
    n, h, v = shape
    gemm = _gemm_ms(n, h, v, bench.DTYPES[dtype], device, iters)
    copy = _copy_ms(copy_mb, device, iters)
    moved = 2 * copy_mb * 2**20  # read + write
    dev = torch.device(device)
    return {
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": _version("triton"),
            "transformers": _version("transformers"),
            "trl": _version("trl"),
            "liger_kernel": _version("liger-kernel"),
            "grpo_fast": _version("grpo-fast"),
        },
        "gemm": {"N": n, "H": h, "V": v, "dtype": dtype, "ms": gemm, "tflops": 2.0 * n * h * v / gemm / 1e9},
        "copy": {"MiB": copy_mb, "ms": copy, "gbs": moved / copy / 1e6},
        "fp32_out_gemm": bool(chunk_loop.FP32_OUT_GEMM["cuda"]) if dev.type == "cuda" else None,
    }


def chunk_rows(impl: str, n: int, v: int, dtype: str, device: str) -> int | None:
    """Rows per logits tile of a grpo_fast row (None for the others: they tile their own way)."""
    name = {
        "grpo_fast-native": "native",
        "grpo_fast-triton": "triton",
        "grpo_fast-triton-invariant": "triton",
        "grpo_fast-torch": "torch",
    }.get(impl)
    if name is None and impl in LOGPROB_IMPLS[:1]:
        name = "triton"
    if name is None:
        return None
    temps = backends.chunk_ops(name).fp32_temps
    return auto_chunk_size(n, v, bench.DTYPES[dtype], torch.device(device), temps)


def predicted_ms(impl: str, n: int, h: int, v: int, dtype: str, rows: int | None, pre: dict) -> float:
    """The roofline model's milliseconds for one step of ``impl`` (module docstring).

    grpo_fast's loss: 6NHV at the GEMM rate, and per token row of every tile a statistics read and a
    dlogits read + write (3 tile passes), the half dW temporary per chunk unless fp32-output GEMMs
    accumulate it, one fp32 -> half cast of dW. Its no-grad log-probs: 2NHV, and one tile read (tile
    path) or none (fused kernel). Other implementations: the GEMM time alone (a bound, not a model).
    """
    rate = pre["gemm"]["tflops"] * 1e9  # FLOP per ms
    bw = pre["copy"]["gbs"] * 1e6  # bytes per ms
    elt = torch.empty((), dtype=bench.DTYPES[dtype]).element_size()
    ms = flops(impl, n, h, v) / rate
    if rows is None:
        return ms
    tile = n * v * elt
    if impl in LOGPROB_IMPLS:
        return ms + (0 if impl.endswith("fused") else tile) / bw
    chunks = math.ceil(n / rows)
    moved = 3 * tile + (6 * v * h if elt < 4 else 0)
    if elt < 4 and not pre.get("fp32_out_gemm"):
        moved += chunks * 12 * v * h  # half temporary written + read, fp32 accumulator read + written
    return ms + moved / bw
