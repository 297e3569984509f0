"""``hebtron train``, ``hebtron export`` and ``hebtron report``."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="continued pretraining from a recipe")
    train.add_argument("recipe", type=Path, help="recipe YAML")
    train.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")
    train.add_argument(
        "--resume", default="none", metavar="auto|none|CKPT",
        help="auto: continue from the run's latest checkpoint if any; or a checkpoint directory",
    )
    train.set_defaults(func=_train)

    export = sub.add_parser("export", help="write a checkpoint as a Hugging Face NemotronH directory")
    export.add_argument("checkpoint", type=Path, help="a checkpoint (step_N) or a checkpoints directory (uses latest)")
    export.add_argument("--hf", type=Path, required=True, metavar="OUT", help="output directory")
    export.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="cast weights on export")
    export.set_defaults(func=_export)

    report = sub.add_parser("report", help="PNG plots of a run's metrics")
    report.add_argument("run_dir", type=Path)
    report.set_defaults(func=_report)


def _train(args: argparse.Namespace) -> int:
    from hebtron.recipe import load_recipe
    from hebtron.train.guards import TrainingAborted
    from hebtron.train.loop import Trainer

    recipe = load_recipe(args.recipe, args.overrides)
    trainer = Trainer(recipe, resume=args.resume)
    try:
        result = trainer.run()
    except TrainingAborted as err:
        print(f"aborted: {err}", flush=True)
        return TrainingAborted.exit_code
    finally:
        trainer.close()
    if trainer.backend.is_main:
        print(
            f"done: {result.steps} steps, {result.tokens:,} tokens in {result.wall_s:.1f} s "
            f"({result.tokens_per_s:,.0f} tokens/s); checkpoint {result.final_checkpoint}"
        )
    return 0


def _export(args: argparse.Namespace) -> int:
    from hebtron.train.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.hf, args.dtype)
    print(f"exported {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from hebtron.errors import UserError
    from hebtron.train.report import write_report

    if not (args.run_dir / "metrics.jsonl").is_file():
        raise UserError(f"{args.run_dir}: no metrics.jsonl (is this a run directory?)")
    for path in write_report(args.run_dir):
        print(path)
    return 0
