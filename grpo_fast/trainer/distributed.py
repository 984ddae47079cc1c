"""Data-parallel training on ``torch.distributed``: who generates which completions, and the collectives.

Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR`` in the environment) the
trainer joins the process group (NCCL on CUDA, gloo on the CPU). Every rank draws the same prompts;
the step's ``N = prompts_per_step * num_generations`` completions (prompt-major, G in a row) are
split first into the ``gradient_accumulation_steps`` micro-batches a single process would use, and
each micro-batch into ``world_size`` contiguous pieces: rank r generates piece r of every micro-batch.
A prompt's G completions may so live on several ranks; rewards are all-gathered and advantages
normalised over whole groups. Each rank's loss is rescaled so that the sum over ranks is the
single-process loss of that micro-batch, times ``world_size`` because DDP averages gradients: the
update equals the single-process update on the same global batch.

Sequence parallelism (``sequence_parallel_size`` P > 1) groups P consecutive ranks: the data-parallel
layout above runs over the ``world_size / P`` groups (a group's rows are shared by its P ranks), and
:meth:`Layout.refine` splits each group's piece of a micro-batch again into P pieces, the rows each of
its ranks samples and scores before the group exchanges them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")


def launched_by_torchrun() -> bool:
    return all(v in os.environ for v in ENV_VARS)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env(device: str = "auto") -> bool:
    """Join the process group torchrun describes in the environment; False when not under torchrun.

    ``device`` is the trainer's option: NCCL when it resolves to CUDA, gloo otherwise. Does nothing
    (and returns False) when torch.distributed is already initialised by the caller.
    """
    if not launched_by_torchrun() or not dist.is_available() or dist.is_initialized():
        return False
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return True


def rank_device(device: torch.device) -> torch.device:
    """Several processes on one machine: ``cuda`` means this process's GPU, ``cuda:LOCAL_RANK``."""
    if device.type == "cuda" and device.index is None and dist.is_available() and dist.is_initialized():
        return torch.device("cuda", local_rank())
    return device


