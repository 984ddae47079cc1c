"""Shared test set-up. Runs before any test module imports triton or compiles anything."""

import os
import tempfile

import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter (must be set before triton loads).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A compile cache of this run's own: torch's on-disk cache (shared by every checkout on the machine) can
# hold backward graphs traced against another version of grpo_fast's custom ops, which then get called
# with that version's arguments. Subprocesses inherit it.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="grpo_fast-inductor-"))
