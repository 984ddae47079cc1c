"""Multi-process tests: ``spawn`` runs a worker on N processes like ``torch.multiprocessing.spawn``.

A worker that returns ends its process at once (``os._exit(0)`` after flushing), skipping the interpreter's
teardown: there, after the group was destroyed and every result checked, gloo's threads sometimes abort the
process ("terminate called without an active exception", SIGABRT) on the loaded 2-core machine. A worker
that raises still fails the test with its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch.multiprocessing as mp


def _run_then_exit(rank: int, worker: Callable[..., None], *args: object) -> None:
    worker(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(worker: Callable[..., None], args: tuple = (), nprocs: int = 2) -> None:
    """``worker(rank, *args)`` on ``nprocs`` processes; raises if any of them fails."""
    mp.spawn(_run_then_exit, args=(worker, *args), nprocs=nprocs, join=True)
