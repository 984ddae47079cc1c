"""The run directory: checked usable before anything loads, and the run's settings saved in it.

``train_config.yaml`` holds the resolved options of the run (every one, defaults included), rewritten
at each start: ``--resume`` takes them from there, and ``--config RUN/train_config.yaml`` starts a new
run like it. A run without that file has the same options in each checkpoint's ``trainer_state.json``.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

SETTINGS_FILE = "train_config.yaml"


def nearest_existing(path: Path) -> Path:
    """``path`` or the closest of its parents that exists (``.`` at worst, for a relative path)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: str | Path) -> None:
    """Create ``path`` and write a probe file in it; ValueError in one line saying why it cannot be used."""
    path = Path(path)
    existing = nearest_existing(path)
    if not existing.is_dir():
        raise ValueError(
            f"output_dir {str(path)!r} cannot be created: {str(existing)!r} is a file, not a directory"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ValueError(f"output_dir {str(path)!r} cannot be written: {_why(err, existing)}") from None


def _why(err: OSError, existing: Path) -> str:
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied in {str(existing)!r}"
    if err.errno == errno.EROFS:
        return f"{str(existing)!r} is on a read-only filesystem"
    if err.errno == errno.ENOENT:  # /proc and similar: the directory exists, its filesystem refuses new ones
        return f"{str(existing)!r} does not accept new directories (a virtual filesystem such as /proc?)"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full"
    return err.strerror or str(err)


def write_settings(run_dir: str | Path, settings: dict[str, Any]) -> Path:
    """Write ``train_config.yaml`` atomically (a run killed while writing keeps the previous one)."""
    import yaml

    path = Path(run_dir) / SETTINGS_FILE
    tmp = path.with_name(f".{SETTINGS_FILE}.tmp-{os.getpid()}")
    header = "# The resolved options of this run: --resume continues with them.\n"
    tmp.write_text(header + yaml.safe_dump(settings, sort_keys=False))
    os.replace(tmp, path)
    return path


def read_settings(run_dir: str | Path, checkpoint: Path | None = None) -> tuple[dict[str, Any], Path] | None:
    """The run's saved options and the file they come from: ``train_config.yaml``, else the options in
    ``checkpoint``'s ``trainer_state.json``; None when neither is there."""
    import yaml

    path = Path(run_dir) / SETTINGS_FILE
    if path.is_file():
        try:
            values = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise ValueError(f"{path} cannot be read ({err}); fix or remove it to resume") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a mapping of option names to values; fix or remove it")
        return values, path
    state_file = checkpoint / "trainer_state.json" if checkpoint is not None else None
    if state_file is None or not state_file.is_file():
        return None
    try:
        config = json.loads(state_file.read_text()).get("config")
    except (OSError, ValueError, AttributeError):
        return None  # a damaged checkpoint: resuming names it
    return (config, state_file) if isinstance(config, dict) else None
