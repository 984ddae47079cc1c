"""The Trainer: set-up, the step loop, checkpoints and --resume, Ctrl-C.

One *step* samples ``prompts_per_step * num_generations`` completions and makes ``num_iterations``
optimizer updates on them, each over ``gradient_accumulation_steps`` micro-batches. The layers:
:mod:`.rollout` builds the step's batch (sampling, rewards, advantages, old/reference log-probs),
:mod:`.update` makes the updates with ``gf.grpo_loss``, :mod:`.reporting` writes what the step shows.

Failure policy: a reward function that raises or returns bad output skips its step (no update,
a warning naming the function); after ``max_reward_failures`` such steps in a row the run saves
a checkpoint and stops with :class:`RewardError`, so ``--resume`` continues once it is fixed.

Under ``torchrun`` (or with torch.distributed initialised by the caller) the step's completions are
shared by the ranks and the model is wrapped in DDP or sharded with FSDP2 (``parallelism``); see
:mod:`grpo_fast.trainer.distributed` for how the update stays that of one process on the same global
batch, and :mod:`grpo_fast.trainer.sharding` for FSDP2.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import dataclasses
import random
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..integrations.hf import add_hidden_forward, head_transform, lm_head, unsupported_head
from ..integrations.packing import check_packable
from . import checkpoint as ckpt
from . import distributed, sequence, sharding
from .config import RESUME_FREE, TrainConfig
from .data import PromptDataset, PromptSampler, load_prompts
from .demo import DEMO
from .generation import context_length, encode_prompts, prompt_text
from .models import disable_dropout, enable_checkpointing, load_model_and_tokenizer, resolve_device
from .reporting import PLOT_FILE, MetricsLog, Progress, format_samples, plot_metrics, step_metrics
from .rewards import RewardError, RewardFn, load_reward, reward_name, weighted_sum
from .rollout import RolloutMixin
from .rundir import check_writable, write_settings
from .update import UpdateMixin, cosine_schedule, make_optimizer, make_scheduler


@dataclass
class TrainResult:
    steps: int  # steps completed in total (a resumed run counts the earlier ones)
    interrupted: bool
    checkpoint: Path | None
    metrics_path: Path
    plot_path: Path | None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed % 2**32)


class Trainer(RolloutMixin, UpdateMixin):
    """A thin GRPO trainer. Objects given here replace the config's ``model``/``dataset``/``rewards``."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        model: nn.Module | None = None,
        tokenizer: Any = None,
        dataset: Any = None,
        reward_funcs: Sequence[RewardFn] | None = None,
    ):
        self.cfg = cfg = config
        if distributed.init_from_env(cfg.device):  # torchrun, used as a library: the CLI destroys its own
            atexit.register(distributed.destroy)
        self.device = distributed.rank_device(resolve_device(cfg.device))
        self.group = distributed.Group(self.device)
        if cfg.num_threads is not None:
            torch.set_num_threads(cfg.num_threads)
        seed_everything(cfg.seed + self.group.rank)
        self.sp = self._sequence_group()
        # Cheap checks first: a typo in a reward name or an unwritable directory should not wait for a model.
        self._setup_rewards(reward_funcs)
        self.run_dir = Path(cfg.output_dir)
        if self.group.is_main:
            check_writable(self.run_dir)
        self._setup_model(model, tokenizer)
        self._setup_data(dataset)
        # Several processes: every micro-batch must give each of them a completion (fails now, not later).
        size = cfg.sequence_parallel_size
        distributed.Layout.build(
            cfg.prompts_per_step * cfg.num_generations,
            cfg.gradient_accumulation_steps,
            self.group.world // size,
            self.group.rank // size,
        ).refine(size, self.group.rank % size)
        # A scaled or soft-capped LM head (Gemma 2, Granite, ...): folded into the loss's temperature and
        # logit_softcap, so the loss and the old/ref log-probs see the model's own logits.
        loss_config = cfg.loss_config()
        temperature, cap = head_transform(self.model, cfg.temperature)
        cap = cap if cap is not None else loss_config.logit_softcap  # or --logit-softcap, given by hand
        self.loss_config = dataclasses.replace(loss_config, temperature=temperature, logit_softcap=cap)
        self.optimizer = make_optimizer(self.model, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg)
        self.bf16 = (
            cfg.bf16
            if cfg.bf16 is not None
            else (self.device.type == "cuda" and torch.cuda.is_bf16_supported())
        )
        self.metrics = MetricsLog(self.run_dir)
        self.step = 0
        self.last_samples: tuple[list, list, list] = ([], [], [])  # prompts, completions, rewards
        self._stop_requested = False
        self._warned: set[str] = set()

    # ----- set-up -------------------------------------------------------------------------------------
    def _sequence_group(self) -> distributed.Group | None:
        """The group of ``sequence_parallel_size`` consecutive ranks that shares this rank's rows."""
        size = self.cfg.sequence_parallel_size
        if size == 1:
            return None
        if self.group.world % size:
            raise ValueError(
                f"sequence_parallel_size {size} must divide the number of processes, {self.group.world} "
                "(launch with torchrun --nproc-per-node a multiple of it)"
            )
        return distributed.Group(self.device, distributed.sequence_groups(size))

    def _setup_rewards(self, reward_funcs: Sequence[RewardFn] | None) -> None:
        cfg = self.cfg
        self.reward_funcs = (
            list(reward_funcs) if reward_funcs is not None else [load_reward(s) for s in cfg.rewards]
        )
        if not self.reward_funcs:
            raise ValueError(
                "no reward function: pass --reward module:function (TRL's signature "
                "f(prompts, completions, **columns) -> list[float | None])"
            )
        weights = cfg.reward_weights or [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(weights)} values for {len(self.reward_funcs)} reward functions"
            )
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        self.reward_names = [reward_name(f) for f in self.reward_funcs]

    def _setup_model(self, model: nn.Module | None, tokenizer: Any) -> None:
        cfg = self.cfg
        if model is None:
            model, loaded_tokenizer = load_model_and_tokenizer(cfg.model, seed=cfg.seed)
            tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        if tokenizer is None:
            raise ValueError("a model object needs its tokenizer: Trainer(config, model=..., tokenizer=...)")
        if tokenizer.pad_token_id is None:
            raise ValueError(
                "the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos_token)"
            )
        reason = unsupported_head(model, scale_ok=True)
        if reason is not None:
            raise ValueError(f"grpo_fast cannot train this model: {reason}")
        if cfg.padding_free:
            check_packable(model)
        if self.sp is not None:
            sequence.check_model(model, self.sp.world)
        self.model, self.tokenizer = model.to(self.device).train(), tokenizer
        disable_dropout(self.model)
        if cfg.freeze_lm_head:
            lm_head(self.model)[0].requires_grad_(False)
        if cfg.gradient_checkpointing:
            enable_checkpointing(self.model)
        # The reference is the policy as it starts; built before any --resume loads later weights.
        self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False) if cfg.beta > 0 else None
        # Several processes: the loss's forward goes through DDP (its gradient hooks), asking for the
        # backbone's hidden states; generation and the no-grad log-probs use the bare model. FSDP2
        # shards policy and reference in place; every forward then goes through the model's own hooks.
        self.ddp: DistributedDataParallel | None = None
        self.sharded = self.group.active and cfg.parallelism == "fsdp"
        if self.sharded:
            for m in (self.model, self.ref_model):
                if m is not None:
                    add_hidden_forward(m)
                    sharding.shard(m, self.device)
        elif self.group.active:
            add_hidden_forward(self.model)
            self.ddp = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,
                # The LM head gets its gradient from grpo_loss, outside the module's forward graph.
                find_unused_parameters=False,
            )

    def _setup_data(self, dataset: Any) -> None:
        cfg = self.cfg
        source = dataset if dataset is not None else cfg.dataset
        if source is None:
            raise ValueError("no dataset: pass --dataset (a JSONL file or hub id), or use --model demo")
        self.data: PromptDataset = load_prompts(
            source, prompt_column=cfg.prompt_column, split=cfg.dataset_split, seed=cfg.seed
        )
        self._check_prompt_lengths()
        self.sampler = PromptSampler(len(self.data), cfg.prompts_per_step, cfg.seed)

    def _check_prompt_lengths(self, chunk: int = 512) -> None:
        """Every prompt must leave room for max_completion_length in the context: tell now, not mid-run."""
        prompts, context = self.data.prompts(), context_length(self.model)
        for start in range(0, len(prompts), chunk):
            texts = [prompt_text(self.tokenizer, p) for p in prompts[start : start + chunk]]
            encode_prompts(
                self.tokenizer,
                texts,
                [self.data.where(i) for i in range(start, start + len(texts))],
                context=context,
                max_completion_length=self.cfg.max_completion_length,
            )

    # ----- one step -----------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        """Sample, score, update; raises RewardError (before any update) if a reward function fails."""
        start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        batch = self.build_batch()
        stats = self.update(batch)
        row = step_metrics(
            self.step + 1,
            batch,
            stats,
            self.reward_weights,
            self.reward_names,
            self.group,
            self.device,
            start,
            lr=self.scheduler.get_last_lr()[0],
            copies=self.cfg.sequence_parallel_size,
        )
        totals = weighted_sum(batch.rewards, self.reward_weights)
        totals = totals[batch.layout.local] if self.group.active else totals
        self.last_samples = (batch.prompts, batch.out.completions, totals.tolist())
        return row

    # ----- the run ------------------------------------------------------------------------------------
    def save(self) -> Path:
        """Write a checkpoint: once, by rank 0 (under FSDP2 every rank first helps gather the whole state)."""
        self.group.barrier()
        path = self.run_dir / f"{ckpt.PREFIX}{self.step:06d}"
        gathered = ckpt.training_state(self.model, self.optimizer) if self.sharded else (None, None)
        if self.group.is_main:
            path = ckpt.save_checkpoint(
                self.run_dir,
                self.step,
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                tokenizer=self.tokenizer,
                keep=self.cfg.save_total_limit,
                weights=gathered[0],
                optimizer_state=gathered[1],
                # The data position counts prompts of the whole run: any world size can resume it.
                state={
                    "sampler": self.sampler.state_dict(),
                    "config": self.cfg.to_dict(),
                    "world_size": self.group.world,
                    "sequence_parallel_size": self.cfg.sequence_parallel_size,
                },
            )
        self.group.barrier()
        return path

    def resume(self, path: str | Path | None = None) -> Path | None:
        """Load ``path`` (or the run's latest checkpoint); None when there is nothing to resume.

        Several processes: rank 0 picks the checkpoint and every rank loads it (so the run directory
        must be on a filesystem that every node sees).
        """
        if path is not None:
            return self._load(Path(path))
        if self.group.active:  # rank 0 picks the newest intact checkpoint, every rank loads that one
            path = self.group.broadcast_object(self._newest_intact() if self.group.is_main else None)
            return None if path is None else self._load(Path(path), verified=True)
        # The newest checkpoint that loads; a damaged or unreadable one is named and passed over.
        for candidate in reversed(ckpt.checkpoints(self.run_dir)):
            try:
                return self._load(candidate)
            except ckpt.DamagedCheckpoint as err:
                warnings.warn(f"skipping damaged checkpoint {candidate}: {err}", stacklevel=2)
        return None

    def _newest_intact(self) -> Path | None:
        for candidate in reversed(ckpt.checkpoints(self.run_dir)):
            problem = ckpt.damage(candidate)
            if problem is None:
                return candidate
            warnings.warn(f"skipping damaged checkpoint {candidate}: {problem}", stacklevel=3)
        return None

    def _load(self, path: Path, verified: bool = False) -> Path:
        if self.group.active and not path.is_dir():
            raise FileNotFoundError(
                f"rank {self.group.rank} cannot see checkpoint {path}: with several nodes the output "
                "directory must be on a filesystem that all of them share"
            )
        state = ckpt.load_checkpoint(
            path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, verified=verified
        )
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        changed = {
            k: (v, getattr(self.cfg, k))
            for k, v in state.get("config", {}).items()
            if k not in RESUME_FREE | {"max_steps"} and hasattr(self.cfg, k) and getattr(self.cfg, k) != v
        }
        if changed and self.group.is_main:  # said once, not by every rank
            diffs = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            warnings.warn(f"resuming {path} with options that differ from its run: {diffs}", stacklevel=2)
        return path

    def train(self, resume: bool | str | Path = False, overwrite: bool = False) -> TrainResult:
        """Run to ``max_steps``; Ctrl-C finishes the current step, saves a checkpoint and returns.

        A new run in a directory that holds a previous one (checkpoints or metrics) raises
        :class:`RunExists` unless ``overwrite``: nothing of a run is deleted implicitly."""
        cfg, main = self.cfg, self.group.is_main
        if main:
            ckpt.clean_partial(self.run_dir)
        self.group.barrier()
        resumed = self.resume(None if resume is True else resume) if resume else None
        if resumed is None and not overwrite:
            self._refuse_to_replace_a_run(resume)
        if resume and resumed is None and main:
            print(f"no checkpoint in {self.run_dir} to resume from; starting a new run", flush=True)
        if resumed is not None and main:
            print(f"resuming from step {self.step} of {cfg.max_steps} ({resumed})", flush=True)
        self.group.barrier()  # every rank has read the checkpoint (or found none) before any is removed
        if main:
            if resumed is None:
                self._forget_old_run()
            write_settings(self.run_dir, cfg.to_dict())  # what a later --resume continues with
            self.metrics.start(resume_step=self.step if resumed else None)
        progress = Progress(cfg.max_steps, self.step, cfg.progress and main)
        last_saved: Path | None = resumed
        failures = 0
        try:
            with self._stop_on_sigint(progress):
                while self.step < cfg.max_steps and not self._stop_all_ranks():
                    try:
                        row = self.train_step()
                    except RewardError as err:
                        self.optimizer.zero_grad(set_to_none=True)
                        if err.fatal:
                            path = self.save()
                            raise RewardError(
                                err.name,
                                f"stopped the run; saved {path} first (--resume continues). {err}",
                                fatal=True,
                            ) from err
                        failures += 1
                        if main:
                            progress.write(
                                f"step {self.step + 1} skipped ({failures}/{cfg.max_reward_failures}): {err}"
                            )
                        if failures >= cfg.max_reward_failures:
                            path = self.save()
                            raise RewardError(
                                err.name,
                                f"failed {failures} steps in a row; stopped after saving "
                                f"{path} (fix it, then --resume). Last error: {err}",
                            ) from err
                        continue
                    failures = 0
                    self.step += 1
                    if main:
                        self.metrics.write(row)
                    progress.update(row)
                    every = cfg.print_completions_every
                    if every and self.step % every == 0 and main:
                        progress.write(
                            format_samples(self.step, *self.last_samples, cfg.num_completions_to_print)
                        )
                    if cfg.save_every and self.step % cfg.save_every == 0:
                        last_saved = self.save()
                if last_saved is None or last_saved.name != f"{ckpt.PREFIX}{self.step:06d}":
                    last_saved = self.save()
        finally:
            progress.close()
        plot = plot_metrics(self.metrics.path, self.run_dir / PLOT_FILE) if main else None
        return TrainResult(self.step, self._stop_requested, last_saved, self.metrics.path, plot)

    def _stop_all_ranks(self) -> bool:
        """Ctrl-C on any rank stops every rank after the same step."""
        if self.group.active:
            self._stop_requested = self.group.any(self._stop_requested)
        return self._stop_requested

    def _refuse_to_replace_a_run(self, resume: bool | str | Path) -> None:
        old = ckpt.checkpoints(self.run_dir)
        metrics = self.run_dir / "metrics.jsonl"
        logged = metrics.is_file() and metrics.stat().st_size > 0
        if old or logged:
            held = ", ".join(
                ([f"{len(old)} checkpoint(s)"] if old else []) + (["metrics.jsonl"] if logged else [])
            )
            how = "" if resume else "pass --resume to continue it, or "
            raise RunExists(
                f"{self.run_dir} holds a previous run ({held}) that this one would replace: "
                f"{how}--overwrite to replace it, or choose another --output-dir"
            )

    def _forget_old_run(self) -> None:
        """A new run in a used directory: its old checkpoints would otherwise be what --resume finds."""
        old = ckpt.checkpoints(self.run_dir)
        if old:
            print(
                f"new run in {self.run_dir}: removing {len(old)} checkpoint(s) of the previous run "
                "(pass --resume to continue it instead)",
                flush=True,
            )
            for path in old:
                shutil.rmtree(path)

    @contextlib.contextmanager
    def _stop_on_sigint(self, progress: Progress) -> Iterator[None]:
        """First Ctrl-C: stop after this step and save. Second: stop now, without saving."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            if self.group.is_main:
                progress.write(
                    "Ctrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to quit now)"
                )

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


class RunExists(ValueError):
    """The output directory holds a run that a new one would replace (see ``overwrite``)."""


def train(
    config: TrainConfig, resume: bool | str | Path = False, overwrite: bool = False, **objects: Any
) -> TrainResult:
    """``Trainer(config, **objects).train(resume, overwrite)``."""
    return Trainer(config, **objects).train(resume, overwrite)


__all__ = ["DEMO", "TrainResult", "Trainer", "cosine_schedule", "train"]
