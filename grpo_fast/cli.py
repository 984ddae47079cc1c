"""The ``grpo-fast`` command line: one sub-command per module, imported only when it runs."""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from typing import NoReturn

# name -> module with add_arguments(parser) and run(args) -> int; help text first.
COMMANDS = {
    "bench": ("grpo_fast.commands.bench", "time and measure memory of the GRPO loss implementations"),
    "check": ("grpo_fast.commands.check", "check every available backend against the reference"),
    "train": ("grpo_fast.trainer.cli", "train a causal LM with GRPO (the built-in demo by default)"),
}


class CommandParser(argparse.ArgumentParser):
    """A sub-command's parser: a bad argument is one line naming it (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grpo-fast", description="Fused GRPO loss: benchmarks, checks, training."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and module_name.startswith(err.name):
                continue  # sub-command not shipped in this build
            raise
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
        sub.choices[name].set_defaults(_run=module.run, _parser=sub.choices[name])
    return parser


def unrecognized(extras: list[str], parser: argparse.ArgumentParser) -> str:
    """The error for arguments ``parser`` does not know, with the closest option to each mistyped flag."""
    known = [flag for action in parser._actions for flag in action.option_strings if flag.startswith("--")]
    guesses = [
        close[0]
        for arg in extras
        if arg.startswith("-") and (close := difflib.get_close_matches(arg.split("=")[0], known, n=1))
    ]
    hint = f"; did you mean {' or '.join(map(repr, guesses))}?" if guesses else ""
    return f"unrecognized arguments: {' '.join(extras)}{hint}"


def main(argv: list[str] | None = None) -> int:
    args, extras = build_parser().parse_known_args(argv)
    if extras:  # the sub-command names them, not the top-level usage
        args._parser.error(unrecognized(extras, args._parser))
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
