"""Helpers shared by the kernels: launch checks and the online-softmax update."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

# Tile dtypes the kernels read and write; the math is fp32 whatever the tile's dtype.
TILE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The tile kernels (chunk_stats, chunk_grad_) scale as torch does on the CPU, z = x / T correctly rounded
# (tl.math.div_rn), not x * fl(1 / T): that product carries one relative rounding of 1 / T into every logit
# of every row alike, an error the tokens of the weight gradient do not average out (3-5x PyTorch's
# gradient error at T = 0.7).
# Launch option of the tile kernels: no a*b+c -> fma fusion, so every use of z (the row max, the exps, the
# gradient) sees the same fp32 z. A product fused in one place
# and rounded in another puts up to half an ulp of z (|z| ~ 1/T) into every p: 8x PyTorch's gradient
# error at T = 1e-3. They are memory-bound. Not for the fused log-prob GEMM: its fp32
# dot is built from fmas, and its forward-only logp already carries lse's own rounding (ulp of 1/T).
FP_FUSION = False


def interpreting() -> bool:
    """True under Triton's CPU interpreter, where the kernels take CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_device(op: str, *tensors: Tensor | None) -> None:
    """All on one device, CUDA unless the interpreter runs (it takes CPU tensors)."""
    present = [t for t in tensors if t is not None]
    device = present[0].device
    for t in present:
        if t.device != device:
            raise ValueError(f"{op}: all tensors must be on one device, got {device} and {t.device}")
    if device.type != "cuda" and not interpreting():
        raise ValueError(
            f"{op}: the Triton kernels need CUDA tensors (got {device.type}); "
            "set TRITON_INTERPRET=1 before importing triton to run them on the CPU"
        )


def check_tile(op: str, logits: Tensor) -> None:
    """A 2-D tile of a supported dtype whose rows are contiguous (any row stride)."""
    if logits.dim() != 2:
        raise ValueError(f"{op}: logits must be a [C, V] tile, got shape {tuple(logits.shape)}")
    if logits.dtype not in TILE_DTYPES:
        raise TypeError(f"{op}: logits must be float16, bfloat16 or float32, got {logits.dtype}")
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        raise ValueError(f"{op}: logits rows must be contiguous (stride(1) == 1), got {logits.stride()}")


def check_rows(op: str, name: str, x: Tensor | None, rows: int, dtypes: tuple[torch.dtype, ...]) -> None:
    """A contiguous [rows] vector of one of `dtypes` (None passes: optional inputs)."""
    if x is None:
        return
    if x.shape != (rows,):
        raise ValueError(f"{op}: {name} must have shape [{rows}], got {tuple(x.shape)}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must be {names}, got {x.dtype}")
    if rows > 1 and x.stride(0) != 1:
        raise ValueError(f"{op}: {name} must be contiguous")


def row_block(n_cols: int, cap: int) -> int:
    """Vocabulary block of a row loop: a power of two, at most `cap`, no larger than the row needs."""
    return max(16, min(cap, triton.next_power_of_2(max(n_cols, 1))))


@triton.jit
def online_update(m, s, u, z, valid, AXIS: tl.constexpr):
    """Fold a block of scaled logits z (-inf where not valid) into running softmax statistics.

    m: running max; s = sum exp(z - m); u = sum exp(z - m) * (z - m). Keeping u relative to the max
    makes the entropy ``log s - u / s`` a sum of two non-negative terms: no cancellation, unlike
    ``lse - E[z]`` for large logits. Rescaling to a new max m' (r = exp(m - m')):
    s' = r * s, u' = r * (u + s * (m - m')).
    """
    m_new = tl.maximum(m, tl.max(z, axis=AXIS))
    # Nothing but -inf so far (a block of masked vocabulary first): shift by 0, not by -inf, which would
    # make exp(-inf - -inf) = NaN; every exp is then exp(-inf) = 0 and the state stays empty.
    m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
    r = tl.exp(m - m_ref)
    # While nothing has been folded in, m = -inf and s = 0: the shift term must be 0, not 0 * -inf.
    shift = tl.where(s > 0, m - m_new, 0.0)
    if AXIS == 0:
        zc = z - m_ref
    else:
        zc = z - m_ref[:, None]
    e = tl.where(valid, tl.exp(zc), 0.0)
    # e > 0 also keeps -inf logits (masked vocabulary) from making 0 * -inf.
    eu = tl.where(e > 0, e * zc, 0.0)
    u = r * (u + s * shift) + tl.sum(eu, axis=AXIS)
    s = r * s + tl.sum(e, axis=AXIS)
    return m_new, s, u
