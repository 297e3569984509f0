"""CLI: ``hebtron preflight`` (try a Megatron recipe on CPU) and ``hebtron convert`` (HF <-> Megatron)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    pre = subparsers.add_parser(
        "preflight",
        help="check a megatron recipe on CPU: parallel sizes, then a tiny model through real Megatron steps",
        description="Checks the recipe's parallel plan against the cluster and Megatron's config rules at full "
                    "size, then trains a shrunk model (same layer pattern) for a few steps on 2 CPU ranks (gloo) "
                    "at the recipe's tp/ep/pp where they fit, checking shapes, checkpoint resume and resharding.",
    )
    pre.add_argument("recipe", help="recipe YAML (backend: megatron)")
    pre.add_argument("overrides", nargs="*", help="key=value overrides")
    pre.add_argument("--gpus", type=int, default=None, help="GPUs in the cluster (nodes x GPUs per node)")
    pre.add_argument("--model-config", type=Path, default=None,
                     help="the checkpoint's config.json when model.hf_path is not on this machine")
    pre.add_argument("--steps", type=int, default=3, help="training steps of the tiny model (default 3)")
    pre.add_argument("--json", action="store_true", help="print the report as one JSON object")
    pre.set_defaults(func=_preflight)

    conv = subparsers.add_parser("convert", help="convert weights between HF NemotronH and Megatron checkpoints")
    sub = conv.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    to_meg = sub.add_parser("hf-to-megatron", help="HF NemotronH directory -> Megatron distributed checkpoint")
    to_meg.add_argument("hf_dir", type=Path)
    to_meg.add_argument("out", type=Path)
    to_meg.set_defaults(func=_hf_to_megatron)
    to_hf = sub.add_parser("megatron-to-hf", help="Megatron distributed checkpoint -> HF NemotronH directory")
    to_hf.add_argument("checkpoint", type=Path, help="a Megatron distributed checkpoint directory")
    to_hf.add_argument("out", type=Path)
    to_hf.add_argument("--model-config", type=Path, default=None,
                       help="config.json of the model (default: the one hebtron stored in the checkpoint)")
    to_hf.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="dtype of the written weights")
    to_hf.set_defaults(func=_megatron_to_hf)


def _preflight(args: argparse.Namespace) -> int:
    from hebtron.backends.megatron.preflight import run_preflight

    if args.steps < 2:
        from hebtron.errors import UserError

        raise UserError("--steps: expected at least 2 (one before and one after the checkpoint)")
    report = run_preflight(args.recipe, args.overrides, gpus=args.gpus, model_config=args.model_config, steps=args.steps)
    if args.json:
        print(json.dumps({"recipe": report.recipe, "ok": report.ok, "wall_s": round(report.wall_s, 2),
                          "checks": report.checks}))
    else:
        print(report.table())
    return 0 if report.ok else 1


def _hf_to_megatron(args: argparse.Namespace) -> int:
    from hebtron.backends.megatron.checkpoint_io import hf_dir_to_megatron

    hf_dir_to_megatron(args.hf_dir, args.out)
    print(f"wrote Megatron distributed checkpoint {args.out}")
    return 0


def _megatron_to_hf(args: argparse.Namespace) -> int:
    from hebtron.backends.megatron.checkpoint_io import megatron_to_hf_dir

    megatron_to_hf_dir(args.checkpoint, args.out, model_config=args.model_config, dtype=args.dtype)
    print(f"wrote HF NemotronH directory {args.out}")
    return 0
