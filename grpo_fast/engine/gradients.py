"""The gradients a chunk pass accumulates: dL/dh rows, the fp32 dL/dW and dL/db accumulators, folded in
tile by tile from each tile's dlogits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .parallel import VocabShard


def _has_fp32_out_gemm() -> bool:
    """Whether this torch has addmm with an fp32 output for half inputs on CUDA (torch >= 2.8)."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("aten::addmm.dtype_out", "CUDA")
    except RuntimeError:  # no such operator in this torch
        return False


# Probed once, at import; set to False the first time the op fails at run time (then the fallback runs).
FP32_OUT_GEMM = {"cuda": _has_fp32_out_gemm()}


@dataclass
class Grads:
    hidden: Tensor | None
    weight: Tensor | None  # fp32 accumulator; garbage until the first chunk (no zero-fill)
    bias: Tensor | None  # fp32 accumulator
    started: bool = False  # whether a chunk has written the weight accumulator
    # Rows of ``hidden`` that the pass's rows are (the pass runs on a selection; the others keep 0): None,
    # the pass's rows are hidden's own.
    rows: Tensor | None = None
    invariant_rows: int | None = None  # batch invariance: hidden-gradient GEMMs of exactly this many rows

    @classmethod
    def allocate(
        cls,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        needs: tuple[bool, ...],
        rows: Tensor | None = None,
        invariant_rows: int | None = None,
    ) -> Grads:
        acc = dict(dtype=torch.promote_types(weight.dtype, torch.float32), device=weight.device)
        gh = None
        if needs[0]:  # rows outside the selection have no gradient: exact zeros
            gh = torch.empty_like(hidden) if rows is None else torch.zeros_like(hidden)
        return cls(
            hidden=gh,
            weight=torch.empty(weight.shape, **acc) if needs[1] else None,
            bias=torch.zeros(weight.shape[0], **acc) if (bias is not None and needs[2]) else None,
            rows=rows,
            invariant_rows=invariant_rows,
        )

    def _accumulate_weight(self, dlogits: Tensor, h_chunk: Tensor) -> None:
        acc, a, b = self.weight, dlogits.t(), h_chunk
        beta = 1.0 if self.started else 0.0  # the first chunk overwrites: no zero-fill beforehand
        if dlogits.dtype == acc.dtype:
            acc.addmm_(a, b, beta=beta)
            return
        if acc.device.type == "cuda" and FP32_OUT_GEMM["cuda"]:
            # Half inputs, fp32 output accumulated by the GEMM itself (beta = 1): no half [V, H] temporary.
            try:
                torch.addmm(acc, a, b, out_dtype=acc.dtype, beta=beta, out=acc)
                return
            except (RuntimeError, NotImplementedError):  # this build/GPU has no such kernel after all
                FP32_OUT_GEMM["cuda"] = False
        part = torch.mm(a, b)  # half-precision GEMM (fp32 accumulate inside), summed across chunks in fp32
        if self.started:
            acc.add_(part)
        else:
            acc.copy_(part)

    def _accumulate_hidden(self, dlogits: Tensor, weight: Tensor, start: int, end: int) -> None:
        """dL/dh of rows [start, end) of the pass from ``dlogits`` (the tile, padding rows included)."""
        c = end - start
        if self.invariant_rows is None:
            if self.rows is None:
                torch.mm(dlogits[:c], weight, out=self.hidden[start:end])
            else:
                self.hidden.index_copy_(0, self.rows[start:end], torch.mm(dlogits[:c], weight))
            return
        # One GEMM shape (invariant_rows rows, the tile's padding rows included): a row's dL/dh does not
        # depend on the rows it comes with, like its log-prob.
        part = dlogits.new_empty(dlogits.shape[0], weight.shape[1])
        for i in range(0, dlogits.shape[0], self.invariant_rows):
            torch.mm(dlogits[i : i + self.invariant_rows], weight, out=part[i : i + self.invariant_rows])
        if self.rows is None:
            self.hidden[start:end].copy_(part[:c])
        else:
            self.hidden.index_copy_(0, self.rows[start:end], part[:c])

    def accumulate(self, dlogits: Tensor, h_chunk: Tensor, weight: Tensor, start: int, end: int) -> None:
        """Fold the tile's ``dlogits`` (``[rows, V]``, padding rows after the ``end - start`` real ones)
        into the gradients of rows [start, end) of the pass."""
        if self.hidden is not None:
            self._accumulate_hidden(dlogits, weight, start, end)
        real = dlogits[: end - start]
        if self.weight is not None:
            self._accumulate_weight(real, h_chunk)
        if self.bias is not None:
            self.bias.add_(real.sum(0, dtype=self.bias.dtype))
        self.started = True

    def final(
        self, weight: Tensor, bias: Tensor | None, shard: VocabShard | None
    ) -> tuple[Tensor | None, ...]:
        if shard is not None and self.hidden is not None:
            shard.all_reduce_(self.hidden)  # each rank holds its vocab shard's part of dL/dh
        if self.weight is not None and not self.started:  # no token at all: the gradient is 0
            self.weight.zero_()
        gw = self.weight.to(weight.dtype) if self.weight is not None else None
        gb = self.bias.to(bias.dtype) if self.bias is not None else None
        return self.hidden, gw, gb
