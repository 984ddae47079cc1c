"""The GPU run's preamble measurements and the model every table row is compared with.

- :func:`preamble`: library versions; per table shape, the same-run cuBLAS GEMM times of the full
  ``[N, H] x [H, V]`` GEMM (the table's ``vs cuBLAS`` baseline) and of the three GEMMs of one logits tile
  as the loss runs them (forward ``[C, H] x [H, V]``, ``dH = dlogits [C, V] x W [V, H]``,
  ``dW = dlogits^T [V, C] x h [C, H]``, C the tile rows); the device copy bandwidth; and whether the GEMM
  with fp32 output for the dW accumulator runs here (tried, not just looked up);
- :func:`predict`: what a row should take, term by term (:data:`TERMS`): its GEMMs at that shape's
  measured rates and every other pass over memory the code makes at the copy bandwidth. A row far above
  its prediction says where to look; the terms say what was assumed. Launch and Python overheads are not
  modelled.
"""

from __future__ import annotations

import importlib.metadata
import math

import torch

from grpo_fast import backends
from grpo_fast.benchmarking import harness as bench
from grpo_fast.engine import gradients
from grpo_fast.engine.tile_size import auto_chunk_size

LOGPROB_IMPLS = ("grpo_fast-triton-logprobs", "grpo_fast-triton-logprobs-fused")
# The model's terms, in the order the report lists them (docs/benchmarks.md explains each).
TERMS = {
    "gemm_fwd": "logits GEMM, N/C tiles at the measured [C, H] x [H, V] time",
    "gemm_dh": "dH GEMM, N/C tiles at the measured [C, V] x [V, H] time",
    "gemm_dw": "dW GEMM, N/C tiles at the measured [V, C] x [C, H] time (half output)",
    "gemm_bound": "other implementations: 6NHV (2NHV no-grad) at the full-N GEMM's rate, a bound",
    "input_checks": "the value checks of targets, mask, advantages and old/ref log-probs: one read of each",
    "tile_stats": "the statistics pass: one read of every tile",
    "tile_grad": "dlogits in place: one read and one write of every tile",
    "dw_accumulate": "the fp32 dW accumulator: written by every tile, read by every tile but the first; "
    "without the fp32-output GEMM also each tile's half dW written and read",
    "dw_cast": "the fp32 dW cast to the weight's dtype: one fp32 read, one half write",
    "backward_scale": "the backward scales dH and dW in place by the incoming gradient (CUDA: always)",
    "result_check": "NaN/inf of hidden and W from the rows' log-prob and entropy: one read of each",
}


def flops(impl: str, n: int, h: int, v: int) -> float:
    return (2.0 if impl in LOGPROB_IMPLS else 6.0) * n * h * v


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def shape_key(n: int, h: int, v: int) -> str:
    return f"{n},{h},{v}"


def _randn(*shape: int, device: str, dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0):
    return (torch.randn(*shape, device=device, generator=gen) * scale).to(dtype)  # never time zeros


def shape_gemms(n: int, h: int, v: int, rows: int, dtype: torch.dtype, device: str, iters: int) -> dict:
    """Milliseconds of the full GEMM and of one tile's three GEMMs at ``rows`` rows (drawn on the device)."""
    gen = torch.Generator(device=device).manual_seed(0)
    w = _randn(v, h, device=device, dtype=dtype, gen=gen, scale=h**-0.5)
    a = _randn(n, h, device=device, dtype=dtype, gen=gen)
    time = lambda fn: bench._median_ms([fn], device, iters, warmup=2)  # noqa: E731
    out = {"rows": rows, "full_ms": _full_gemm_ms(a, w, time)}  # its [N, V] output freed on return
    tile, dh, dw = a.new_empty(rows, v), a.new_empty(rows, h), w.new_empty(v, h)
    out["fwd_ms"] = time(lambda: torch.mm(a[:rows], w.t(), out=tile))
    out["dh_ms"] = time(lambda: torch.mm(tile, w, out=dh))
    out["dw_ms"] = time(lambda: torch.mm(tile.t(), a[:rows], out=dw))
    return out


def _full_gemm_ms(a: torch.Tensor, w: torch.Tensor, time) -> float:
    full = a.new_empty(a.shape[0], w.shape[0])
    return time(lambda: torch.mm(a, w.t(), out=full))


