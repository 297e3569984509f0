"""The ``hebtron`` command line.

Each command group lives in its own module that exposes ``register(subparsers)``; the
module adds its parser(s) and sets ``func`` (called with the parsed args, returns an exit
code). Heavy imports (torch, transformers) happen inside the handlers, so ``--help`` is fast.
User mistakes raise :class:`hebtron.errors.UserError` and become one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import sys

from hebtron.errors import UserError

# Modules that contribute subcommands; each has register(subparsers). Order matters where a
# module adds to a group another one made: hebtron.demo.commands adds `data demo`.
COMMAND_MODULES: list[str] = [
    "hebtron.model.commands",
    "hebtron.recipe.commands",
    "hebtron.data.commands",
    "hebtron.demo.commands",
    "hebtron.train.commands",
    "hebtron.train.plan_commands",
    "hebtron.eval.commands",
    "hebtron.arena.commands",
    "hebtron.launch.commands",
    "hebtron.monitor.commands",
    "hebtron.backends.commands",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hebtron", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


def run() -> None:
    """The process entry point (``hebtron``, ``python -m hebtron.cli``): :func:`main`, then exit.

    The heap is frozen first: the interpreter's collections at exit would otherwise walk every
    object the imports made (about a second with torch and megatron-core, per rank, per run)."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
