"""Every Triton kernel compiles for a real GPU (sm_90, Hopper; sm_80, Ampere) down to a cubin, without a GPU.

The interpreter runs the kernels' arithmetic in numpy but never lowers them, so type errors of the
compiled path (a loop-carried value changing type, a constexpr used as a tensor) would first show on a
GPU. Triton's compiler and its bundled ptxas run on any machine: this test lowers each kernel, in the
variants launches use (dtypes, flags, arguments equal to 1 that Triton turns into constants), in a
subprocess without TRITON_INTERPRET. It also checks that the fused log-prob GEMM is software-pipelined
and uses Hopper's wgmma, given 16-byte aligned inputs as real launches have.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

# (kernel, signature, constexprs, options): signature types as Triton names them ("*bf16" a pointer).
LOGPROBS_SIG = {
    "h_ptr": "*bf16", "stride_h": "i32", "w_ptr": "*bf16", "stride_w": "i32", "b_ptr": "*bf16",
    "targets_ptr": "*i64", "part_ptr": "*fp32", "n_rows": "i32", "n_vocab": "i32", "n_hidden": "i32",
    "cols_per_split": "i32", "n_row_blocks": "i32", "n_splits": "i32", "group_rows": "i32", "inv_t": "fp32",
}  # fmt: skip
GROUP_SIG = {
    "rewards_ptr": "*fp32", "weights_ptr": "*fp32", "out_ptr": "*fp32", "summed_ptr": "*fp32",
    "n_funcs": "i32", "group_size": "i32", "eps": "fp32", "scale_mode": "i32",
}  # fmt: skip


def _without(sig: dict, *names: str) -> dict:
    return {k: v for k, v in sig.items() if k not in names}


def variants():
    from grpo_fast.kernels import advantages, chunk_grad, chunk_stats, logprobs

    stats_sig = {
        "logits_ptr": "*bf16", "stride_row": "i64", "targets_ptr": "*i64", "out_ptr": "*fp32",
        "n_rows": "i32", "n_cols": "i32", "temperature": "fp32",
    }  # fmt: skip
    for partial in (False, True):
        yield (
            chunk_stats._chunk_stats_kernel,
            stats_sig,
            {"PARTIAL": partial, "BLOCK_V": 4096},
            {"num_warps": 8},
        )
    yield (
        chunk_stats._chunk_stats_kernel,
        _without(dict(stats_sig, logits_ptr="*fp32"), "n_rows"),
        {"n_rows": 1, "PARTIAL": False, "BLOCK_V": 16},
        {"num_warps": 4},
    )
    grad_sig = {
        "logits_ptr": "*bf16", "stride_row": "i64", "targets_ptr": "*i64", "lse_ptr": "*fp32",
        "lse_lo_ptr": "*fp32", "g_ptr": "*fp32", "ent_coef_ptr": "*fp32", "entropy_ptr": "*fp32",
        "n_cols": "i32", "temperature": "fp32",
    }  # fmt: skip
    for has_ent in (False, True):
        yield chunk_grad._chunk_grad_kernel, grad_sig, {"HAS_ENT": has_ent, "BLOCK_V": 2048}, {"num_warps": 4}
    yield (
        chunk_grad._chunk_grad_kernel,
        dict(grad_sig, logits_ptr="*fp16", stride_row="i32"),
        {"HAS_ENT": True, "BLOCK_V": 1024},
        {"num_warps": 4},
    )
    for dtype, bias, (bn, bv, bk) in (("*bf16", False, (128, 128, 64)), ("*fp16", True, (64, 64, 32))):
        sig = dict(LOGPROBS_SIG, h_ptr=dtype, w_ptr=dtype, b_ptr=dtype)
        consts = {"HAS_BIAS": bias, "IEEE": False, "BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk}
        yield logprobs._logprobs_partial_kernel, sig, consts, {"num_warps": 8, "num_stages": 3}
    yield (
        logprobs._logprobs_partial_kernel,
        _without(dict(LOGPROBS_SIG, h_ptr="*fp32", w_ptr="*fp32", b_ptr="*fp32"), "n_rows"),
        {"n_rows": 1, "HAS_BIAS": True, "IEEE": True, "BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_K": 32},
        {"num_warps": 4, "num_stages": 2},
    )
    combine_sig = {"part_ptr": "*fp32", "out_ptr": "*fp32", "n_rows": "i32", "n_splits": "i32"}
    yield logprobs._logprobs_combine_kernel, combine_sig, {"BLOCK": 256}, {"num_warps": 4}
    yield (
        logprobs._logprobs_combine_kernel,
        _without(combine_sig, "n_splits", "n_rows"),
        {"n_splits": 1, "n_rows": 1, "BLOCK": 256},
        {"num_warps": 4},
    )
    yield advantages._group_kernel, GROUP_SIG, {"BLOCK_G": 16}, {"num_warps": 4}
    yield (
        advantages._group_kernel,
        _without(GROUP_SIG, "n_funcs", "group_size"),
        {"n_funcs": 1, "group_size": 1, "BLOCK_G": 16},
        {"num_warps": 4},
    )
    batch_sig = {"out_ptr": "*fp32", "summed_ptr": "*fp32", "n": "i32", "eps": "fp32"}
    yield advantages._batch_scale_kernel, batch_sig, {"BLOCK": 1024}, {"num_warps": 8}
    yield advantages._batch_scale_kernel, _without(batch_sig, "n"), {"n": 1, "BLOCK": 1024}, {"num_warps": 8}


def compile_all() -> None:
    """Lower every variant for sm_90 and sm_80 (run without TRITON_INTERPRET); raises on any failure."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def build(fn, sig, consts, options, arch, aligned=()):
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
        full = {**sig, **dict.fromkeys(consts, "constexpr")}
        src = ASTSource(fn=fn, signature=full, constexprs=consts, attrs=attrs)
        return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)

    count = 0
    for fn, sig, consts, options in variants():
        for arch in (90, 80):
            kernel = build(fn, sig, consts, options, arch)
            assert kernel.asm.get("cubin"), f"{fn.__name__}: no cubin for sm_{arch}"
            count += 1
    # The fused GEMM as launched on Hopper: aligned pointers, strides and H.
    from grpo_fast.kernels import logprobs

    aligned = ("h_ptr", "w_ptr", "b_ptr", "targets_ptr", "part_ptr", "stride_h", "stride_w", "n_hidden")
    consts = {"HAS_BIAS": False, "IEEE": False, "BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_K": 64}
    options = {"num_warps": 8, "num_stages": 3}
    ttgir = build(logprobs._logprobs_partial_kernel, LOGPROBS_SIG, consts, options, 90, aligned).asm["ttgir"]
    assert "warp_group_dot" in ttgir, "the fused log-prob GEMM does not use wgmma on sm_90"
    assert "async_copy_global_to_local" in ttgir, "the fused log-prob GEMM is not software-pipelined"
    print(f"compiled {count} kernel variants")


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia import compiler

        try:
            tool = compiler.get_ptxas(90)
        except TypeError:  # Triton before 3.3 took no architecture
            tool = compiler.get_ptxas()
        return bool(getattr(tool, "path", None))
    except Exception:  # no NVIDIA backend, no bundled ptxas and none on PATH
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's bundled ptxas is a Linux binary")
def test_kernels_compile_for_gpu():
    if not _ptxas_available():
        pytest.skip("no ptxas: Triton's bundled one is missing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-m", "tests.test_triton_compile"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "compiled" in out.stdout


if __name__ == "__main__":
    compile_all()
