"""Every implementation the loss benchmarks time, in one table (:data:`IMPLS`), and which can run where.

- ``reference``: :func:`grpo_fast.reference.grpo_loss` (the full fp32 logits);
- ``grpo_fast-torch`` / ``-native`` / ``-triton``: ``grpo_loss(backend=...)``; ``-triton-invariant``
  with ``batch_invariant=True``; ``-triton-logprobs(-fused)``: no-grad ``selective_logprobs``;
- ``trl``: TRL 1.16's own path: its fused LM head (``trl.kernels.chunked_logprob.ChunkedLogProbFunction``,
  called as ``add_fused_lm_head`` calls it: the unmasked tokens, 32768-wide vocabulary tiles, entropy
  requested) and then its torch loss on the per-token log-probs (``GRPOTrainer._compute_loss``'s lines,
  as :func:`grpo_fast.reference.loss_from_logps` has them);
- ``liger``: liger-kernel's ``LigerFusedLinearGRPOLoss`` as TRL configures it (compiled, one sequence
  per chunk);
- ``torch-compile``: grpo_fast's chunk loop with the "torch" chunk pass under ``torch.compile``: every
  tile method the loop calls, ``tile_pass_``'s halves included (the loop itself, with its data-dependent
  chunking, and the objective's coefficients stay eager);

Nothing heavy is imported here: each factory imports its library when the benchmark builds a step.
:func:`runnable` says which can run on a device (library installed, CUDA where it needs CUDA).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import sys
import types
from collections.abc import Callable

import torch

import grpo_fast as gf

from .. import reference
from ..backends.torch_ops import TorchChunkOps
from ..engine.plan import LossCall, plan_loss, run_loss_plan
from .cases import BenchCase

Factory = Callable[[dict, BenchCase], Callable[[], None]]

# TRL's add_fused_lm_head vocabulary tile width (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE).
TRL_VOCAB_CHUNK = 32768


def _ensure_trl_trainer_utils() -> None:
    """ChunkedLogProbFunction.backward imports ``maybe_gather_lm_head_ctx`` from ``trl.trainer.utils``,
    which imports ``datasets`` and more. Where those are missing (a bare GPU image), stand in a module
    with that one helper, as TRL defines it without DeepSpeed ZeRO-3: a null context."""
    try:
        import trl.trainer.utils  # noqa: F401
    except ImportError as err:
        stub = types.ModuleType("trl.trainer.utils")
        stub.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
        stub.__doc__ = f"grpo_fast benchmark stand-in: trl.trainer.utils failed to import ({err})"
        sys.modules["trl.trainer.utils"] = stub
        print(f"grpo_fast.benchmarking.baselines: {stub.__doc__}", file=sys.stderr)


def _trl(inputs: dict, case: BenchCase) -> Callable[[], None]:
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    _ensure_trl_trainer_utils()
    cfg = case.config()
    hidden, weight, targets, mask = inputs["hidden"], inputs["weight"], inputs["targets"], inputs["mask"]
    keep = mask.bool()

    def step() -> None:
        hidden.grad = weight.grad = None
        logps, entropy, *_ = ChunkedLogProbFunction.apply(
            hidden[keep],
            weight,
            None,
            targets[keep],
            cfg.temperature,
            TRL_VOCAB_CHUNK,
            None,
            1.0,
            ("entropy",),
        )
        per_token_logps = logps.new_zeros(keep.shape).masked_scatter(keep, logps)
        entropies = entropy.new_zeros(keep.shape).masked_scatter(keep, entropy)
        loss, _ = reference.loss_from_logps(
            per_token_logps,
            entropies,
            mask,
            inputs["advantages"],
            inputs.get("old_logp"),
            inputs.get("ref_logp"),
            cfg,
        )
        loss.backward()

    return step


def _liger(inputs: dict, case: BenchCase) -> Callable[[], None]:
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    cfg = case.config()
    loss_fn = LigerFusedLinearGRPOLoss(
        beta=cfg.beta,
        compiled=torch.device(case.device).type == "cuda",
        use_ref_model=cfg.beta != 0.0,
        chunk_size=1,
        epsilon_low=cfg.epsilon_low,
        epsilon_high=cfg.epsilon_high,
        loss_type=cfg.loss_type,
        max_completion_length=cfg.max_completion_length,
        importance_sampling_level=cfg.importance_sampling_level,
        temperature=cfg.temperature,
        delta=cfg.delta,
        use_bias_correction_kl=cfg.use_bias_correction_kl,
    )

    def step() -> None:
        inputs["hidden"].grad = inputs["weight"].grad = None
        out = loss_fn(
            inputs["hidden"],
            inputs["weight"],
            inputs["targets"],
            inputs["mask"],
            inputs["advantages"],
            ref_per_token_logps=inputs.get("ref_logp"),
            old_per_token_logps=inputs.get("old_logp"),
        )
        (out[0] if isinstance(out, tuple) else out).backward()

    return step


def _loss_step(loss_fn: Callable) -> Factory:
    def factory(inputs: dict, case: BenchCase) -> Callable[[], None]:
        cfg = case.config()

        def step() -> None:
            inputs["hidden"].grad = inputs["weight"].grad = None
            loss, _ = loss_fn(**inputs, config=cfg)
            loss.backward()

        return step

    return factory


def _grpo_fast(backend: str, **options: object) -> Factory:
    return _loss_step(lambda **kw: gf.grpo_loss(**kw, backend=backend, **options))


class CompiledTorchChunkOps(TorchChunkOps):
    """The "torch" chunk pass with every tensor method the chunk loop reaches under torch.compile (compiled
    once per process): ``stats``, ``stats_``, ``partial_stats``, ``grad_``, and ``tile_pass_``'s two halves
    around the objective's coefficients (``tile_stats_``, ``tile_grad_``; the coefficients are autograd on
    ``[C]`` vectors, eager as in every backend)."""

    name = "torch-compile"
    _compiled: dict[str, Callable] = {}

    def _fn(self, method: str) -> Callable:
        if method not in self._compiled:
            self._compiled[method] = torch.compile(getattr(TorchChunkOps(), method), dynamic=False)
        return self._compiled[method]

    def tile_stats_(self, logits, targets, temperature):
        return self._fn("tile_stats_")(logits, targets, temperature)

    def tile_grad_(self, logits, probs, scratch, targets, g, e, entropy, temperature):
        return self._fn("tile_grad_")(logits, probs, scratch, targets, g, e, entropy, temperature)

    def stats(self, logits, targets, temperature):
        return self._fn("stats")(logits, targets, temperature)

    def stats_(self, logits, targets, temperature):
        return self._fn("stats_")(logits, targets, temperature)

    def partial_stats(self, logits, targets, temperature):
        return self._fn("partial_stats")(logits, targets, temperature)

    def grad_(self, logits, targets, lse, g, temperature, ent_coef=None, entropy=None):
        return self._fn("grad_")(logits, targets, lse, g, temperature, ent_coef, entropy)


def _torch_compile(inputs: dict, case: BenchCase) -> Callable[[], None]:
    cfg, ops = case.config(), CompiledTorchChunkOps()
    fields = ("hidden", "weight", "targets", "mask", "advantages", "old_logp", "ref_logp")

    def step() -> None:
        inputs["hidden"].grad = inputs["weight"].grad = None
        h, w, b, plan = plan_loss(LossCall(**{k: inputs.get(k) for k in fields}, config=cfg, backend="torch"))
        loss, _ = run_loss_plan(h, w, b, dataclasses.replace(plan, ops=ops))  # the compiled chunk pass
        loss.backward()

    return step


def _triton_logprobs(fused: bool) -> Factory:
    """No-grad ``selective_logprobs`` on the Triton backend: the tile path, or the fused GEMM kernel."""

    def factory(inputs: dict, case: BenchCase) -> Callable[[], None]:
        hidden, weight, targets = inputs["hidden"].detach(), inputs["weight"].detach(), inputs["targets"]
        temperature = case.config().temperature

        def step() -> None:
            with torch.no_grad():
                gf.selective_logprobs(
                    hidden, weight, targets, temperature=temperature, backend="triton", fused_gemm=fused
                )

        return step

    return factory


def _native_built() -> bool:
    from ..backends import _native

    return _native.available()


# name -> (factory, modules it imports, needs CUDA); the order is the benchmark tables' order.
IMPLS_SPEC: dict[str, tuple[Factory, tuple[str, ...], bool]] = {
    "reference": (_loss_step(reference.grpo_loss), (), False),
    "grpo_fast-torch": (_grpo_fast("torch"), (), False),
    "grpo_fast-native": (_grpo_fast("native"), (), False),
    "grpo_fast-triton": (_grpo_fast("triton"), ("triton",), True),
    # the cost of batch_invariant=True (128-row logits GEMMs) on the GPU
    "grpo_fast-triton-invariant": (_grpo_fast("triton", batch_invariant=True), ("triton",), True),
    "grpo_fast-triton-logprobs": (_triton_logprobs(fused=False), ("triton",), True),
    "grpo_fast-triton-logprobs-fused": (_triton_logprobs(fused=True), ("triton",), True),
    "trl": (_trl, ("trl",), True),
    "liger": (_liger, ("liger_kernel",), True),
    "torch-compile": (_torch_compile, (), True),
}
IMPLS: dict[str, Factory] = {name: spec[0] for name, spec in IMPLS_SPEC.items()}
# The ones that are not grpo_fast's own (what grpo_fast is compared with on a GPU).
BASELINES = ("trl", "liger", "torch-compile")


def missing_modules(name: str) -> list[str]:
    """The modules implementation ``name`` imports that are not installed here."""
    return [m for m in IMPLS_SPEC[name][1] if importlib.util.find_spec(m) is None]


def runnable(name: str, device: str, dry_run: bool = False) -> bool:
    """Whether implementation `name` can run on `device` here (library installed, CUDA, extension built).

    ``dry_run``: the GPU kit's CPU rehearsal, where the CUDA ones run on CPU tensors too (Triton under
    its interpreter, TRL's and Liger's torch code as is)."""
    if name not in IMPLS_SPEC:
        return False
    needs_cuda = IMPLS_SPEC[name][2]
    if needs_cuda and not dry_run and not (device.startswith("cuda") and torch.cuda.is_available()):
        return False
    if name.startswith("grpo_fast-triton") and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    if name == "grpo_fast-native" and not _native_built():
        return False
    return not missing_modules(name)
