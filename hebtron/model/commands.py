"""``hebtron model info``: what a configuration or checkpoint builds, layer by layer."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser("model", help="inspect model configurations and checkpoints")
    model_sub = model.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True)
    info = model_sub.add_parser("info", help="layer pattern and parameter count of a config.json or HF directory")
    info.add_argument("path", type=Path, help="config.json or a directory holding one")
    info.set_defaults(func=_info)


def _info(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from hebtron.model.config import HybridConfig, describe

    path: Path = args.path / "config.json" if args.path.is_dir() else args.path
    config = HybridConfig.from_json_file(path)
    counts = Counter(config.layer_types)
    table = Table(title=describe(config))
    table.add_column("layer type")
    table.add_column("count", justify="right")
    for kind in ("mamba", "attention", "mlp", "moe"):
        table.add_row(kind, str(counts.get(kind, 0)))
    Console().print(table)
    return 0
