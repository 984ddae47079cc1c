"""The GPU kit (benchmarks/run_gpu.sh) rehearsed end to end on the CPU, as CI runs it, and its model.

``run_gpu.sh --cpu-dry-run`` runs every phase of the GPU record at tiny shapes (Triton under its
interpreter, TRL and Liger on the CPU), so a script bug shows here and not in a ten-minute device call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
gpu_model = pytest.importorskip("gpu_model")

ROW_FIELDS = {"impl", "N", "H", "V", "dtype", "beta", "ms", "tflops", "gemm_ratio", "peak_mb"}
ROW_FIELDS |= {"chunk_rows", "predicted_ms"}
TRUTH_FIELDS = {"loss_type", "backend", "dtype", "N", "H", "V", "max_rel_err", "ok"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-kit-out")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "RUN_BUDGET": "400"}
    env.pop("TRITON_INTERPRET", None)  # the script sets what it needs
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "run_gpu.sh"), "--cpu-dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc, out


def test_dry_run_passes_and_writes_every_phase(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (record,) = out.glob("*-dry-run.json")
    data = json.loads(record.read_text())
    assert data["dry_run"] is True and {"device", "torch", "triton", "commit", "date"} <= set(data)
    pre = data["preamble"]
    assert pre["gemm"]["tflops"] > 0 and pre["copy"]["gbs"] > 0 and pre["versions"]["torch"]
    # truth: every loss family on both GPU backends (Triton interpreted, native's C++ on the CPU), all in
    # tolerance
    assert {(t["config"], t["backend"]) for t in data["truth"]} == {
        (c, b) for c in ("dapo+kl", "grpo-sequence", "cispo", "sapo", "vespo") for b in ("triton", "native")
    }
    for t in data["truth"]:
        assert TRUTH_FIELDS <= set(t) and t["ok"] is True, t
    # the table: grpo_fast's rows first, every field, each with the model's prediction
    impls = list(dict.fromkeys(r["impl"] for r in data["rows"]))
    assert impls[:5] == [
        "grpo_fast-native",
        "grpo_fast-triton",
        "grpo_fast-triton-invariant",
        "grpo_fast-triton-logprobs",
        "grpo_fast-triton-logprobs-fused",
    ]
    assert {"trl", "liger", "torch-compile"} <= set(impls)
    assert sum(r["impl"] == "torch-compile" for r in data["rows"]) == 2  # one shape, beta 0 and 0.04
    for r in data["rows"]:
        assert ROW_FIELDS <= set(r) and "error" not in r, r
        assert r["ms"] > 0 and r["predicted_ms"] > 0
    tiled = [r for r in data["rows"] if r["impl"].startswith("grpo_fast") and not r["impl"].endswith("fused")]
    assert tiled and all(r["chunk_rows"] for r in tiled)  # the fused kernel has no tiles: None
    assert {r["impl"] for r in data["long_context"]} == {"grpo_fast-triton", "trl"}
    assert all(r["max_N"] and r["dry_run"] for r in data["long_context"])
    table = record.with_suffix(".md").read_text()
    assert "truth check" in table and "model ms" in table and "dry run" in table
    assert record.with_suffix(".png").stat().st_size > 1000
    assert (out / "tests.log").read_text().count("skipped") and (out / "bench.log").exists()
    # issue 16's training-step record: every implementation measured, the chart beside it
    steps = json.loads((out / "longctx-cpu-dry.json").read_text())
    assert steps["dry_run"] is True and {r["impl"] for r in steps["rows"]} == {
        "trl", "fast", "fast-padding-free", "thin", "thin-padding-free", "thin-padding-free-budget"
    }  # fmt: skip
    assert all(r["step_s"] > 0 and "error" not in r for r in steps["rows"]), steps["rows"]
    assert (out / "longctx-cpu-dry.png").stat().st_size > 1000
    # the zero-gradient skip's record: grpo_loss alone and both trainers' loss steps, skip off and on
    skip = json.loads((out / "skip-zero-cpu-dry.json").read_text())
    assert skip["dry_run"] is True and all("error" not in r for r in skip["rows"]), skip["rows"]
    steps = {(r["impl"], r["zero_frac"], r["skip"]) for r in skip["rows"] if r["case"] == "loss_step"}
    assert steps == {(i, f, s) for i in ("fast", "thin") for f in (0.0, 0.5) for s in (False, True)}
    assert {(r["zero_frac"], r["skip"]) for r in skip["rows"] if r["case"] == "grpo_loss"} >= {(0.5, True)}
    assert (out / "skip-zero-cpu-dry.png").stat().st_size > 1000


def test_roofline_model():
    """GEMM at the preamble rate plus tile bytes at the copy rate; fused log-probs move no tile."""
    pre = {"gemm": {"tflops": 700.0}, "copy": {"gbs": 4000.0}, "fp32_out_gemm": True}
    n, h, v = 8192, 4096, 151936
    gemm_only = 6 * n * h * v / 700e9
    loss = gpu_model.predicted_ms("grpo_fast-triton", n, h, v, "bfloat16", 7068, pre)
    tile = 3 * n * v * 2 / 4000e6
    assert loss == pytest.approx(gemm_only + tile + 6 * v * h / 4000e6)
    fused = gpu_model.predicted_ms("grpo_fast-triton-logprobs-fused", n, h, v, "bfloat16", 7068, pre)
    tiled = gpu_model.predicted_ms("grpo_fast-triton-logprobs", n, h, v, "bfloat16", 7068, pre)
    assert fused == pytest.approx(2 * n * h * v / 700e9) and tiled > fused
    # without fp32-output GEMMs every chunk pays a half [V, H] temporary into the fp32 accumulator
    slower = gpu_model.predicted_ms(
        "grpo_fast-triton", n, h, v, "bfloat16", 496, {**pre, "fp32_out_gemm": False}
    )
    assert slower > loss
    assert gpu_model.predicted_ms("trl", n, h, v, "bfloat16", None, pre) == pytest.approx(gemm_only)
