"""Checkpoints that lose nothing: weights, optimizer, scheduler, every RNG and the data position.

A checkpoint is a directory ``checkpoint-<step>`` written under a temporary name and renamed into
place, so a crash mid-write never leaves a half checkpoint that looks complete. Nothing is
unpickled on load: weights are safetensors, the optimizer/scheduler/RNG tensors load with
``torch.load(weights_only=True)``, the rest is JSON.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

PREFIX = "checkpoint-"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")
WEIGHTS, TENSORS, STATE = "model.safetensors", "trainer_state.pt", "trainer_state.json"


def checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in run_dir.iterdir()
        if (m := _NAME.match(p.name)) and (p / STATE).is_file()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every RNG the run draws from: tensors (for torch.save) and JSON-able values."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = state
    version, internal, gauss = random.getstate()
    plain: dict[str, Any] = {"python": [version, list(internal), gauss]}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        tensors["numpy"] = torch.from_numpy(keys.astype("int64"))
        plain["numpy"] = [kind, int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return tensors, plain


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in plain and "numpy" in tensors:
        import numpy as np

        kind, pos, has_gauss, cached = plain["numpy"]
        np.random.set_state((kind, tensors["numpy"].numpy().astype("uint32"), pos, has_gauss, cached))


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    tokenizer: Any = None,
    keep: int = 2,
) -> Path:
    """Write ``run_dir/checkpoint-<step>`` atomically and keep the newest ``keep`` checkpoints."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"{PREFIX}{step:06d}"
    tmp = run_dir / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / WEIGHTS))
    # config + tokenizer make the checkpoint loadable with from_pretrained too.
    if hasattr(model, "config") and hasattr(model.config, "save_pretrained"):
        model.config.save_pretrained(tmp)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(tmp)
    rng_tensors, rng_plain = rng_state()
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_tensors},
        tmp / TENSORS,
    )
    _write_json(tmp / STATE, {**state, "step": step, "rng": rng_plain})
    if final.exists():  # re-saving a step (e.g. after a resume): swap the old one out first
        old = run_dir / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(run_dir)
    for stale in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(
    path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNGs in place; returns the JSON state (step, data, ...)."""
    path = Path(path)
    for name in (WEIGHTS, TENSORS, STATE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint: {name} is missing")
    missing, unexpected = load_model(model, str(path / WEIGHTS), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not fit the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    tensors = torch.load(path / TENSORS, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(tensors["optimizer"])
    scheduler.load_state_dict(tensors["scheduler"])
    state = json.loads((path / STATE).read_text())
    set_rng_state(tensors["rng"], state["rng"])
    return state


def clean_partial(run_dir: str | Path) -> None:
    """Remove temporary directories left by a run killed while saving."""
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        for p in run_dir.glob(f".{PREFIX}*"):
            shutil.rmtree(p, ignore_errors=True)


def _write_json(path: Path, obj: Any) -> None:
    with path.open("w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
