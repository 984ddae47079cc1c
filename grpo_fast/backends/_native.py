"""The compiled extension ``grpo_fast._C``: lazy, safe loading, fake kernels, and thin wrappers of its ops.

The ops are registered with TORCH_LIBRARY in csrc/bindings.cpp and called as ``torch.ops.grpo_fast.*``.
Their fake (meta) kernels live here, so torch.compile can trace them: grpo_fast._C calls
``_register_fakes()`` while it initializes (torch accepts a fake kernel only once the op exists, and
only from the module that the C++ side names with ``set_python_module``, this one), so they are in
place however the extension was imported. Nothing here imports the extension at module import:
``available()`` / ``load()`` do, once.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch import Tensor

from ..config import SCALE_MODES

_module: ModuleType | None = None
_error: BaseException | None = None
_tried = False
_fakes_registered = False


def _try_load() -> ModuleType | None:
    global _module, _error, _tried
    if not _tried:
        _tried = True
        try:
            module = importlib.import_module("grpo_fast._C")
        except (ImportError, OSError) as err:  # missing build, or a build against another torch
            _error = err
        else:
            _register_fakes()  # already done by the extension's init; kept for a _C built before that
            _module = module
    return _module


def available() -> bool:
    """True when the compiled extension grpo_fast._C imports."""
    return _try_load() is not None


def load_error() -> str | None:
    """Why grpo_fast._C did not import (None when it did, or before the first attempt)."""
    _try_load()
    return None if _error is None else f"{type(_error).__name__}: {_error}"


def cuda_built() -> bool:
    """True when grpo_fast._C was compiled with its CUDA kernels (torch with CUDA and nvcc at build time)."""
    module = _try_load()
    return module is not None and bool(module.cuda_built())


def load() -> ModuleType:
    """grpo_fast._C, or a RuntimeError that carries the original import error."""
    module = _try_load()
    if module is None:
        raise RuntimeError(
            f"the compiled extension grpo_fast._C is not available ({load_error()}); build it with "
            "`pip install --no-build-isolation -e .` (or `make install`) against the installed torch"
        ) from _error
    return module


# ---- fake kernels (shapes and dtypes only), one per op of csrc/bindings.cpp ----


def _group_advantages_fake(
    rewards: Tensor, reward_weights: Tensor, group_size: int, scale_mode: int, eps: float
) -> Tensor:
    torch._check(rewards.dim() == 2, lambda: f"rewards must be 2-D [M, R], got {rewards.dim()}-D")
    torch._check(
        reward_weights.dim() == 1 and reward_weights.shape[0] == rewards.shape[1],
        lambda: f"reward_weights must be [R] with R = {rewards.shape[1]}, got {tuple(reward_weights.shape)}",
    )
    torch._check(rewards.dtype == torch.float32, lambda: f"rewards must be float32, got {rewards.dtype}")
    torch._check(
        reward_weights.dtype == torch.float32,
        lambda: f"reward_weights must be float32, got {reward_weights.dtype}",
    )
    torch._check(group_size > 0, lambda: f"group_size must be positive, got {group_size}")
    torch._check(scale_mode in (0, 1, 2), lambda: f"scale_mode must be 0, 1 or 2, got {scale_mode}")
    return rewards.new_empty(rewards.shape[0])


def _check_tile_fake(op: str, logits: Tensor, targets: Tensor) -> None:
    torch._check(logits.dim() == 2, lambda: f"{op}: logits must be a 2-D [C, V] tile, got {logits.dim()}-D")
    torch._check(
        logits.dtype in (torch.float32, torch.bfloat16, torch.float16),
        lambda: f"{op}: logits must be float32, bfloat16 or float16, got {logits.dtype}",
    )
    torch._check(
        targets.shape == (logits.shape[0],) and targets.dtype == torch.int64,
        lambda: (
            f"{op}: targets must be int64 [{logits.shape[0]}], got {targets.dtype} {tuple(targets.shape)}"
        ),
    )


def _check_out_fake(
    op: str, out: Tensor, k: int, rows, dtypes: tuple[torch.dtype, ...] = (torch.float32,)
) -> None:
    torch._check(
        out.shape == (k, rows) and out.dtype in dtypes,
        lambda: f"{op}: out must be {dtypes} [{k}, {rows}], got {out.dtype} {tuple(out.shape)}",
    )


def _chunk_stats_fake(logits: Tensor, targets: Tensor, temperature: float, out: Tensor) -> None:
    _check_tile_fake("chunk_stats", logits, targets)
    _check_out_fake("chunk_stats", out, 3, logits.shape[0], (torch.float32, torch.float64))


def _chunk_partial_stats_fake(logits: Tensor, targets: Tensor, temperature: float, out: Tensor) -> None:
    _check_tile_fake("chunk_partial_stats", logits, targets)
    _check_out_fake("chunk_partial_stats", out, 4, logits.shape[0])


def _chunk_grad_fake(
    logits: Tensor,
    targets: Tensor,
    lse: Tensor,
    g: Tensor,
    temperature: float,
    ent_coef: Tensor | None = None,
    entropy: Tensor | None = None,
) -> None:
    _check_tile_fake("chunk_grad", logits, targets)
    torch._check(
        (ent_coef is None) == (entropy is None),
        lambda: "chunk_grad: ent_coef and entropy go together (the entropy-gradient term needs both)",
    )


def _register_fakes() -> None:
    """Fake kernels of every op; called by grpo_fast._C at import (csrc/bindings.cpp), idempotent."""
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True
    # Registered from this module, as the C++ side's set_python_module("grpo_fast.backends._native") demands.
    torch.library.register_fake("grpo_fast::group_advantages", _group_advantages_fake)
    torch.library.register_fake("grpo_fast::chunk_stats", _chunk_stats_fake)
    torch.library.register_fake("grpo_fast::chunk_partial_stats", _chunk_partial_stats_fake)
    torch.library.register_fake("grpo_fast::chunk_grad", _chunk_grad_fake)


# ---- wrappers ----


def native_group_advantages(
    rewards2d: Tensor, weights: Tensor, group_size: int, scale: str, eps: float
) -> Tensor:
    """grpo_fast::group_advantages of rewards [M, R] fp32 and weights [R]: advantages [M] fp32."""
    if scale not in SCALE_MODES:
        raise ValueError(f"scale must be one of {tuple(SCALE_MODES)}, got {scale!r}")
    load()
    return torch.ops.grpo_fast.group_advantages(
        rewards2d.contiguous(),
        weights.to(rewards2d.device).contiguous(),
        group_size,
        SCALE_MODES[scale],
        float(eps),
    )
