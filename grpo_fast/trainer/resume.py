"""What ``--resume`` runs with: the run's saved options, and only the changes that keep it the same run.

An option given again with its saved value changes nothing. A different value is applied, and named in
one line, when it leaves the run's numbers alone (``RESUME_FREE``: logging, saving, device, memory) or
is ``max_steps`` at or past the step reached; any other difference (model, dataset, rewards, loss,
group size, optimiser, ...) is refused in one line, as it would make the checkpoints another run's.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from .checkpoint import PREFIX, latest_checkpoint
from .config import RESUME_FREE, TrainConfig, checked_values, option_flag
from .demo import DEMO
from .rundir import read_settings

_STEP = re.compile(rf"^{PREFIX}(\d+)$")


class ResumeConflict(ValueError):
    """Options given to ``--resume`` that the saved run cannot continue with."""


def resume_config(resume: bool | str, given: dict[str, Any], source: str) -> tuple[TrainConfig, list[str]]:
    """``(config, one line per applied change)`` for ``--resume`` (True: the latest checkpoint of the run
    directory; a path: that checkpoint) with the options ``given`` again (flags and YAML).

    No saved run: the given options alone (the trainer then says it starts a new run)."""
    given = checked_values(given, source)
    if resume is True:
        run_dir = Path(given.get("output_dir") or default_output_dir(given))
        checkpoint, settings_dir = latest_checkpoint(run_dir), run_dir
    else:
        checkpoint = Path(resume)
        run_dir = Path(given.get("output_dir") or checkpoint.parent)
        settings_dir = checkpoint.parent
    found = read_settings(settings_dir, checkpoint)
    if found is None:
        return TrainConfig.from_dict(given, source=source), []
    saved, where = found
    values, changes = merge(_known(saved), given, reached_step(checkpoint), where)
    values["output_dir"] = str(run_dir)  # where the run is now, whatever its saved path says
    return TrainConfig.from_dict(values, source=str(where)), changes


def merge(
    saved: dict[str, Any], given: dict[str, Any], step: int | None, where: Path
) -> tuple[dict[str, Any], list[str]]:
    """The saved options with the allowed changes of ``given`` applied; raises ResumeConflict naming
    every change that is not allowed."""
    values, changes, refused = dict(saved), [], []
    for name, new in given.items():
        old = saved.get(name, _default(name))
        if name == "output_dir" or new == old:
            continue
        flag, change = option_flag(name), f"{_shown(old)} -> {_shown(new)}"
        if name == "max_steps" and step is not None and new < step:
            refused.append(f"{flag} ({change}: the run has reached step {step})")
        elif name in RESUME_FREE or name == "max_steps":
            values[name] = new
            changes.append(f"resume changes {flag}: {change}{_consequence(name, old, new)}")
        else:
            refused.append(f"{flag} ({change})")
    if refused:
        raise ResumeConflict(
            f"--resume continues the run saved in {where} and cannot change {', '.join(refused)}; "
            "start a new run for that (another --output-dir, or --overwrite)"
        )
    return values, changes


def _consequence(name: str, old: Any, new: Any) -> str:
    if name == "save_total_limit" and new < old:
        return f" (the next save removes all but the newest {new} checkpoints)"
    if name == "max_steps":
        return " (the learning-rate schedule now ends there)"
    return ""


def default_output_dir(given: dict[str, Any]) -> str:
    """The run directory of a run given no --output-dir (the demo's or another model's default)."""
    return TrainConfig.from_dict({"model": given.get("model", DEMO)}).output_dir


def reached_step(checkpoint: Path | None) -> int | None:
    match = _STEP.match(checkpoint.name) if checkpoint is not None else None
    return int(match.group(1)) if match else None


def _known(saved: dict[str, Any]) -> dict[str, Any]:
    """Saved options this version still has (an option since removed is dropped)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in saved.items() if k in names}


def _default(name: str) -> Any:
    """An option missing from saved settings (added since): the run used its default."""
    f = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)
