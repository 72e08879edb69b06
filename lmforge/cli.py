"""`lmforge <command> ...`: each command lives in its own module, which exposes
`register(subparsers)` (adds its parser and sets `func`) so this file stays a dispatcher.

A user mistake raises UserError anywhere below; here it becomes one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lmforge.errors import Interrupted, UserError

# Modules that define a command; each has register(subparsers).
COMMAND_MODULES = [
    "lmforge.commands.data",
    "lmforge.commands.convert",
    "lmforge.commands.generate",
    "lmforge.commands.train",
    "lmforge.commands.distill",
    "lmforge.commands.grow",
    "lmforge.commands.fuse",
    "lmforge.commands.tie",
    "lmforge.commands.shrink",
    "lmforge.commands.demo",
    "lmforge.commands.finetune",
    "lmforge.commands.sft",
    "lmforge.commands.multitask",
    "lmforge.commands.eval",
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors already exit 2; keep them one line
        self.exit(2, f"lmforge: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lmforge", description="Train language models for less compute by reusing trained ones.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "accepts_overrides", False):
        args.overrides = extra  # --section.key=value, checked by the recipe loader
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        code = args.func(args) or 0
    except UserError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        code = 2
    except Interrupted as e:  # the run saved a checkpoint first
        print(f"lmforge: {e}", file=sys.stderr)
        code = 128 + e.signum
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        code = 130
    from lmforge.train import parallel

    parallel.exit_after_process_group(code)  # returns only in a process that never joined a process group
    return code


if __name__ == "__main__":
    sys.exit(main())