def _copy_ms(mib: int, device: str, iters: int) -> float:
    src = torch.randn(mib * 2**20 // 4, device=device, generator=torch.Generator(device).manual_seed(1))
    dst = torch.empty_like(src)
    return bench._median_ms([lambda: dst.copy_(src)], device, iters, warmup=2)


def fp32_out_gemm(device: str, dtype: str, shape: tuple[int, int, int]) -> dict:
    """Whether the dW accumulation's fp32-output GEMM runs here: gradients' import-time probe, and a real
    call at one tile's dW shape (the probe only asks whether the kernel is registered)."""
    probe = gradients.FP32_OUT_GEMM.get("cuda")
    torch_dtype = bench.DTYPES[dtype]
    if not device.startswith("cuda") or torch_dtype.itemsize >= 4:
        return {"probe": probe, "ran": None, "note": "not used: fp32 tiles accumulate with addmm_"}
    n, h, v = shape
    rows = min(n, 1024)
    gen = torch.Generator(device=device).manual_seed(2)
    dl = _randn(rows, v, device=device, dtype=torch_dtype, gen=gen)
    x = _randn(rows, h, device=device, dtype=torch_dtype, gen=gen)
    acc = torch.zeros(v, h, device=device, dtype=torch.float32)
    try:
        torch.addmm(acc, dl.t(), x, out_dtype=torch.float32, beta=1.0, out=acc)
        torch.cuda.synchronize()
        return {"probe": probe, "ran": True}
    except (RuntimeError, NotImplementedError, TypeError) as err:
        return {"probe": probe, "ran": False, "error": f"{type(err).__name__}: {err}"[:300]}


def preamble(device: str, dtype: str, shapes: list[tuple[int, int, int]], copy_mb: int, iters: int) -> dict:
    """Versions, per-shape GEMM times (:func:`shape_gemms`), copy bandwidth and the fp32-output GEMM."""
    torch_dtype = bench.DTYPES[dtype]
    gemms = {}
    for n, h, v in shapes:
        rows = chunk_rows("grpo_fast-triton", n, v, dtype, device) or n
        gemms[shape_key(n, h, v)] = shape_gemms(n, h, v, rows, torch_dtype, device, iters)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    copy = _copy_ms(copy_mb, device, iters)
    n, h, v = shapes[0]
    first = gemms[shape_key(n, h, v)]["full_ms"]
    rate = 2.0 * n * h * v / first / 1e9
    return {
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": _version("triton"),
            "transformers": _version("transformers"),
            "trl": _version("trl"),
            "liger_kernel": _version("liger-kernel"),
            "datasets": _version("datasets"),
            "grpo_fast": _version("grpo-fast"),
        },
        "device_type": torch.device(device).type,
        "gemm": {"N": n, "H": h, "V": v, "dtype": dtype, "ms": first, "tflops": rate},
        "gemms": gemms,
        "copy": {"MiB": copy_mb, "ms": copy, "gbs": 2 * copy_mb * 2**20 / copy / 1e6},  # read + write
        "fp32_out_gemm": fp32_out_gemm(device, dtype, shapes[0]),
    }


def chunk_rows(impl: str, n: int, v: int, dtype: str, device: str) -> int | None:
    """Rows per logits tile of a grpo_fast row (None for the others: they tile their own way)."""
    name = {
        "grpo_fast-native": "native",
        "grpo_fast-triton": "triton",
        "grpo_fast-triton-invariant": "triton",
        "grpo_fast-torch": "torch",
        "grpo_fast-triton-logprobs": "triton",
    }.get(impl)
    if name is None:
        return None
    temps = backends.chunk_ops(name).fp32_temps
    return auto_chunk_size(n, v, bench.DTYPES[dtype], torch.device(device), temps)


def predict(
    impl: str, n: int, h: int, v: int, dtype: str, rows: int | None, pre: dict, fp32_out: bool | None = None
) -> dict[str, float]:
    """The model's milliseconds per term (:data:`TERMS`) for one step of ``impl``; their sum is the row's
    ``predicted_ms``. ``fp32_out``: whether the dW accumulation's fp32-output GEMM ran (the row's record;
    None: the preamble's answer)."""
    bw = pre["copy"]["gbs"] * 1e6  # bytes per ms
    elt = bench.DTYPES[dtype].itemsize
    measured = (pre.get("gemms") or {}).get(shape_key(n, h, v))
    if measured is None:  # no per-shape times: the first shape's full-GEMM rate for every GEMM
        rate = pre["gemm"]["tflops"] * 1e9
        measured = {"rows": 1, "full_ms": 2.0 * n * h * v / rate}
        measured.update({k: 2.0 * h * v / rate for k in ("fwd_ms", "dh_ms", "dw_ms")})
    per_row = {k: measured[k] / measured["rows"] for k in ("fwd_ms", "dh_ms", "dw_ms")}
    if rows is None and impl != LOGPROB_IMPLS[1]:
        return {"gemm_bound": flops(impl, n, h, v) / (2.0 * n * h * v) * measured["full_ms"]}
    terms = {"gemm_fwd": n * per_row["fwd_ms"]}
    tile = n * v * elt
    checks = 8 * n  # the rows' log-prob and entropy, fp32
    if impl in LOGPROB_IMPLS:
        if impl == LOGPROB_IMPLS[1]:
            terms["gemm_fwd"] = measured["full_ms"]  # the fused kernel at cuBLAS's rate: a bound
            return {**terms, "result_check": checks / bw}
        return {**terms, "tile_stats": tile / bw, "result_check": checks / bw}
    chunks = math.ceil(n / rows)
    terms["gemm_dh"] = n * per_row["dh_ms"]
    terms["gemm_dw"] = n * per_row["dw_ms"]
    terms["input_checks"] = n * (8 + 1 + 4 + 4) / bw  # targets (int64), mask, old and ref log-probs
    terms["tile_stats"] = tile / bw
    terms["tile_grad"] = 2 * tile / bw
    acc = (2 * chunks - 1) * 4 * v * h  # written by every tile, read by all but the first
    if elt < 4:
        ran = (pre.get("fp32_out_gemm") or {}).get("ran") if fp32_out is None else fp32_out
        if not ran:
            acc += chunks * 2 * 2 * v * h  # each tile's half dW: written by the GEMM, read by the add
        terms["dw_cast"] = (4 + elt) * v * h / bw
    terms["dw_accumulate"] = acc / bw
    if pre.get("device_type", "cuda") == "cuda":  # the CPU skips the scaling when the gradient is 1
        terms["backward_scale"] = 2 * elt * (n * h + v * h) / bw
    terms["result_check"] = checks / bw
    return terms


def predicted_ms(
    impl: str, n: int, h: int, v: int, dtype: str, rows: int | None, pre: dict, fp32_out: bool | None = None
) -> float:
    return sum(predict(impl, n, h, v, dtype, rows, pre, fp32_out).values())
