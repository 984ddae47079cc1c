"""Shared test set-up. Runs before any test module imports triton."""

import os

import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter (must be set before triton loads).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
