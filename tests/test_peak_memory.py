"""The loss's CPU peak memory above its inputs: the fp32 weight gradient, the hidden gradient and one logits
tile, nothing more (no per-call [V, H] temporary for input checks or for scaling the gradients).

How it is measured: in a fresh process, the resident set's high-water mark (``VmHWM`` in
``/proc/self/status``) after a warm-up call, reset just before the measured call by writing 5 to
``/proc/self/clear_refs`` (Linux >= 4.0). RSS counts every byte the process touches, whoever allocated it
(torch's CPU allocator has no statistics of its own, and tracemalloc sees only Python's allocations); the
warm-up puts the libraries' one-time buffers and thread stacks in the baseline. glibc's mmap threshold is
fixed at 1 MiB (``MALLOC_MMAP_THRESHOLD_``, which also turns off its dynamic growth), so every large
buffer is its own mapping, returned to the system when freed: no freed heap memory hides a peak or
inflates the next one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from grpo_fast import backends

N, H, V = 512, 256, 151936  # the real vocabulary: dW is 156 MB, a tile at most the CPU budget (96 MiB)
ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import gc, json, sys
    import torch
    import grpo_fast as gf
    from grpo_fast import backends
    from grpo_fast.engine.tile_size import auto_chunk_size

    N, H, V, backend = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(4, N // 4, H, generator=g) * 0.5).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) * H**-0.5).requires_grad_(True)
    targets = torch.randint(0, V, (4, N // 4), generator=g)
    mask = torch.ones(4, N // 4)
    advantages = torch.randn(4, generator=g)
    old = -torch.rand(4, N // 4, generator=g) - 8.0

    def step():
        hidden.grad = weight.grad = None
        loss, _ = gf.grpo_loss(hidden, weight, targets, mask, advantages, old, backend=backend)
        loss.backward(torch.tensor(0.5))  # not 1: the backward scales the gradients

    step()  # warm-up
    hidden.grad = weight.grad = None
    gc.collect()
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark starts again from the current resident set
    step()
    peak = status("VmHWM")
    assert torch.isfinite(weight.grad).all() and torch.isfinite(hidden.grad).all()
    temps = backends.chunk_ops(backend).fp32_temps
    rows = auto_chunk_size(N, V, torch.float32, torch.device("cpu"), temps)
    print(json.dumps(dict(peak_above=peak - base, rows=rows, tile=rows * V * (4 + 4 * temps))))
    """
)


def _measure(backend: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20), "GRPO_FAST_CHUNK_BUDGET_MB": "96"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(N), str(H), str(V), backend],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
@pytest.mark.parametrize("backend", ["torch", "native"])
def test_loss_peak_is_gradients_plus_one_tile(backend):
    if backends.why_not(backend, torch.device("cpu"), "grpo_loss") is not None:
        pytest.skip(f"{backend} cannot run here")
    got = _measure(backend)
    dw, dh = 4 * V * H, 4 * N * H  # fp32 weight gradient, hidden gradient
    bound = dw + dh + got["tile"]
    mib = {
        k: f"{x / 2**20:.1f} MiB"
        for k, x in dict(peak=got["peak_above"], bound=bound, tile=got["tile"]).items()
    }
    print(f"CPU, {backend}: peak above inputs {mib['peak']}, bound {mib['bound']} (tile {got['rows']} rows)")
    assert got["peak_above"] <= 1.05 * bound, got
    assert got["peak_above"] >= dw, got  # the measurement sees the gradient itself
