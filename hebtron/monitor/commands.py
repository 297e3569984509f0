"""``hebtron monitor probe``: routing figures of a checkpoint per layer and language, no training."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    monitor = sub.add_parser("monitor", help="MoE routing monitors")
    monitor_sub = monitor.add_subparsers(dest="monitor_command", metavar="SUBCOMMAND", required=True)
    probe = monitor_sub.add_parser(
        "probe", help="run mixed-language text through a checkpoint and print per-layer, per-language routing"
    )
    probe.add_argument("--checkpoint", type=Path, required=True,
                       help="a hebtron checkpoint (step_N of either backend, or a checkpoints dir) or a HF "
                            "NemotronH directory; a Megatron one is converted once (cached in step_N/hf/)")
    probe.add_argument("--data", type=Path, nargs="+", required=True,
                       help=".jsonl / .parquet / HF dataset dir with 'text' and 'lang' fields")
    probe.add_argument("--tokenizer", type=Path, help="default: the checkpoint's own or the one its run used")
    probe.add_argument("--batches", type=int, default=8)
    probe.add_argument("--batch-size", type=int, default=4)
    probe.add_argument("--seq-len", type=int, default=512)
    probe.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    probe.add_argument("--active-threshold", type=float, default=0.25,
                       help="an expert is active at >= this fraction of the ideal load")
    probe.add_argument("--mark-below", type=float, default=0.5, help="mark load entropy below this with '!'")
    probe.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    probe.set_defaults(func=_probe)


def _probe(args: argparse.Namespace) -> int:
    from hebtron.backends.hf_dirs import hf_checkpoint
    from hebtron.checkpoints import checkpoint_tokenizer
    from hebtron.errors import UserError
    from hebtron.monitor.probe import probe
    from hebtron.monitor.router import format_table

    for name in ("batches", "batch_size", "seq_len"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    found = hf_checkpoint(args.checkpoint)  # a Megatron checkpoint: its HF conversion
    tokenizer = checkpoint_tokenizer(found.weights_ref, args.tokenizer)
    result = probe(found.hf_dir, args.data, tokenizer, args.batches, args.batch_size, args.seq_len,
                   args.dtype, args.active_threshold)
    result["checkpoint"] = str(found.ref.path)
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
        return 0
    tokens = ", ".join(f"{lang} {n:,}" for lang, n in result["tokens"].items())
    print(f"{result['checkpoint']}: {result['num_experts']} experts, top-{result['top_k']}; tokens: {tokens}")
    summary = {entry["layer"]: entry["lang"] for entry in result["layers"]}
    print(format_table(summary, args.mark_below))
    print("load_entropy: 1 = uniform over experts, 0 = one expert "
          f"(top-{result['top_k']} floor {_floor(result['top_k'], result['num_experts']):.3f}); "
          f"'!' marks < {args.mark_below:g}")
    return 0


def _floor(k: int, experts: int) -> float:
    import math

    return math.log(k) / math.log(experts) if experts > 1 else 0.0