def step_seed(seed: int, step: int, rank: int) -> int:
    """Sampling seed of a step on a rank: deterministic, and independent of where a run resumed."""
    return ((seed * 1_000_003 + step) * 1_009 + rank) % 2**63


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class ProcessGroupFromEnv:
    """``with ProcessGroupFromEnv(device):`` init from torchrun's environment, destroy at exit."""

    def __init__(self, device: str = "auto"):
        self.device = device
        self.owned = False

    def __enter__(self) -> ProcessGroupFromEnv:
        self.owned = init_from_env(self.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.owned:
            destroy()


@dataclass(frozen=True)
class Layout:
    """Which of the step's N completions this rank handles, and how they form micro-batches.

    ``micro[j]`` holds global row ids of micro-batch j (as one process would form it);
    ``pieces[j][r]`` the rows of it that rank r handles; ``local`` this rank's rows in order.
    """

    micro: tuple[Tensor, ...]
    pieces: tuple[tuple[Tensor, ...], ...]
    rank: int

    @classmethod
    def build(cls, n: int, accumulation: int, world: int, rank: int) -> Layout:
        micro = torch.arange(n).tensor_split(min(accumulation, n))
        if world > 1 and min(len(m) for m in micro) < world:
            raise ValueError(
                f"{n} completions per step (prompts_per_step * num_generations) cannot be shared by "
                f"{world} processes in {len(micro)} micro-batches (gradient_accumulation_steps): every "
                f"micro-batch needs at least one completion per process. Raise prompts_per_step or lower "
                "gradient_accumulation_steps."
            )
        pieces = tuple(m.tensor_split(world) for m in micro)
        return cls(micro, pieces, rank)

    @property
    def world(self) -> int:
        return len(self.pieces[0])

    @property
    def local(self) -> Tensor:
        return torch.cat([p[self.rank] for p in self.pieces])

    def local_micro(self) -> list[Tensor]:
        """Positions in this rank's rows of each of its micro-batches."""
        sizes = [len(p[self.rank]) for p in self.pieces]
        return list(torch.arange(sum(sizes)).split(sizes))

    def counts(self) -> list[int]:
        """Rows per rank."""
        return [sum(len(p[r]) for p in self.pieces) for r in range(self.world)]

    def rank_rows(self, rank: int) -> Tensor:
        return torch.cat([p[rank] for p in self.pieces])

    def refine(self, parts: int, part: int) -> Layout:
        """Each rank's piece of every micro-batch split again into ``parts`` contiguous pieces: the layout
        over ``world * parts`` ranks in which this one is piece ``part`` of its piece."""
        if parts == 1:
            return self
        if min(len(p) for pieces in self.pieces for p in pieces) < parts:
            raise ValueError(
                f"a micro-batch gives some group of {parts} sequence-parallel processes fewer than {parts} "
                "completions to sample: every process samples at least one. Raise prompts_per_step or "
                "lower gradient_accumulation_steps."
            )
        pieces = tuple(tuple(q for p in ps for q in p.tensor_split(parts)) for ps in self.pieces)
        return Layout(self.micro, pieces, self.rank * parts + part)


def sequence_groups(size: int) -> Any:
    """The process group of this rank's ``size`` consecutive ranks (``size`` divides the world size):
    ``dist.new_group`` runs on every rank for every group, in the same order, as it requires."""
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = None
    for first in range(0, world, size):
        group = dist.new_group(list(range(first, first + size)))
        if first <= rank < first + size:
            mine = group
    return mine


class Group:
    """The trainer's view of a process group (the default one unless ``process_group``); every method is
    a no-op for a single process."""

    def __init__(self, device: torch.device, process_group: Any = None):
        self.pg = process_group
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size(self.pg) > 1
        self.world = dist.get_world_size(self.pg) if self.active else 1
        self.rank = dist.get_rank(self.pg) if self.active else 0
        # NCCL talks through CUDA tensors, gloo through CPU ones.
        self.device = device if self.active and dist.get_backend() == "nccl" else torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            dist.barrier(group=self.pg)

    def sum(self, values: Tensor) -> Tensor:
        """All-reduced sum of a float64 vector (returned on the CPU)."""
        if not self.active:
            return values
        x = values.to(self.device, torch.float64)
        dist.all_reduce(x, group=self.pg)
        return x.cpu()

    def max(self, values: Tensor) -> Tensor:
        if not self.active:
            return values
        x = values.to(self.device, torch.float64)
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.pg)
        return x.cpu()

    def any(self, flag: bool) -> bool:
        if not self.active:
            return flag
        return bool(self.max(torch.tensor([float(flag)]))[0])

    def gather_rows(self, x: Tensor, layout: Layout) -> Tensor:
        """Every rank's rows of ``x`` (this rank's ``layout.local`` rows) in global row order."""
        if not self.active:
            return x
        counts = layout.counts()
        out = x.new_empty((sum(counts), *x.shape[1:]))
        for r, part in enumerate(self.gather_parts(x, counts)):
            out[layout.rank_rows(r)] = part
        return out

    def gather_parts(self, x: Tensor, counts: list[int]) -> list[Tensor]:
        """Every rank's ``x`` (rank r's has ``counts[r]`` rows; the other dimensions agree), on x's device."""
        padded = x.new_zeros((max(counts), *x.shape[1:])).to(self.device)
        padded[: x.shape[0]] = x.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.pg)
        return [part[:n].to(x.device) for part, n in zip(parts, counts, strict=True)]

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, group_src=0, group=self.pg)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.pg)
        return out


__all__ = [
    "Group",
    "Layout",
    "ProcessGroupFromEnv",
    "destroy",
    "init_from_env",
    "launched_by_torchrun",
    "sequence_groups",
]
