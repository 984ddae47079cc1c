"""The ``grpo-fast`` command line: one sub-command per module, imported only when it runs."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module with add_arguments(parser) and run(args) -> int; help text first.
COMMANDS = {
    "bench": ("grpo_fast.commands.bench", "time and measure memory of the GRPO loss implementations"),
    "check": ("grpo_fast.commands.check", "check every available backend against the reference"),
    "train": ("grpo_fast.trainer.cli", "train a causal LM with GRPO (the built-in demo by default)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grpo-fast", description="Fused GRPO loss: benchmarks, checks, training."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and module_name.startswith(err.name):
                continue  # sub-command not shipped in this build
            raise
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
        sub.choices[name].set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
