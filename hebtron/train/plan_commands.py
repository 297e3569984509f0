"""``hebtron plan``: recommended global batch, steps, LR scaling, wall time and cost."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    plan = sub.add_parser("plan", help="choose a global batch for a token budget (critical batch size)")
    plan.add_argument("--tokens", required=True, help="token budget, e.g. 250B")
    plan.add_argument("--seq-len", type=int, required=True, help="sequence length, e.g. 8192")
    plan.add_argument("--gpus", type=int, required=True, help="number of GPUs (data-parallel ranks x model parallel)")
    plan.add_argument("--gpu", default="h200", choices=["h200", "b300"], help="GPU profile")
    plan.add_argument("--tokens-per-gpu-s", type=float, default=None, help="measured training tokens/s per GPU")
    plan.add_argument("--usd-per-gpu-hour", type=float, default=None, help="price per GPU hour")
    plan.add_argument("--steps", default="20k-100k", help="target optimizer-step range, e.g. 20k-100k")
    plan.add_argument("--ref-batch", type=int, default=256, help="reference global batch (sequences) for the LR")
    plan.add_argument("--ref-lr", type=float, default=1e-4, help="learning rate at the reference batch")
    plan.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per micro-batch")
    plan.add_argument("--batch", type=int, action="append", default=[], help="extra candidate batch (sequences)")
    plan.add_argument("--json", action="store_true", help="print JSON")
    plan.set_defaults(func=_plan)


def _plan(args: argparse.Namespace) -> int:
    from hebtron.errors import UserError
    from hebtron.recipe.units import parse_token_count
    from hebtron.train.plan import make_plan

    try:
        tokens = parse_token_count(args.tokens)
        low, _, high = args.steps.partition("-")
        min_steps, max_steps = parse_token_count(low), parse_token_count(high or low)
        plan = make_plan(tokens, args.seq_len, args.gpus, args.gpu, args.tokens_per_gpu_s, args.usd_per_gpu_hour,
                         min_steps, max_steps, args.ref_batch, args.ref_lr, args.micro_batch, tuple(args.batch))
    except ValueError as err:
        raise UserError(f"hebtron plan: {err}") from None
    if args.json:
        print(json.dumps(plan.to_json(), indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{tokens / 1e9:g}B tokens at {args.seq_len} context on {args.gpus} x {args.gpu.upper()} "
                        f"(target {min_steps:,}-{max_steps:,} steps)")
    for col in ("batch (seqs)", "tokens/step", "steps", "LR", "LR x", "in range", ""):
        table.add_column(col, justify="right")
    for r in plan.rows:
        table.add_row(f"{r.global_batch:,}", f"{r.batch_tokens / 1e6:.1f}M", f"{r.steps:,}", f"{r.lr:.2e}",
                      f"{r.lr_scale:.2f}", "yes" if r.in_range else "no", "<- best" if r.recommended else "")
    console = Console()
    console.print(table)
    console.print(f"wall time {plan.wall_hours:,.1f} h at {plan.tokens_per_gpu_s:,.0f} tokens/s per GPU, "
                  f"cost ${plan.cost_usd:,.0f} at ${plan.usd_per_gpu_hour}/GPU-hour "
                  f"(profile defaults are placeholders: pass your measured --tokens-per-gpu-s)")
    return 0
