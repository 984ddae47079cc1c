"""Backend choice: "auto" picks the fastest one available; an explicit name never falls back."""

from __future__ import annotations

import importlib.util
import logging
import os
from functools import cache

import torch

from .chunk_ops import ChunkOps, TorchChunkOps

logger = logging.getLogger("grpo_fast")

BACKENDS = ("auto", "triton", "native", "torch")
OPS = ("selective_logprobs", "group_advantages", "grpo_loss")
# Preference order of "auto" per device type, fastest first.
AUTO_ORDER = {"cuda": ("triton", "native", "torch"), "cpu": ("native", "torch")}
# Which ops each compiled backend implements today, per device type ("torch" runs everything).
IMPLEMENTED: dict[str, dict[str, tuple[str, ...]]] = {
    "native": {"cpu": OPS, "cuda": OPS},
    "triton": {"cuda": OPS},
}
# Ops for which "auto" prefers the compiled backend on the CPU (measured faster than "torch"; 2 shared
# cores, fp32, N=4096 H=1024 V=65536: grpo_loss fwd+bwd 12.0 s vs 15.7 s, no-grad selective_logprobs
# 6.4 s vs 9.8 s, benchmarks/bench_chunk_cpu.py's per-chunk token pass 6.8 ms vs 32.7 ms).
AUTO_CPU_NATIVE: tuple[str, ...] = ("group_advantages", "grpo_loss", "selective_logprobs")
# Ops for which "auto" may pick the compiled backend on CUDA (after Triton): those whose CUDA kernels have
# been run against the truth on a GPU (tests/test_native_*.py, marked gpu). An explicit "native" runs all.
AUTO_CUDA_NATIVE: tuple[str, ...] = ("group_advantages",)


@cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _why_unavailable(name: str, device: torch.device, op: str) -> str | None:
    """None when backend `name` can run `op` on `device`, else the reason."""
    if name == "torch":
        return None
    if name == "triton":
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and triton_importable():
            return None  # Triton's interpreter runs the kernels on CPU tensors (tests); "auto" never picks it
        if device.type != "cuda":
            return f"the Triton kernels run on CUDA tensors only, and the inputs are on {device.type}"
        if not triton_importable():
            return "triton is not installed"
    if name == "native":
        try:
            from . import _native
        except ImportError as err:  # a broken install: report it, never crash the dispatch
            return f"grpo_fast._native failed to import ({err})"
        if not _native.available():
            return f"the compiled extension grpo_fast._C could not be loaded ({_native.load_error()})"
        if device.type == "cuda" and not _native.cuda_built():
            return "grpo_fast._C was built without CUDA kernels (no nvcc or a CPU-only torch at build time)"
    if op not in IMPLEMENTED.get(name, {}).get(device.type, ()):
        return f"backend {name!r} does not implement {op} on {device.type} tensors"
    return None


def resolve(backend: str, device: torch.device, op: str) -> str:
    """The backend that will run `op` on `device`; raises for an explicit backend that cannot."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        reason = _why_unavailable(backend, device, op)
        if reason is not None:
            raise ValueError(f"backend={backend!r} cannot run {op}: {reason}")
        return backend
    for name in AUTO_ORDER.get(device.type, ("torch",)):
        if name == "native" and op not in {"cpu": AUTO_CPU_NATIVE, "cuda": AUTO_CUDA_NATIVE}.get(
            device.type, ()
        ):
            continue
        if _why_unavailable(name, device, op) is None:
            logger.debug("grpo_fast: backend='auto' picked %r for %s on %s", name, op, device.type)
            return name
    return "torch"


def chunk_ops(name: str) -> ChunkOps:
    """The per-chunk pass of a backend (the chunk loop around it is shared)."""
    if name == "torch":
        return TorchChunkOps()
    if name == "triton":
        from .triton_ops import TritonChunkOps  # imports triton: only when this backend runs

        return TritonChunkOps()
    if name == "native":
        from .native_ops import NativeChunkOps  # loads grpo_fast._C: only when this backend runs

        return NativeChunkOps()
    raise ValueError(f"backend {name!r} has no chunk pass")
