"""The GPU run's ``truth`` phase: every loss family on every GPU backend against the fp64 truth.

One real-vocabulary batch per loss family (the clipped surrogate with KL, GSPO's sequence-level ratio,
CISPO, SAPO, VESPO), on each backend, in the run's dtype: the loss and the hidden, weight and bias
gradients must be within the tolerance rule (``grpo_fast.commands.accuracy``) of an fp64 reference
computed on the same device. Entries: ``{loss_type, config, backend, dtype, N, H, V, max_rel_err, ok}``.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable

import torch

import grpo_fast as gf
from grpo_fast import backends
from grpo_fast.benchmarking import harness as bench
from grpo_fast.commands.check import check_loss_case

FAMILIES: dict[str, gf.GRPOConfig] = {
    "dapo+kl": gf.GRPOConfig(loss_type="dapo", beta=0.04, epsilon_high=0.28),
    "grpo-sequence": gf.GRPOConfig(loss_type="grpo", importance_sampling_level="sequence", temperature=0.7),
    "cispo": gf.GRPOConfig(loss_type="cispo", epsilon_high=4.0),
    "sapo": gf.GRPOConfig(loss_type="sapo", beta=0.04),
    "vespo": gf.GRPOConfig(loss_type="vespo"),
}
GPU_BACKENDS = ("triton", "native")


def run_truth(
    device: str,
    dtype: str,
    shape: tuple[int, int, int, int],
    add: Callable[[dict], None],
    deadline_passed: Callable[[], bool],
) -> bool:
    """Check every family x backend at ``shape`` = (B, T, H, V); ``add`` records each entry as it lands.
    False when the deadline stopped it before the last."""
    B, T, H, V = shape
    torch_dtype = bench.DTYPES[dtype]
    for backend in GPU_BACKENDS:
        reason = backends.why_not(backend, torch.device(device), "grpo_loss")
        for label, cfg in FAMILIES.items():
            entry = dict(
                loss_type=cfg.loss_type, config=label, backend=backend, dtype=dtype, N=B * T, H=H, V=V
            )
            if reason is not None:
                add({**entry, "max_rel_err": None, "ok": None, "skipped": reason})
                continue
            if deadline_passed():
                print("time limit reached: the remaining truth checks are not run", flush=True)
                return False
            t0 = time.monotonic()
            try:
                _, rel, status = check_loss_case(
                    backend, device, torch_dtype, shape, cfg, truth_device=device
                )
                entry.update(max_rel_err=rel, ok=status == "PASS", status=status)
            except Exception as err:  # a crash is a finding: record it and go on
                traceback.print_exc()
                entry.update(max_rel_err=None, ok=False, status=f"ERROR: {type(err).__name__}: {err}"[:500])
            entry["seconds"] = round(time.monotonic() - t0, 2)
            add(entry)
            print(
                f"  truth {backend:<7} {label:<14} {entry['status']:<10} max rel err {rel_str(entry)}",
                flush=True,
            )
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return True


def rel_str(entry: dict) -> str:
    return "n/a" if entry.get("max_rel_err") is None else f"{entry['max_rel_err']:.2e}"
