"""``grpo-fast check``: every backend this machine can run, against the reference, as a pass/fail table.

Each op runs on a few odd shapes (not multiples of any tile size). Its error against an fp64 truth
(the reference on fp64 inputs) may exceed the error of the reference itself in the same dtype by
at most the margin of :mod:`grpo_fast.commands.accuracy`: the rule the test-suite uses.
Backends that cannot run an op on a device are listed as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

import grpo_fast as gf
from grpo_fast import backends
from grpo_fast.commands.accuracy import bound, max_err, scale_for

BACKENDS = tuple(backends.REGISTRY)
OPS = backends.OPS
# (B, T, H, V) for the LM-head ops; (groups, G, reward functions) for group_advantages.
LM_SHAPES = ((3, 37, 67, 1013), (2, 130, 96, 4099))
ADV_SHAPES = ((5, 7, 1), (16, 8, 3))
LOSS_CONFIGS = {
    "dapo+kl": gf.GRPOConfig(loss_type="dapo", beta=0.04, epsilon_high=0.28),
    "grpo-seq": gf.GRPOConfig(loss_type="grpo", importance_sampling_level="sequence", temperature=0.7),
    "dapo T=1e-2": gf.GRPOConfig(loss_type="dapo", beta=0.04, temperature=1e-2),
    # the policy far from the reference (ref - logp ~ +-4, exp up to e^12): the bias-corrected KL
    "dapo+kl far-from-ref": gf.GRPOConfig(loss_type="dapo", beta=0.04, use_bias_correction_kl=True),
}
# How far ref_logp is drawn from the log-probs (std of the noise), per config; default 0.3.
REF_SPREAD = {"dapo+kl far-from-ref": 4.0}
# selective_logprobs at each: |z| = |x| / T grows to ~1e3 at T = 1e-3, where every p carries z's rounding.
TEMPERATURES = (1.0, 0.7, 1e-2, 1e-3)
# grpo_loss far from the reference (dapo, beta 0.04): (B, T, H, V) shapes, the largest per-token KL to the
# reference, temperatures, seeds. The KL term's gradient scales a log-prob's error by exp(ref - logp).
FAR_SHAPES = ((3, 29, 48, 517), (2, 41, 64, 1031))
FAR_KL = (3.0, 30.0)
FAR_TEMPERATURES = (1.0, 0.7, 1e-2)
FAR_SEEDS = (0, 1, 2, 3, 4)


@dataclass
class Row:
    backend: str
    device: str
    op: str
    case: str = ""
    dtype: str = ""
    abs_err: float = 0.0
    rel_err: float = 0.0
    status: str = "PASS"  # PASS, "FAIL: <outputs>", "ERROR: <exception>" or "skipped: <reason>"

    def cells(self) -> list[str]:
        if self.status.startswith("skipped"):
            return [self.backend, self.device, self.op, "", "", "", "", self.status]
        return [
            self.backend,
            self.device,
            self.op,
            self.case,
            self.dtype,
            f"{self.abs_err:.2e}",
            f"{self.rel_err:.2e}",
            self.status,
        ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        action="append",
        choices=["cpu", "cuda"],
        help="devices to check (default: cpu, and cuda when available)",
    )
    parser.add_argument(
        "--backend", action="append", choices=BACKENDS, help="backends to check (default: all)"
    )
    parser.add_argument("--op", action="append", choices=OPS, help="ops to check (default: all)")


def _lm_batch(
    shape: tuple[int, ...], seed: int, device: str = "cpu", temperature: float = 1.0, ref_spread: float = 0.3
) -> dict[str, Tensor]:
    """An fp64 batch on the CPU (the log-probs its old/ref are drawn around computed on ``device``, at
    ``temperature``); row 1 (if any) fully masked, masked ids may be -100."""
    B, T, H, V = shape
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 2 * H**-0.5
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.1
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.25).long()
    if B > 1:
        mask[1] = 0
        targets[1, :3] = -100
    with torch.no_grad():
        # The ids the loss reads (masked positions: 0), so old/ref are near the loss's log-probs everywhere:
        # at T = 1e-3 another id's log-prob is thousands away and exp(ref - logp) overflows at a masked spot.
        read = torch.where(mask != 0, targets, 0)
        on = (hidden.to(device), weight.to(device), read.to(device), bias.to(device))
        logp = gf.reference.selective_logprobs(*on, temperature=temperature).cpu()
    noise = lambda s=0.3: s * torch.randn(B, T, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(
        hidden=hidden,
        weight=weight,
        bias=bias,
        targets=targets,
        mask=mask,
        advantages=torch.randn(B, generator=g, dtype=torch.float64),
        old_logp=(logp + noise()).float(),
        ref_logp=(logp + noise(ref_spread)).clamp(max=0.0).float(),
    )


def _leaves(batch: dict[str, Tensor], dtype: torch.dtype, device: str) -> dict[str, Tensor]:
    out = {k: v.to(device) for k, v in batch.items()}
    for k in ("hidden", "weight", "bias"):
        out[k] = batch[k].to(device, dtype).requires_grad_(True)
    out["advantages"] = out["advantages"].float()
    return out


def _loss_outputs(fn: Callable, b: dict[str, Tensor], cfg: gf.GRPOConfig) -> list[Tensor]:
    loss, _ = fn(
        b["hidden"],
        b["weight"],
        b["targets"],
        b["mask"],
        b["advantages"],
        b["old_logp"],
        b["ref_logp"],
        b["bias"],
        cfg,
    )
    return [loss.detach(), *torch.autograd.grad(loss, [b["hidden"], b["weight"], b["bias"]])]


def _logprob_outputs(fn: Callable, b: dict[str, Tensor], temperature: float) -> list[Tensor]:
    logp, entropy = fn(b["hidden"], b["weight"], b["targets"].clamp(min=0), b["bias"], temperature, True)
    upstream = torch.linspace(-1, 1, logp.numel(), dtype=logp.dtype, device=logp.device).view_as(logp)
    return [logp.detach(), entropy, *torch.autograd.grad((logp * upstream).sum(), [b["hidden"], b["weight"]])]


LOSS_OUTPUTS = ("loss", "grad hidden", "grad weight", "grad bias")
LOGPROB_OUTPUTS = ("logp", "entropy", "grad hidden", "grad weight")


def _compare(
    names: tuple[str, ...], got: list[Tensor], ref: list[Tensor], truth: list[Tensor], dtype: torch.dtype
) -> tuple[float, float, str]:
    """Worst absolute and relative error, and "PASS" or "FAIL: <outputs out of tolerance>"."""
    worst_abs, worst_rel, failed = 0.0, 0.0, []
    for name, g, r, t in zip(names, got, ref, truth, strict=True):
        t = t.double().cpu()
        err, ref_err = max_err(g, t), max_err(r, t)
        scale = scale_for(name, t)
        if not err <= bound(ref_err, scale, dtype):  # a NaN anywhere (output or truth) fails too
            failed.append(name)
        worst_abs, worst_rel = max(worst_abs, err), max(worst_rel, err / scale)
    return worst_abs, worst_rel, f"FAIL: {', '.join(failed)}" if failed else "PASS"


def check_loss_case(
    backend: str,
    device: str,
    dtype: torch.dtype,
    shape: tuple[int, int, int, int],
    cfg: gf.GRPOConfig,
    truth_device: str = "cpu",
) -> tuple[float, float, str]:
    """grpo_loss on one ``(B, T, H, V)`` batch against the fp64 truth (loss and every gradient, by the
    tolerance rule): (max abs err, max rel err, "PASS" or "FAIL: ..."). ``truth_device``: where the fp64
    reference runs (a GPU makes real-size truth affordable)."""
    batch = _lm_batch(shape, seed=sum(shape), device=truth_device, temperature=cfg.temperature)
    run = partial(_loss_outputs, cfg=cfg)
    truth = run(gf.reference.grpo_loss, _leaves(batch, torch.float64, truth_device))
    ref = run(gf.reference.grpo_loss, _leaves(batch, dtype, device))
    got = run(partial(gf.grpo_loss, backend=backend), _leaves(batch, dtype, device))
    return _compare(LOSS_OUTPUTS, got, ref, truth, dtype)


def _far_batch(
    shape: tuple[int, int, int, int], seed: int, temperature: float, kl_max: float
) -> dict[str, Tensor]:
    """An fp64 batch whose fp32 (and bf16) logits are exact: hidden, weight and bias on a grid of 1/8 (times
    a power of two near T), so the errors judged are the tile math's and the gradient GEMMs', not those of
    the logits GEMM, which would hide them. The logits sit ~24 / T above 0 (a large logsumexp beside a
    small log of the sum of exps), half the targets are the row's top token, half random (log p very
    negative); ref - logp is uniform in [0, d] with exp(d) - d - 1 = kl_max."""
    B, T, H, V = shape
    g = torch.Generator().manual_seed(seed)
    grid = lambda x: (x * 8).round() / 8  # noqa: E731
    unit = 2.0 ** round(math.log2(temperature))
    hidden = grid(torch.randn(B, T, H, generator=g, dtype=torch.float64))
    weight = grid(torch.randn(V, H, generator=g, dtype=torch.float64) * 3 * H**-0.5) * unit
    bias = (grid(torch.randn(V, generator=g, dtype=torch.float64)) + 24) * unit
    top = (hidden @ weight.T + bias).argmax(-1)
    random = torch.randint(0, V, (B, T), generator=g)
    targets = torch.where(torch.rand(B, T, generator=g) < 0.5, top, random)
    mask = (torch.rand(B, T, generator=g) > 0.1).long()
    logp = gf.reference.selective_logprobs(hidden, weight, targets, bias, temperature=temperature)
    d = 1.0
    for _ in range(50):  # Newton on exp(d) - d - 1 = kl_max
        d -= (math.exp(d) - d - 1 - kl_max) / (math.exp(d) - 1)
    return dict(
        hidden=hidden,
        weight=weight,
        bias=bias,
        targets=targets,
        mask=mask,
        advantages=torch.randn(B, generator=g, dtype=torch.float64),
        old_logp=(logp + 0.05 * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=0.0).float(),
        ref_logp=(logp + d * torch.rand(B, T, generator=g, dtype=torch.float64)).clamp(max=0.0).float(),
    )


def _rel_l2(got: list[Tensor], truth: list[Tensor]) -> float:
    """Relative L2 error of ``got`` against ``truth``, all tensors as one vector (as a model's parameter
    gradients are judged)."""
    num = sum(
        (a.detach().double().cpu() - t.double().cpu()).square().sum() for a, t in zip(got, truth, strict=True)
    )
    den = sum(t.double().cpu().square().sum() for t in truth)
    return math.sqrt(num / max(den, 1e-300))


def check_far_case(
    backend: str,
    device: str,
    dtype: torch.dtype,
    shape: tuple[int, int, int, int],
    kl_max: float,
    temperature: float,
    seeds: tuple[int, ...] = FAR_SEEDS,
) -> tuple[float, float, str]:
    """grpo_loss far from the reference (dapo, beta 0.04) on one shape, KL and temperature, over ``seeds``:
    (max abs err, relative L2 error of the gradients, "PASS" or "FAIL: ..."). The gradients (hidden, weight,
    bias: one vector) may be at most twice as far from the fp64 truth, in relative L2 error and root mean
    square over the seeds, as the reference's in the same dtype (the plain PyTorch computation: TRL's), plus
    one ulp of 1 (summation-order noise: these errors are a few ulps); the loss is judged by the tolerance
    rule."""
    cfg = gf.GRPOConfig(loss_type="dapo", beta=0.04, temperature=temperature)
    run = partial(_loss_outputs, cfg=cfg)
    fast = partial(gf.grpo_loss, backend=backend)
    sq = {"got": 0.0, "ref": 0.0}
    worst_abs, failed = 0.0, []
    for seed in seeds:
        batch = _far_batch(shape, seed + sum(shape), temperature, kl_max)
        truth = run(gf.reference.grpo_loss, _leaves(batch, torch.float64, "cpu"))
        ref = run(gf.reference.grpo_loss, _leaves(batch, dtype, device))
        got = run(fast, _leaves(batch, dtype, device))
        loss_err = max_err(got[0], truth[0])
        if not loss_err <= bound(max_err(ref[0], truth[0]), scale_for("loss", truth[0]), dtype):
            failed = ["loss"]
        worst_abs = max(
            worst_abs, loss_err, *(max_err(a, t) for a, t in zip(got[1:], truth[1:], strict=True))
        )
        sq["got"] += _rel_l2(got[1:], truth[1:]) ** 2
        sq["ref"] += _rel_l2(ref[1:], truth[1:]) ** 2
    err, ref_err = (math.sqrt(sq[k] / len(seeds)) for k in ("got", "ref"))
    if not err <= 2 * ref_err + torch.finfo(dtype).eps:
        failed.append(f"gradients ({err / ref_err:.1f}x the reference's error)")
    return worst_abs, err, f"FAIL: {', '.join(failed)}" if failed else "PASS"


def _check_far(name: str, device: str, dtype: torch.dtype) -> list[Row]:
    rows = []
    for shape in FAR_SHAPES:
        for kl in FAR_KL:
            for t in FAR_TEMPERATURES:
                abs_err, rel_err, status = check_far_case(name, device, dtype, shape, kl, t)
                case = "x".join(map(str, shape)) + f" far KL<={kl:g} T={t:g}"
                rows.append(
                    Row(
                        name,
                        device,
                        "grpo_loss",
                        case,
                        str(dtype).removeprefix("torch."),
                        abs_err,
                        rel_err,
                        status,
                    )
                )
    return rows


def _check_lm(name: str, device: str, op: str, dtype: torch.dtype) -> list[Row]:
    rows = []
    if op == "grpo_loss":
        fast, reference, outputs = partial(gf.grpo_loss, backend=name), gf.reference.grpo_loss, LOSS_OUTPUTS
    else:
        fast, reference = partial(gf.selective_logprobs, backend=name), gf.reference.selective_logprobs
        outputs = LOGPROB_OUTPUTS
    for shape in LM_SHAPES:
        if op == "grpo_loss":  # each config its own old/ref, drawn at its temperature and spread
            cases = [
                (
                    label,
                    _lm_batch(
                        shape, sum(shape), temperature=cfg.temperature, ref_spread=REF_SPREAD.get(label, 0.3)
                    ),
                    partial(_loss_outputs, cfg=cfg),
                )
                for label, cfg in LOSS_CONFIGS.items()
            ]
        else:  # the log-probs read no old/ref: one batch for every temperature
            batch = _lm_batch(shape, seed=sum(shape))
            cases = [(f"T={t:g}", batch, partial(_logprob_outputs, temperature=t)) for t in TEMPERATURES]
        for label, batch, run in cases:
            truth = run(reference, _leaves(batch, torch.float64, "cpu"))
            ref = run(reference, _leaves(batch, dtype, device))
            got = run(fast, _leaves(batch, dtype, device))
            abs_err, rel_err, status = _compare(outputs, got, ref, truth, dtype)
            case = "x".join(map(str, shape)) + (f" {label}" if label else "")
            rows.append(
                Row(name, device, op, case, str(dtype).removeprefix("torch."), abs_err, rel_err, status)
            )
    return rows + (_check_far(name, device, dtype) if op == "grpo_loss" else [])


def _check_advantages(name: str, device: str) -> list[Row]:
    rows = []
    for groups, G, R in ADV_SHAPES:
        g = torch.Generator().manual_seed(groups * G + R)
        rewards = torch.rand(groups * G, R, generator=g, dtype=torch.float64)
        rewards[torch.rand(groups * G, R, generator=g) < 0.1] = float("nan")  # "does not apply"
        rewards[:G] = 0.5  # a group of equal rewards: advantage 0
        weights = torch.linspace(0.5, 1.5, R, dtype=torch.float64)
        truth = gf.reference.group_advantages(rewards, G, "group", 1e-4, weights)
        ref = gf.reference.group_advantages(
            rewards.float().to(device), G, "group", 1e-4, weights.float().to(device)
        )
        got = gf.group_advantages(rewards.float().to(device), G, reward_weights=weights.float(), backend=name)
        abs_err, rel_err, status = _compare(("advantages",), [got], [ref], [truth], torch.float32)
        rows.append(
            Row(name, device, "group_advantages", f"{groups}x{G}x{R}", "float32", abs_err, rel_err, status)
        )
    return rows


def check(backend_names: list[str], devices: list[str], ops: list[str]) -> list[Row]:
    rows: list[Row] = []
    for device in devices:
        dtypes = [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])
        for name in backend_names:
            for op in ops:
                try:
                    backends.resolve(name, torch.device(device), op)
                except ValueError as err:
                    reason = str(err).split(": ", 1)[-1]
                    rows.append(Row(name, device, op, status=f"skipped: {reason}"))
                    continue
                try:
                    if op == "group_advantages":
                        rows += _check_advantages(name, device)
                    else:
                        for dtype in dtypes:
                            rows += _check_lm(name, device, op, dtype)
                except Exception as err:  # a crashing backend is a finding, not the end of the check
                    rows.append(Row(name, device, op, status=f"ERROR: {type(err).__name__}: {err}"))
    return rows


def format_table(rows: list[Row]) -> str:
    header = ["backend", "device", "op", "shape", "dtype", "max abs err", "max rel err", "result"]
    cells = [header] + [r.cells() for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header) - 1)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(c, widths, strict=False)) + "  " + c[-1] for c in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        print(
            "grpo-fast check: error: --device cuda asked for, but torch sees no CUDA device", file=sys.stderr
        )
        return 2
    rows = check(args.backend or list(BACKENDS), devices, args.op or list(OPS))
    print(format_table(rows))
    failed = [r for r in rows if r.status.startswith(("FAIL", "ERROR"))]
    ran = [r for r in rows if not r.status.startswith("skipped")]
    print(f"\n{len(ran) - len(failed)} passed, {len(failed)} failed, {len(rows) - len(ran)} skipped")
    if not ran:  # a check that checked nothing must not look like a pass
        print(
            "grpo-fast check: error: nothing was checked (every combination asked for was skipped)",
            file=sys.stderr,
        )
        return 2
    return 1 if failed else 0
