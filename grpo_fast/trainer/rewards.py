"""Reward functions with TRL's signature ``f(prompts, completions, **columns) -> list[float | None]``.

A reward of None or NaN means "this function does not apply to that completion" (TRL's convention):
it is left out of the weighted sum. Anything else that is not a finite number is the function's bug,
reported as a :class:`RewardError` that names the function.
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

RewardFn = Callable[..., Sequence[float | None]]


class RewardError(RuntimeError):
    """A reward function raised or returned something unusable; ``name`` says which one.

    ``fatal``: the function asked the process to stop (sys.exit): the run saves and stops at once."""

    def __init__(self, name: str, message: str, fatal: bool = False):
        super().__init__(f"reward function {name!r}: {message}")
        self.name = name
        self.fatal = fatal


FP32_MAX = float(torch.finfo(torch.float32).max)


def put_cwd_on_path() -> None:
    """Reward modules beside the user import as under ``python -m``: the current directory comes first.

    The ``grpo-fast`` script's own directory is what Python puts on sys.path, not the current one."""
    cwd = os.getcwd()
    if not any(os.path.abspath(entry or os.curdir) == cwd for entry in sys.path):
        sys.path.insert(0, cwd)


def load_reward(spec: str) -> RewardFn:
    """Import ``'package.module:function'`` (a module in the current directory too)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"a reward must be given as 'module:function', got {spec!r}")
    put_cwd_on_path()
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r} ({err})") from err
    except SyntaxError as err:
        where = f"{err.filename}, line {err.lineno}" if err.filename else module_name
        raise ValueError(
            f"reward {spec!r}: module {module_name!r} has a syntax error ({where}: {err.msg})"
        ) from err
    except Exception as err:  # anything its import runs: one line, not a traceback
        raise ValueError(
            f"reward {spec!r}: importing module {module_name!r} raised {type(err).__name__}: {err}"
        ) from err
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise TypeError(f"reward {spec!r} is a {type(fn).__name__}, not a function")
    return fn


def reward_name(fn: RewardFn) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def _to_float(name: str, i: int, value: Any) -> float:
    if value is None:
        return math.nan
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RewardError(name, f"reward {i} is {value!r} ({type(value).__name__}), not a number or None")
    value = float(value)
    if math.isinf(value) or abs(value) > FP32_MAX:  # 1e39 is finite here but inf in fp32
        raise RewardError(
            name,
            f"reward {i} is {value}; rewards must be finite in fp32, |r| <= {FP32_MAX:.3g} "
            "(None or NaN: not applicable)",
        )
    return value


def score(
    funcs: Sequence[RewardFn],
    prompts: list[Any],
    completions: list[str],
    columns: dict[str, list[Any]],
    **extra: Any,
) -> torch.Tensor:
    """Rewards ``[N, len(funcs)]`` fp32, NaN where a function does not apply; raises RewardError."""
    n = len(completions)
    out = torch.empty(n, len(funcs), dtype=torch.float32)
    for j, fn in enumerate(funcs):
        name = reward_name(fn)
        try:
            values = fn(prompts=prompts, completions=completions, **columns, **extra)
        except Exception as err:
            raise RewardError(name, f"raised {type(err).__name__}: {err}") from err
        except SystemExit as err:  # the function wants the run to stop: it stops, after saving
            raise RewardError(name, f"called sys.exit({err.code!r})", fatal=True) from err
        if isinstance(values, torch.Tensor):
            values = values.reshape(-1).tolist()
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise RewardError(name, f"returned {type(values).__name__}; expected a list of {n} floats")
        if len(values) != n:
            raise RewardError(
                name, f"returned {len(values)} rewards for {n} completions (one per completion)"
            )
        out[:, j] = torch.tensor([_to_float(name, i, v) for i, v in enumerate(values)], dtype=torch.float32)
    return out


def weighted_sum(rewards: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """TRL's logged reward: NaN-skipping weighted sum, NaN where no function applies."""
    total = (rewards * weights.unsqueeze(0)).nansum(dim=1)
    total[torch.isnan(rewards).all(dim=1)] = math.nan
    return total
