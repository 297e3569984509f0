"""The ``hebtron`` command line.

Each command group lives in its own module that exposes ``register(subparsers)``; the
module adds its parser(s) and sets ``func`` (called with the parsed args, returns an exit
code). Heavy imports (torch, transformers) happen inside the handlers, so ``--help`` is fast.
User mistakes raise :class:`hebtron.errors.UserError` and become one line on stderr, exit 2
(a disk that refuses a write: exit 74); any other exception is one line too, with a hint to
rerun with ``--debug`` for its traceback, exit 1.
"""

from __future__ import annotations

import argparse
import errno
import gc
import importlib
import signal
import sys

from hebtron.errors import StorageError, UserError

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


# Options of every command, accepted anywhere on the command line (before or after the command).
DEBUG_FLAG = "--debug"
TRUST_FLAG = "--trust-checkpoint"
REMOTE_CODE_FLAG = "--trust-remote-code"
GLOBAL_FLAGS = (DEBUG_FLAG, TRUST_FLAG, REMOTE_CODE_FLAG)
# errnos of a disk that refuses a write: exit 74 (hebtron.errors.StorageError), not 2
DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EIO, errno.EFBIG}
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hebtron", description=__doc__.splitlines()[0])
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help="let an unexpected error end in its Python traceback instead of one line")
    parser.add_argument(TRUST_FLAG, action="store_true",
                        help="read distributed-checkpoint metadata (a pickle) that no hebtron manifest vouches for; "
                             "only for checkpoints from a source you trust (still through an allow-list)")
    parser.add_argument(REMOTE_CODE_FLAG, action="store_true",
                        help="let tokenizer and model directories run their own Python code (an auto_map in their "
                             "config), as transformers' trust_remote_code=True; no recipe or suite file can ask for it")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _global_flags(argv: list[str]) -> tuple[list[str], dict[str, bool]]:
    """``argv`` without the options of every command (taken from any position), and which were given."""
    return [a for a in argv if a not in GLOBAL_FLAGS], {flag: flag in argv for flag in GLOBAL_FLAGS}


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:2000] or type(err).__name__


def main(argv: list[str] | None = None, *, held_signal_mask: set[int] | None = None) -> int:
    """Run one command; its exit code. ``held_signal_mask``: the signal mask from before
    :func:`run` blocked the stop signals; commands that do not hold them get it back."""
    rest, flags = _global_flags(list(sys.argv[1:] if argv is None else argv))
    if not (flags[TRUST_FLAG] or flags[REMOTE_CODE_FLAG]):
        return _main(rest, flags[DEBUG_FLAG], held_signal_mask)
    from hebtron.data.tokenizer import allow_remote_code
    from hebtron.train.dcp_safe import trust_unvouched_metadata

    trust_unvouched_metadata(flags[TRUST_FLAG])
    allow_remote_code(flags[REMOTE_CODE_FLAG])
    try:
        return _main(rest, flags[DEBUG_FLAG], held_signal_mask)
    finally:  # in-process callers (tests) run the next command untrusted again
        trust_unvouched_metadata(False)
        allow_remote_code(False)


def _main(rest: list[str], debug: bool, held_signal_mask: set[int] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(rest)
    if held_signal_mask is not None and not getattr(args, "holds_stop_signals", False):
        signal.pthread_sigmask(signal.SIG_SETMASK, held_signal_mask)  # a pending stop acts as always
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = args.func(args)
    except UserError as err:
        print(f"error: {_first_line(err)}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # a path the command was given (or derived) that the system refused
        if debug:
            raise
        where = f"{err.filename}: " if err.filename else ""
        reason = err.strerror or _first_line(err)
        print(f"error: {where}{reason}", file=sys.stderr)
        return StorageError.exit_code if err.errno in DISK_ERRNOS else UserError.exit_code
    except Exception as err:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if debug:
            raise
        print(f"error: unexpected {type(err).__name__}: {_first_line(err)}; rerun with {DEBUG_FLAG} for the "
              "traceback (and report it: hebtron should have said what was wrong)", file=sys.stderr)
        return 1
    return int(code or 0)


def _hold_stop_signals() -> set[int] | None:
    """Block SIGUSR1/SIGTERM at once, before the command modules are imported: a stop signal that
    lands while the process starts stays pending, and ``hebtron train`` honours it (exit 75)
    instead of dying of it. Returns the previous mask."""
    if not hasattr(signal, "pthread_sigmask"):
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def run() -> None:
    """The process entry point (``hebtron``, ``python -m hebtron.cli``): :func:`main`, then exit.

    The heap is frozen first: the interpreter's collections at exit would otherwise walk every
    object the imports made (about a second with torch and megatron-core, per rank, per run)."""
    held = _hold_stop_signals()
    code = main(held_signal_mask=held)
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
