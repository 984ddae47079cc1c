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


ORDER = ["preamble", "truth", "table", "longctx", "trainstep", "skipzero", "seqpar", "tests", "report"]


def _kit(out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "RUN_BUDGET": "1500", **env}
    env.pop("TRITON_INTERPRET", None)  # the script sets what it needs
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "run_gpu.sh"), "--cpu-dry-run", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-kit-out")
    return _kit(out), out


def test_dry_run_passes_and_writes_every_phase(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (record,) = out.glob("*-dry-run.json")
    data = json.loads(record.read_text())
    assert data["dry_run"] is True and {"device", "torch", "triton", "commit", "date"} <= set(data)
    # the phases in order, the record (table) before the test suite, each in its box and ok
    assert [p["phase"] for p in data["phases"]] == ORDER
    assert all(p["status"] == "ok" and p["seconds"] <= p["limit_s"] + 5 for p in data["phases"]), data[
        "phases"
    ]
    starts = [proc.stdout.index(f"== {p} (box") for p in ORDER]
    assert starts == sorted(starts)
    pre = data["preamble"]
    assert pre["gemm"]["tflops"] > 0 and pre["copy"]["gbs"] > 0 and pre["versions"]["torch"]
    # per-shape GEMM times: the full GEMM and one tile's three GEMMs, at every table shape
    assert len(pre["gemms"]) == 2 and all(
        g["rows"] > 0 and min(g["full_ms"], g["fwd_ms"], g["dh_ms"], g["dw_ms"]) > 0
        for g in pre["gemms"].values()
    )
    assert set(pre["fp32_out_gemm"]) >= {"probe", "ran"}
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
        assert r["predicted_ms"] == pytest.approx(sum(r["model"].values()))
        assert set(r["model"]) <= set(gpu_model.TERMS)
    loss_row = next(r for r in data["rows"] if r["impl"] == "grpo_fast-native")
    assert {"gemm_fwd", "gemm_dh", "gemm_dw", "tile_stats", "tile_grad", "dw_accumulate"} <= set(
        loss_row["model"]
    )
    tiled = [r for r in data["rows"] if r["impl"].startswith("grpo_fast") and not r["impl"].endswith("fused")]
    assert tiled and all(r["chunk_rows"] for r in tiled)  # the fused kernel has no tiles: None
    assert {r["impl"] for r in data["long_context"]} == {"grpo_fast-triton", "trl"}
    assert all(r["max_N"] and r["dry_run"] for r in data["long_context"])
    table = record.with_suffix(".md").read_text()
    assert "truth check" in table and "model ms" in table and "dry run" in table and "| phase |" in table
    assert "gemm_dw" in table  # the model's terms per row
    assert record.with_suffix(".png").stat().st_size > 1000
    assert (out / "tests.log").read_text().count("skipped") and (out / "bench.log").exists()
    # the long-context training-step record: every implementation measured, the chart beside it
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
    # sequence parallelism: the Ulysses inner kernel against sdpa with the mask, then the benchmark's P = 1, 2
    kernels = json.loads((out / "ulysses-kernels-cpu-dry.json").read_text())
    assert [(r["kernel"], r["dtype"], r["ok"]) for r in kernels["rows"]] == [("flex", "float32", True)]
    assert all(r["fwd_ms"] > 0 and r["sdpa_fwd_ms"] > 0 for r in kernels["rows"])
    seqpar = json.loads((out / "sequence-parallel-cpu-dry.json").read_text())
    assert seqpar["dry_run"] is True and [r["P"] for r in seqpar["rows"]] == [1, 2]
    assert all(r["peak_mb"] > 0 and r["step_s"] > 0 for r in seqpar["rows"]), seqpar["rows"]


def test_an_overrunning_phase_is_cut_and_recorded(tmp_path):
    """A table that outlasts its box stops itself (its rows so far on the record); a test phase that
    outlasts its box is killed; both are recorded as cut, the report still runs, the exit status says 3."""
    proc = _kit(tmp_path, "preamble", "table", "tests", "report", KIT_BOX_table="20", KIT_BOX_tests="6")
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(next(tmp_path.glob("*-dry-run.json")).read_text())
    status = {p["phase"]: p for p in data["phases"]}
    assert [p["phase"] for p in data["phases"]] == ["preamble", "table", "tests", "report"]
    assert status["preamble"]["status"] == status["report"]["status"] == "ok"
    assert status["table"]["status"] == "cut" and "stopped at its time limit" in status["table"]["note"]
    assert status["tests"]["status"] == "cut" and "killed" in status["tests"]["note"]
    assert status["tests"]["seconds"] <= 6 + 5 + 2
    assert 0 < len(data["rows"]) < 30  # some rows, not all of them
    assert "| table | cut |" in next(tmp_path.glob("*-dry-run.md")).read_text()


def test_a_row_over_its_time_box_is_cut(monkeypatch):
    """A table row that runs past its own time box is on the record as cut, and the table goes on."""
    import time

    bench_gpu = pytest.importorskip("bench_gpu")
    from grpo_fast.benchmarking import harness

    def slow(inputs, case):
        return lambda: time.sleep(0.3)

    monkeypatch.setitem(harness.IMPLS, "slow", slow)
    case = harness.BenchCase(N=16, H=8, V=32)
    t0 = time.monotonic()
    row = bench_gpu.measure_row("slow", case, 1.0, iters=5, pre={}, limit=0.5)
    assert row["cut"] is True and row["error"].startswith("cut") and row["ms"] is None
    assert time.monotonic() - t0 < 1.5


def test_model_counts_every_pass():
    """The model: per-shape GEMM times from the preamble, then every pass over memory the loss makes."""
    n, h, v, rows = 16384, 4096, 151936, 8192
    gemms = {"full_ms": 30.0, "fwd_ms": 16.0, "dh_ms": 17.0, "dw_ms": 18.0, "rows": rows}
    pre = {
        "gemm": {"tflops": 700.0},
        "gemms": {gpu_model.shape_key(n, h, v): gemms},
        "copy": {"gbs": 3000.0},
        "fp32_out_gemm": {"probe": True, "ran": True},
        "device_type": "cuda",
    }
    bw = 3000e6
    terms = gpu_model.predict("grpo_fast-triton", n, h, v, "bfloat16", rows, pre)
    assert terms["gemm_fwd"] == pytest.approx(2 * 16.0) and terms["gemm_dh"] == pytest.approx(2 * 17.0)
    assert terms["gemm_dw"] == pytest.approx(2 * 18.0)
    assert terms["tile_stats"] == pytest.approx(n * v * 2 / bw)
    assert terms["tile_grad"] == pytest.approx(2 * n * v * 2 / bw)
    assert terms["dw_accumulate"] == pytest.approx(3 * 4 * v * h / bw)  # 2 tiles: write, read + write
    assert terms["dw_cast"] == pytest.approx(6 * v * h / bw)
    assert terms["backward_scale"] == pytest.approx(4 * (n * h + v * h) / bw)
    assert set(terms) <= set(gpu_model.TERMS)
    # the fp32-output GEMM did not run: every tile's half dW is written and read besides
    without = gpu_model.predict("grpo_fast-triton", n, h, v, "bfloat16", rows, pre, fp32_out=False)
    assert without["dw_accumulate"] - terms["dw_accumulate"] == pytest.approx(2 * 4 * v * h / bw)
    # no-grad log-probs: the tile path reads its tiles once; the fused kernel moves none
    fused = gpu_model.predict("grpo_fast-triton-logprobs-fused", n, h, v, "bfloat16", None, pre)
    tiled = gpu_model.predict("grpo_fast-triton-logprobs", n, h, v, "bfloat16", rows, pre)
    assert fused["gemm_fwd"] == 30.0 and "tile_stats" not in fused and tiled["tile_stats"] > 0
    # the others: a bound, the full GEMM's rate for 6NHV
    assert gpu_model.predict("trl", n, h, v, "bfloat16", None, pre) == {"gemm_bound": pytest.approx(90.0)}
    # a shape the preamble did not measure: the first shape's rate for every GEMM
    other = gpu_model.predict("grpo_fast-triton", 4096, h, v, "bfloat16", 4096, pre)
    assert other["gemm_fwd"] == pytest.approx(2 * 4096 * h * v / 700e9)
