"""``grpo-fast train``: a YAML config and/or one flag per TrainConfig option; no arguments runs the demo."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

from .config import CHOICES, TrainConfig, allowed_types, field_types, option_flag, read_yaml

METAVARS = {int: "N", float: "X", str: "STR"}

EPILOG = """examples:
  grpo-fast train                                   # the built-in demo, writes runs/demo/
  grpo-fast train --config configs/demo.yaml --max-steps 100
  grpo-fast train --model ./my-model --dataset prompts.jsonl --reward my_rewards:accuracy \\
                  --learning-rate 1e-6 --output-dir runs/mine
  grpo-fast train --output-dir runs/mine --resume   # continue from the latest checkpoint
  torchrun --nproc-per-node 8 -m grpo_fast.cli train --config my.yaml   # data parallel (DDP)
  torchrun --nproc-per-node 8 -m grpo_fast.cli train --config my.yaml --parallelism fsdp  # sharded

Flags override the YAML file. --resume continues with the run's saved options (OUTPUT_DIR/train_config.yaml):
a flag given again may only change what keeps it the same run (--max-steps, logging, saving, device), and
each change is named. --reward modules are imported from the current directory too. A reward function
that fails skips its step; after --max-reward-failures failures in a row the run saves a checkpoint and
stops (exit code 1). Ctrl-C saves a checkpoint and exits (130); a second Ctrl-C stops at once.
More: docs/trainer.md."""


def _optional(kind: type):
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, list):
        return " ".join(map(str, value)) or "none"
    return str(value)


def default_note(help_text: str, used: Any, base: Any) -> str:
    """What a bare run uses, in the help: the demo's value where it differs from another model's."""
    if used != base:
        return f" (default: {_shown(used)}; with a --model other than demo: {_shown(base)})"
    if "default" in help_text or base in (None, []):
        return ""
    return f" (default: {_shown(base)})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    bare = TrainConfig.from_dict({}, source="defaults")  # what `grpo-fast train` alone runs
    parser.add_argument("--config", metavar="YAML", help="options as a YAML mapping (see configs/)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue from the latest checkpoint in --output-dir, or from CHECKPOINT",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in an --output-dir that holds one (its checkpoints and metrics are replaced)",
    )
    group = parser.add_argument_group("training options (each also a YAML key)")
    types = field_types()
    for f in dataclasses.fields(TrainConfig):
        flag = option_flag(f.name)
        scalars, elem = allowed_types(types[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata["help"]
        help_text += default_note(help_text, getattr(bare, f.name), default)
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if list in scalars:
            kind = elem
            kw.update(nargs="+", type=elem) if f.name != "rewards" else kw.update(action="append")
        elif bool in scalars:
            kind = bool
            kw.update(action=argparse.BooleanOptionalAction)
        else:
            kind = next(t for t in scalars if t is not type(None))
            kw["type"] = _optional(kind) if type(None) in scalars else kind
        if f.name in CHOICES:
            kw["choices"] = CHOICES[f.name]
        elif kind is not bool:
            kw["metavar"] = "MODULE:FUNCTION" if f.name == "rewards" else METAVARS[kind]
        group.add_argument(flag, **kw)


def given_options(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """The options set explicitly (the YAML file's, then the flags over them) and where they come from."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    if args.config:
        return {**read_yaml(args.config), **overrides}, args.config
    return overrides, "command line"


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values, source = given_options(args)
    return TrainConfig.from_dict(values, source=source)


def resolve(args: argparse.Namespace) -> tuple[TrainConfig, list[str]]:
    """The run's config, and one line per option a --resume changes (the saved run's options otherwise)."""
    if not args.resume:
        return config_from_args(args), []
    from .resume import resume_config

    return resume_config(args.resume, *given_options(args))


def run(args: argparse.Namespace) -> int:
    """Under torchrun, each process joins the process group here and leaves it on the way out."""
    from .distributed import ProcessGroupFromEnv

    try:
        cfg, changes = resolve(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"grpo-fast train: error: {err}", file=sys.stderr)
        return 2
    try:
        with ProcessGroupFromEnv(cfg.device):
            return _run(args, cfg, changes)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the run's own handler is in place
        if os.environ.get("RANK", "0") == "0":
            print(stopped_by_ctrl_c(cfg.output_dir), file=sys.stderr, flush=True)
        return 130


def stopped_by_ctrl_c(run_dir: str) -> str:
    from .checkpoint import latest_checkpoint

    last = latest_checkpoint(run_dir)
    kept = f"the latest checkpoint is {last} (continue with --resume)" if last else "no checkpoint is saved"
    return f"grpo-fast train: stopped by Ctrl-C; {kept}"


def _run(args: argparse.Namespace, cfg: TrainConfig, changes: list[str]) -> int:
    import torch.distributed as dist

    from .checkpoint import DamagedCheckpoint, DiskFull
    from .loop import RunExists, Trainer
    from .reporting import read_metrics
    from .rewards import RewardError

    main = not dist.is_initialized() or dist.get_rank() == 0
    say = print if main else (lambda *a, **k: None)
    for change in changes:
        say(f"grpo-fast train: {change}", flush=True)
    try:  # bad options, model, dataset or rewards: one clear line, no traceback
        say(
            f"grpo-fast train: model {cfg.model}, dataset {cfg.dataset}, rewards {', '.join(cfg.rewards)}, "
            f"{cfg.max_steps} steps of {cfg.prompts_per_step}x{cfg.num_generations} completions, "
            f"loss {cfg.loss_type}, output {cfg.output_dir}",
            flush=True,
        )
        trainer = Trainer(cfg)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"grpo-fast train: error: {err}", file=sys.stderr)
        return 2
    try:
        result = trainer.train(resume=args.resume, overwrite=args.overwrite)
    except (RunExists, DamagedCheckpoint) as err:
        print(f"grpo-fast train: error: {err}", file=sys.stderr)
        return 2
    except DiskFull as err:
        print(f"grpo-fast train: stopped: {err}", file=sys.stderr)
        return 1
    except RewardError as err:
        print(f"grpo-fast train: stopped: {err}", file=sys.stderr)
        return 2 if err.fatal else 1
    except FileNotFoundError as err:  # --resume of a missing or incomplete checkpoint
        print(f"grpo-fast train: error: {err}", file=sys.stderr)
        return 2
    rows = read_metrics(result.metrics_path) if main else []
    if rows:
        window = min(20, len(rows))
        first = sum(r["reward_mean"] for r in rows[:window]) / window
        last = sum(r["reward_mean"] for r in rows[-window:]) / window
        say(f"mean reward: first {window} steps {first:.3f}, last {window} steps {last:.3f}")
    say(f"metrics: {result.metrics_path}" + (f"\nplot: {result.plot_path}" if result.plot_path else ""))
    if result.checkpoint:
        say(f"checkpoint: {result.checkpoint}")
    if result.interrupted:
        say(f"interrupted at step {result.steps}; continue with --resume")
        return 130
    return 0
