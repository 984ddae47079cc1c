"""Prompt datasets (a list, a JSONL file, a ``datasets`` dataset or hub id) and a resumable sampler."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import demo

Prompt = str | list[dict[str, str]]  # plain text or chat messages


class PromptDataset:
    """Rows with a prompt column, all checked up front: an error names the row and what is wrong with it.

    Errors count from 1: "line N" of a JSONL file (blank lines counted, as an editor shows them), "row N"
    of anything else. ``lines``: the file line of each row, when the rows come from a JSONL file."""

    def __init__(
        self,
        rows: Sequence[Any],
        *,
        prompt_column: str = "prompt",
        source: str = "dataset",
        lines: Sequence[int] | None = None,
    ):
        if len(rows) == 0:
            raise ValueError(f"{source} has no rows")
        self.rows = rows
        self.prompt_column = prompt_column
        self.source = source
        self.lines = lines
        if isinstance(rows, list):
            self.rows = [self._check_row(i, row) for i, row in enumerate(rows)]
        else:  # a datasets.Dataset: read the prompt column at once rather than row by row
            for i, prompt in enumerate(rows[prompt_column]):
                check_prompt(prompt, self.where(i))

    def where(self, index: int) -> str:
        """Where row ``index`` (0-based) is, as its error messages say it: ``"d.jsonl, line 3"``."""
        if self.lines is not None:
            return f"{self.source}, line {self.lines[index]}"
        return f"{self.source}, row {index + 1}"

    def _check_row(self, index: int, row: Any) -> dict[str, Any]:
        where = self.where(index)
        if isinstance(row, str):
            row = {self.prompt_column: row}
        if not isinstance(row, dict):
            raise ValueError(
                f"{where}: a row must be a mapping with a {self.prompt_column!r} field, "
                f"got {type(row).__name__}"
            )
        if self.prompt_column not in row:
            raise ValueError(
                f"{where} has no {self.prompt_column!r} field (it has: {', '.join(map(str, row))})"
            )
        check_prompt(row[self.prompt_column], where)
        return row

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]

    def prompts(self) -> list[Prompt]:
        return (
            [row[self.prompt_column] for row in self.rows]
            if isinstance(self.rows, list)
            else list(self.rows[self.prompt_column])
        )

    def prompt(self, row: dict[str, Any]) -> Prompt:
        return row[self.prompt_column]

    def columns(self, rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
        """Every column but the prompt, as lists: the keyword arguments of TRL-style reward functions."""
        # JSONL rows need not all have the same fields.
        keys = dict.fromkeys(k for row in rows for k in row if k != self.prompt_column)
        return {k: [row.get(k) for row in rows] for k in keys}


def check_prompt(prompt: object, where: str) -> None:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"{where}: the prompt is empty")
        return
    is_chat = (
        isinstance(prompt, list)
        and prompt
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt
        )
    )
    if not is_chat:
        raise ValueError(
            f"{where}: the prompt must be a non-empty string or a list of chat messages "
            f"{{'role': ..., 'content': ...}}, got {str(prompt)[:80]!r}"
        )


def read_rows(path: Path) -> tuple[list[Any], list[int] | None]:
    """Rows of a JSONL file (one object per line) with their line numbers, or of a .json file holding a
    list (line numbers None: its rows are counted instead)."""
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path} must hold a list of rows, got {type(rows).__name__}")
        return rows, None
    rows, lines = [], []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
                lines.append(line_no)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}, line {line_no} is not valid JSON: {err.msg} (column {err.colno})"
                ) from None
    return rows, lines


def load_prompts(
    source: object, *, prompt_column: str = "prompt", split: str = "train", seed: int = 0
) -> PromptDataset:
    """A PromptDataset from a list of rows/strings, a JSONL path, 'demo', a datasets.Dataset or a hub id."""
    if isinstance(source, PromptDataset):
        return source
    if source == demo.DEMO:
        return PromptDataset(demo.make_rows(seed=seed), prompt_column="prompt", source="the demo task")
    if isinstance(source, (list, tuple)):
        return PromptDataset(list(source), prompt_column=prompt_column, source="the prompt list")
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.suffix in (".jsonl", ".json") or path.exists():
            if not path.is_file():
                raise FileNotFoundError(f"dataset file {str(path)!r} does not exist")
            rows, lines = read_rows(path)
            return PromptDataset(rows, prompt_column=prompt_column, source=str(path), lines=lines)
        return _from_datasets(_load_hub(str(source), split), prompt_column, str(source))
    return _from_datasets(source, prompt_column, type(source).__name__)


def _load_hub(name: str, split: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as err:  # datasets raises many types; the message says which dataset failed
        raise ValueError(
            f"could not load dataset {name!r} (split {split!r}) as a JSONL file or a hub dataset: "
            f"{type(err).__name__}: {err}"
        ) from err


def _from_datasets(ds: Any, prompt_column: str, name: str) -> PromptDataset:
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        raise ValueError(f"{name} is a DatasetDict with splits {list(ds)}; pick one, e.g. ds['train']")
    if not isinstance(ds, datasets.Dataset):
        raise TypeError(f"dataset must be a list, a JSONL path, a hub id or a datasets.Dataset, got {name}")
    if prompt_column not in ds.column_names:
        raise ValueError(
            f"dataset {name} has no {prompt_column!r} column (columns: {', '.join(ds.column_names)})"
        )
    return PromptDataset(ds, prompt_column=prompt_column, source=f"dataset {name}")


class PromptSampler:
    """Batches of row indices, reshuffled each epoch from (seed, epoch): its position is two integers."""

    def __init__(self, num_rows: int, batch_size: int, seed: int):
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self.epoch, self.index = 0, 0
        self._cached: tuple[int, list[int]] = (-1, [])

    def _order(self, epoch: int) -> list[int]:
        if self._cached[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._cached = (epoch, torch.randperm(self.num_rows, generator=g).tolist())
        return self._cached[1]

    def next_batch(self) -> list[int]:
        batch: list[int] = []
        while len(batch) < self.batch_size:
            order = self._order(self.epoch)
            take = min(self.batch_size - len(batch), self.num_rows - self.index)
            batch += order[self.index : self.index + take]
            self.index += take
            if self.index == self.num_rows:
                self.epoch, self.index = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def repeat_each(items: Iterable[Any], times: int) -> list[Any]:
    """[a, b] -> [a, a, b, b]: G consecutive rows per prompt, the layout group_advantages expects."""
    return [x for x in items for _ in range(times)]
