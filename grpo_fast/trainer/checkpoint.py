"""Checkpoints that lose nothing: weights, optimizer, scheduler, every RNG and the data position.

A checkpoint is a directory ``checkpoint-<step>`` written under a temporary name and renamed into
place, so a crash mid-write never leaves a half checkpoint that looks complete. Its last file,
``manifest.json``, holds the size and sha256 of every other one: a checkpoint damaged later (truncated,
overwritten, a flipped bit) is found on load, and resuming falls back to the newest intact one. Nothing is
unpickled on load: weights are safetensors, the optimizer/scheduler/RNG tensors load with
``torch.load(weights_only=True)``, the rest is JSON.

Weights and optimizer state are stored whole (unsharded, optimizer state keyed by parameter name,
through ``torch.distributed.checkpoint.state_dict``), so a checkpoint of one process, of DDP or of
FSDP2 on any number of ranks loads into any of them. Under FSDP2 gathering them is a collective:
:func:`training_state` runs on every rank, and only rank 0 writes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

PREFIX = "checkpoint-"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")
WEIGHTS, TENSORS, STATE = "model.safetensors", "trainer_state.pt", "trainer_state.json"
MANIFEST = "manifest.json"


class DamagedCheckpoint(ValueError):
    """A checkpoint whose files do not match its manifest, or cannot be read."""


class ModelMismatch(ValueError):
    """An intact checkpoint of another model (parameter names differ)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """Sizes and sha256 of every file of ``directory`` (written last, so it vouches for all of them)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    _write_json(directory / MANIFEST, {"files": entries})


def damage(path: str | Path) -> str | None:
    """What is wrong with checkpoint ``path`` (a missing, resized or changed file), or None if intact.

    A checkpoint written before manifests existed is only checked for its files."""
    path = Path(path)
    for name in (WEIGHTS, TENSORS, STATE):
        if not (path / name).is_file():
            return f"{name} is missing"
    if not (path / MANIFEST).is_file():
        return None
    try:
        entries = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} is unreadable ({err})"
    for name, want in entries.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["size"]:
            return f"{name} has {f.stat().st_size} bytes, {want['size']} were written"
        if _sha256(f) != want["sha256"]:
            return f"{name} has changed since it was written (sha256 mismatch)"
    return None


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


# Whole tensors on the CPU, on rank 0 only (the other ranks get empty dicts).
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def tied_names(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names that are one tensor (tied embeddings), each sorted."""
    by_param: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(p), []).append(name)
    return [sorted(names) for names in by_param.values() if len(names) > 1]


def training_state(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Whole weights (a tied tensor once, under its first name) and name-keyed optimizer state."""
    weights = get_model_state_dict(model, options=_FULL)
    for names in tied_names(model):
        for name in names[1:]:
            weights.pop(name, None)
    return weights, get_optimizer_state_dict(model, optimizer, options=_FULL)


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
    weights: dict[str, Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write ``run_dir/checkpoint-<step>`` atomically and keep the newest ``keep`` checkpoints.

    ``weights``/``optimizer_state``: from :func:`training_state` when it had to run on every rank
    (FSDP2); gathered here otherwise.
    """
    if weights is None or optimizer_state is None:
        weights, optimizer_state = training_state(model, optimizer)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"{PREFIX}{step:06d}"
    tmp = run_dir / f".{final.name}.tmp-{os.getpid()}"
    try:
        return _save(
            run_dir, final, tmp, model, optimizer_state, weights, scheduler, state, tokenizer, step, keep
        )
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)  # the half-written copy, never an earlier checkpoint
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(run_dir).free
            raise DiskFull(
                f"the disk is full ({free / 2**20:.0f} MiB free) while writing {final.name} in {run_dir}: "
                f"nothing of it was kept, the earlier checkpoints are intact; free some space and --resume"
            ) from err
        raise


class DiskFull(OSError):
    """No space left while writing a checkpoint (the earlier ones are untouched)."""


def _save(
    run_dir: Path,
    final: Path,
    tmp: Path,
    model: nn.Module,
    optimizer_state: dict[str, Any],
    weights: dict[str, Tensor],
    scheduler: Any,
    state: dict[str, Any],
    tokenizer: Any,
    step: int,
    keep: int,
) -> Path:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # "format": "pt" lets transformers' from_pretrained read the file too.
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS), metadata={"format": "pt"})
    # config + tokenizer make the checkpoint loadable with from_pretrained too.
    if hasattr(model, "config") and hasattr(model.config, "save_pretrained"):
        model.config.save_pretrained(tmp)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(tmp)
    rng_tensors, rng_plain = rng_state()
    torch.save(
        {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng_tensors},
        tmp / TENSORS,
    )
    _write_json(tmp / STATE, {**state, "step": step, "rng": rng_plain})
    write_manifest(tmp)
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
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    verified: bool = False,
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNGs in place; returns the JSON state (step, data, ...).

    Every rank calls this (under FSDP2 each keeps its shard of the whole tensors it reads).
    ``verified``: :func:`damage` has just passed it (rank 0, for every rank): not hashed again.
    """
    path = Path(path)
    for name in (WEIGHTS, TENSORS, STATE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint: {name} is missing")
    problem = None if verified else damage(path)
    if problem is not None:
        raise DamagedCheckpoint(f"checkpoint {path} is damaged: {problem}")
    try:
        return _load(path, model, optimizer, scheduler)
    except ModelMismatch:
        raise
    except Exception as err:  # truncated or garbage files of a checkpoint without a manifest
        raise DamagedCheckpoint(f"checkpoint {path} cannot be read: {type(err).__name__}: {err}") from err


def _load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    weights = load_file(path / WEIGHTS)
    for names in tied_names(model):
        stored = [n for n in names if n in weights]
        for name in names:
            if stored and name not in weights:
                weights[name] = weights[stored[0]]
    expected = set(model.state_dict())
    missing, unexpected = expected - set(weights), set(weights) - expected
    if missing or unexpected:
        raise ModelMismatch(
            f"checkpoint {path} does not fit the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
    tensors = torch.load(path / TENSORS, map_location="cpu", weights_only=True)
    set_optimizer_state_dict(
        model, optimizer, tensors["optimizer"], options=StateDictOptions(full_state_dict=True)
    )
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
