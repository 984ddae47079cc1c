"""The sequence-parallel benchmark (benchmarks/bench_sequence_parallel.py) end to end at its dry run's tiny
shapes: one process and two gloo processes sharing the rows, the record's fields and its chart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_writes_the_record(tmp_path):
    out = tmp_path / "sp.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # this checkout's grpo_fast
    script = ROOT / "benchmarks" / "bench_sequence_parallel.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--dry-run", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    fields = {"device", "date", "commit", "torch", "dtype", "shape", "budget_mb", "largest_fits", "ratios"}
    assert fields <= set(record)
    assert record["dry_run"] is True and record["parallelism"] == "fsdp" and record["padding_free"] is True
    rows = {row["P"]: row for row in record["rows"]}
    assert sorted(rows) == [1, 2] and all(r["completion_tokens"] == 48 for r in rows.values())
    for size, row in rows.items():
        assert "error" not in row, row
        assert len(row["peak_mb_ranks"]) == size and row["peak_mb"] == max(row["peak_mb_ranks"]) > 0
        assert row["step_s"] > 0 and max(row["completion_lengths"]) == 48
    assert record["largest_fits"] == {"1": 48, "2": 48}
    ratios = record["ratios"]
    assert ratios["at_tokens"] == 48
    assert ratios["at_fit"]["2"] == round(rows[2]["peak_mb"] / rows[1]["peak_mb"], 3)
    assert ratios["by_length"] == {"48": ratios["at_fit"]} and set(ratios["meets_targets"]) == {"2"}
    assert out.with_suffix(".png").stat().st_size > 1000
