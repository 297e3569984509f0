"""``hebtron train``, ``hebtron sft``, ``hebtron export`` and ``hebtron report``."""

from __future__ import annotations

import argparse
import contextlib
import gc
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hebtron.train.stop_signals import StopSignals


def register(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="continued pretraining from a recipe")
    train.add_argument("recipe", type=Path, help="recipe YAML")
    train.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")
    train.add_argument(
        "--resume", default="none", metavar="auto|none|CKPT",
        help="auto: continue from the run's latest checkpoint if any; or a checkpoint directory",
    )
    train.set_defaults(func=_train, holds_stop_signals=True)

    sft = sub.add_parser("sft", help="supervised fine-tuning on packed chat data (a recipe with an sft section)")
    sft.add_argument("recipe", type=Path, help="recipe YAML with an sft: section")
    sft.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")
    sft.add_argument(
        "--resume", default="none", metavar="auto|none|CKPT",
        help="auto: continue from the run's latest checkpoint if any; or a checkpoint directory",
    )
    sft.set_defaults(func=_train, sft=True, holds_stop_signals=True)

    export = sub.add_parser("export", help="write a checkpoint as a Hugging Face NemotronH directory")
    export.add_argument("checkpoint", type=Path,
                        help="a checkpoint (step_N, native or Megatron) or a checkpoints directory (uses latest)")
    export.add_argument("--hf", type=Path, required=True, metavar="OUT", help="output directory")
    export.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="cast weights on export")
    export.set_defaults(func=_export)

    report = sub.add_parser("report", help="PNG plots of a run's metrics")
    report.add_argument("run_dir", type=Path)
    report.set_defaults(func=_report)


# Exit codes of `hebtron train` / `sft` beyond 0 (done), 1 (unexpected failure) and 2 (bad input):
# 75 EX_TEMPFAIL: stopped on SIGUSR1/SIGTERM, its checkpoint saved (or none due); run again with
#    --resume auto. The Slurm job script (slurm/train.sbatch.j2) requeues the job on it.
# 74 EX_IOERR (hebtron.errors.StorageError): a checkpoint save the disk refused (full, read-only);
#    nothing complete was lost; free space, then --resume auto. Not requeued.
# 3 (hebtron.train.guards.TrainingAborted): aborted on purpose (NaN limit, early kill); do not resume.
STOPPED_EXIT_CODE = 75


def _train(args: argparse.Namespace) -> int:
    """Train with SIGUSR1/SIGTERM held for the whole command: blocked from before torch is
    imported (a Slurm signal that lands while importing must not lose the job's exit code), taken
    at step boundaries, and inherited blocked by every helper process, which therefore lives
    through the signal whose checkpoint it helps write (:mod:`hebtron.train.stop_signals`)."""
    from hebtron.train.stop_signals import StopSignals

    stops = StopSignals().hold()
    try:
        return _run_training(args, stops)
    finally:
        stops.release(keep_handlers=True)  # exiting: a late stop signal is noted, never fatal


def _run_training(args: argparse.Namespace, stops: StopSignals) -> int:
    from hebtron.recipe import load_recipe
    from hebtron.train.guards import TrainingAborted
    from hebtron.backends.engines import make_trainer

    recipe = load_recipe(args.recipe, args.overrides)
    if getattr(args, "sft", False) and recipe.sft is None:
        from hebtron.errors import UserError

        raise UserError(f"{args.recipe}: sft: missing; an SFT recipe needs an sft: section (sft: {{}} for defaults)")
    if (early := stops.take()) is not None:
        print(f"signal {early} before training started: stopping (nothing new to save)", flush=True)
        return STOPPED_EXIT_CODE
    with _collector_paused():
        trainer = make_trainer(recipe, resume=args.resume)
    if trainer.ops.is_main and recipe.sft is not None:
        for line in trainer.packing_report():
            print(line, flush=True)
    if (early := stops.take()) is not None:
        print(f"signal {early} before training started: stopping (nothing new to save)", flush=True)
        trainer.close()
        return STOPPED_EXIT_CODE
    try:
        result = trainer.run()
    except TrainingAborted as err:
        print(f"aborted: {err}", flush=True)
        return TrainingAborted.exit_code
    finally:
        trainer.close()
    if trainer.ops.is_main:
        saved = result.final_checkpoint or "none new"
        print(
            f"done: {result.steps} steps, {result.tokens:,} tokens in {result.wall_s:.1f} s "
            f"({result.tokens_per_s:,.0f} tokens/s); checkpoint {saved}"
        )
    if result.stopped_by_signal and not trainer.done:
        if trainer.ops.is_main:
            print(f"stopped by a signal at step {result.steps}; continue with --resume auto", flush=True)
        return STOPPED_EXIT_CODE
    return 0


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection while the engine is built: importing torch, megatron-core and
    transformers makes about a million long-lived objects, and the collections they trigger walk
    all of them again and again (about 0.8 s per rank with megatron-core)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _export(args: argparse.Namespace) -> int:
    from hebtron.backends.hf_dirs import export_hf  # either backend's checkpoints (Megatron: converted)

    out = export_hf(args.checkpoint, args.hf, args.dtype)
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
