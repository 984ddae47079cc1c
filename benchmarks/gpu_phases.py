"""The GPU kit's phase bookkeeping, for run_gpu.sh: which packages each phase imports, and the phase records.

Imports nothing heavy (no torch): the shell calls it between phases.

    python benchmarks/gpu_phases.py missing PHASE
        prints the modules PHASE imports that this Python cannot find (nothing when all are there);
    python benchmarks/gpu_phases.py mark RESULTS PHASE STATUS SECONDS LIMIT [NOTE]
        appends {phase, status, seconds, limit_s, note} to RESULTS' "phases" (creating the file if the
        phase that makes it never ran). STATUS: ok, cut (stopped at or killed by its time box: what it
        measured is on the record, the rest is not), failed, skipped (no time left, or nothing to run).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

# The modules each phase imports beyond the standard library. A missing one is named in the phase's
# record; the phase still runs what it can (the table without TRL's rows, the report without its chart).
# TRL's trainer (trainstep) imports accelerate (and psutil) and datasets, which imports pyarrow, pandas, dill,
# multiprocess and xxhash: benchmarks/fetch_wheels.sh carries them (the image has torch, triton and
# transformers). matplotlib (the charts) is not carried: without it the report has tables and no chart.
PHASE_MODULES: dict[str, tuple[str, ...]] = {
    "preamble": ("torch", "numpy"),
    "truth": ("torch", "triton"),
    "table": ("torch", "triton", "trl", "liger_kernel"),
    "longctx": ("torch", "triton", "trl"),
    "trainstep": (
        "torch",
        "transformers",
        "trl",
        "accelerate",
        "psutil",
        "datasets",
        "pyarrow",
        "pandas",
        "dill",
        "multiprocess",
        "xxhash",
        "matplotlib",
    ),  # fmt: skip
    "skipzero": ("torch", "transformers", "trl", "accelerate", "datasets", "matplotlib"),
    "seqpar": ("torch", "transformers", "matplotlib"),
    "tests": ("pytest", "hypothesis", "triton"),
    "report": ("matplotlib",),
    "vocab_parallel": ("torch",),
}
STATUSES = ("ok", "cut", "failed", "skipped")


def missing(phase: str) -> list[str]:
    return [m for m in PHASE_MODULES.get(phase, ()) if importlib.util.find_spec(m) is None]


def mark(results: Path, phase: str, status: str, seconds: float, limit: float, note: str = "") -> dict:
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    data = json.loads(results.read_text()) if results.exists() else {}
    entry = dict(phase=phase, status=status, seconds=round(seconds, 1), limit_s=round(limit, 1))
    absent = missing(phase)
    if absent:
        entry["missing_packages"] = absent
    if note:
        entry["note"] = note
    data.setdefault("phases", []).append(entry)
    results.parent.mkdir(parents=True, exist_ok=True)
    tmp = results.with_suffix(".phase.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(results)
    return entry


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "missing":
        print(" ".join(missing(argv[1])))
        return 0
    if len(argv) in (6, 7) and argv[0] == "mark":
        _, results, phase, status, seconds, limit, *note = argv
        print(json.dumps(mark(Path(results), phase, status, float(seconds), float(limit), *note)))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
