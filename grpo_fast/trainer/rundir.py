"""The run directory: checked usable before anything loads."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path


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
