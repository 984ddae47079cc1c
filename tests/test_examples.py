"""The examples run as a user runs them (a subprocess from the repository root) and do what they say."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_custom_loop_reward_rises():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "custom_loop.py"), "--steps", "60"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rewards = [float(r) for r in re.findall(r"reward (\d+\.\d+)", run.stdout)]
    assert len(rewards) == 6, run.stdout
    # the mean reward of the first 10 steps (~0.05 for the random model) against the last 10 steps'
    assert rewards[-1] > rewards[0] + 0.25, run.stdout
