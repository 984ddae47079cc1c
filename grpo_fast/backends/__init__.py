"""The backends and their registry: what each runs, where, why not elsewhere, and what "auto" picks.

A backend is the row-wise tile work of :class:`grpo_fast.backends.base.ChunkOps` (plus, for the compiled
ones, a group-advantages kernel); the chunk loop and the per-token math around it are shared
(:mod:`grpo_fast.engine`). ``"auto"`` picks the first backend of :data:`AUTO_ORDER` that the registry lets
it pick for the op on that device; an explicit name never falls back: it runs or raises saying why not.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from .base import ChunkOps
from .torch_ops import TorchChunkOps, torch_group_advantages

logger = logging.getLogger("grpo_fast")

OPS = ("selective_logprobs", "group_advantages", "grpo_loss")


@dataclass(frozen=True)
class Backend:
    """One backend: the devices it has kernels for, and the ops "auto" may give it on each device."""

    name: str
    summary: str
    devices: tuple[str, ...]  # device types with kernels ("*": any device torch runs on)
    auto_ops: dict[str, tuple[str, ...]]  # device type -> ops "auto" picks it for
    auto_why: str  # why "auto" picks it (or not) where it does: the measurement behind auto_ops


REGISTRY: dict[str, Backend] = {
    "triton": Backend(
        name="triton",
        summary="Triton kernels for the tile statistics, dlogits, group advantages and the fused no-grad "
        "log-prob GEMM (selective_logprobs(fused_gemm=True)); cuBLAS GEMMs",
        devices=("cuda",),
        auto_ops={"cuda": OPS},
        auto_why="first on CUDA: no [C, V] temporaries, one read and one write of each tile",
    ),
    "native": Backend(
        name="native",
        summary="grpo_fast._C: C++ (CPU, vectorized, OpenMP) and CUDA kernels for the same tile work and "
        "group advantages",
        devices=("cpu", "cuda"),
        auto_ops={"cpu": OPS, "cuda": ("group_advantages",)},
        auto_why="CPU: measured faster than torch (2 cores, fp32, N=4096 H=1024 V=65536: grpo_loss fwd+bwd "
        "12.0 s vs 15.7 s, no-grad selective_logprobs 6.4 s vs 9.8 s); CUDA: only ops whose kernels have "
        "run against the truth on a GPU (tests/test_native_*.py, marked gpu)",
    ),
    "torch": Backend(
        name="torch",
        summary="plain torch ops on each tile: every device, every dtype (fp64 included), the fallback",
        devices=("*",),
        auto_ops={"*": OPS},
        auto_why="the fallback wherever no compiled backend may run",
    ),
}
BACKENDS = ("auto", *REGISTRY)
# Preference order of "auto", fastest first.
AUTO_ORDER = ("triton", "native", "torch")


@cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def why_not(name: str, device: torch.device, op: str) -> str | None:
    """None when backend ``name`` can run ``op`` on ``device`` here, else the reason, in words."""
    if name not in REGISTRY:
        return f"there is no backend {name!r} (known: {', '.join(REGISTRY)})"
    if op not in OPS:
        return f"there is no op {op!r} (known: {', '.join(OPS)})"
    info = REGISTRY[name]
    interpreted = (
        name == "triton"
        and device.type == "cpu"
        and os.environ.get("TRITON_INTERPRET") == "1"
        and triton_importable()
    )
    if "*" not in info.devices and device.type not in info.devices and not interpreted:
        # Triton's interpreter runs its kernels on CPU tensors (tests); "auto" never picks it there.
        where = "/".join(info.devices)
        return f"backend {name!r} has kernels for {where} tensors only, and the inputs are on {device.type}"
    if name == "triton" and not triton_importable():
        return "triton is not installed"
    if name == "native":
        try:
            from . import _native
        except ImportError as err:  # a broken install: report it, never crash the dispatch
            return f"grpo_fast.backends._native failed to import ({err})"
        if not _native.available():
            return f"the compiled extension grpo_fast._C could not be loaded ({_native.load_error()})"
        if device.type == "cuda" and not _native.cuda_built():
            return "grpo_fast._C was built without CUDA kernels (no nvcc or a CPU-only torch at build time)"
    return None


def auto_picks(name: str, device: torch.device, op: str) -> bool:
    info = REGISTRY[name]
    return op in info.auto_ops.get(device.type, info.auto_ops.get("*", ()))


def resolve(backend: str, device: torch.device, op: str) -> str:
    """The backend that will run `op` on `device`; raises for an explicit backend that cannot."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        reason = why_not(backend, device, op)
        if reason is not None:
            raise ValueError(f"backend={backend!r} cannot run {op}: {reason}")
        return backend
    for name in AUTO_ORDER:
        if auto_picks(name, device, op) and why_not(name, device, op) is None:
            logger.debug("grpo_fast: backend='auto' picked %r for %s on %s", name, op, device.type)
            return name
    return "torch"


def support_table(device_types: tuple[str, ...] = ("cpu", "cuda")) -> list[dict[str, str]]:
    """One row per (backend, device type, op): "auto picks it" (what backend="auto" runs there), "auto
    fallback" (eligible, after a preferred one), "explicit only", or "no: <the reason it cannot run here>"."""
    rows = []
    for name in REGISTRY:
        for dev in device_types:
            for op in OPS:
                device = torch.device(dev)
                reason = why_not(name, device, op)
                if reason is not None:
                    status = f"no: {reason}"
                elif not auto_picks(name, device, op):
                    status = "explicit only"
                else:
                    status = "auto picks it" if resolve("auto", device, op) == name else "auto fallback"
                rows.append({"backend": name, "device": dev, "op": op, "status": status})
    return rows


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


# (rewards [M, R] fp32, weights [R], group_size, scale, eps) -> advantages [M] fp32, inputs validated.
AdvantagesFn = Callable[[Tensor, Tensor, int, str, float], Tensor]


def group_advantages_fn(name: str) -> AdvantagesFn:
    """The group-advantages kernel of a backend."""
    if name == "torch":
        return torch_group_advantages
    if name == "triton":
        from .triton_ops import triton_group_advantages  # imports triton: only when this backend runs

        return triton_group_advantages
    if name == "native":
        from ._native import native_group_advantages

        return native_group_advantages
    raise ValueError(f"backend {name!r} has no group-advantages kernel")
