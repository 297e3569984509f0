"""``hebtron arena generate|serve|results``: side-by-side preference voting between checkpoints.

Exit codes: 0 done, 2 usage or input error (a bad prompt file, a checkpoint that does not
resolve, a directory that is not an arena).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

TOKEN_ENV = "HEBTRON_ARENA_TOKEN"


def register(sub: argparse._SubParsersAction) -> None:
    arena = sub.add_parser("arena", help="side-by-side preference voting between checkpoints")
    arena_sub = arena.add_subparsers(dest="arena_command", metavar="SUBCOMMAND", required=True)

    gen = arena_sub.add_parser("generate", help="answer the prompts with every model; store them in ARENA/arena.sqlite")
    gen.add_argument("--models", nargs="+", required=True, metavar="NAME=CHECKPOINT",
                     help="checkpoints as `hebtron eval run` takes them (step_N, checkpoints dir, HF dir)")
    gen.add_argument("--prompts", required=True, type=Path,
                     help='JSONL: {"prompt": str} or {"messages": [...]}, optional "id", "lang"')
    gen.add_argument("--out", required=True, type=Path, help="arena directory (created; answers are appended)")
    gen.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--top-k", type=int, default=0, help="0 = off")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--batch-size", type=int, default=8)
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    gen.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    gen.add_argument("--template", default=None, help="chat template: auto (default), tokenizer, chatml or a Jinja file")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    gen.set_defaults(func=_generate)

    srv = arena_sub.add_parser("serve", help="the voting web app (localhost by default)")
    srv.add_argument("arena", type=Path, help="arena directory (or its arena.sqlite)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8088)
    srv.add_argument("--token", default=None,
                     help=f"shared secret voters must enter (also read from ${TOKEN_ENV}); use it off localhost")
    srv.set_defaults(func=_serve)

    res = arena_sub.add_parser("results", help="Bradley-Terry ratings with bootstrap intervals; results.md/.json/.png")
    res.add_argument("arena", type=Path, help="arena directory (or its arena.sqlite)")
    res.add_argument("--json", action="store_true", help="print the JSON instead of the markdown")
    res.add_argument("--rounds", type=int, default=1000, help="bootstrap resamples (default 1000)")
    res.add_argument("--seed", type=int, default=0)
    res.add_argument("--out", type=Path, default=None, help="where to write results.* (default: the arena directory)")
    res.set_defaults(func=_results)


def _generate(args: argparse.Namespace) -> int:
    from hebtron.arena.generate import Sampling, generate_arena, parse_models
    from hebtron.data.chat import read_template_file

    template = args.template
    if template and template not in ("auto", "tokenizer", "chatml"):
        template = read_template_file(template)
    sampling = Sampling(args.temperature, args.top_p, args.top_k, args.max_new_tokens, args.seed)
    summary = generate_arena(parse_models(args.models), args.prompts, args.out, sampling, args.batch_size,
                             args.device, args.dtype, template, progress=not args.no_progress)
    for name, m in summary["models"].items():
        print(f"  {name}: {m['new_answers']} new answers ({m['already_there']} already there), "
              f"{m['tokens']} tokens, {m['seconds']} s  [{m['resolved']}]")
    print(f"wrote {summary['db']} ({summary['prompts']} prompts); vote with: hebtron arena serve {args.out}")
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _serve(args: argparse.Namespace) -> int:
    from hebtron.arena.server import serve
    from hebtron.errors import UserError

    if not 0 < args.port < 65536:
        raise UserError(f"--port: expected 1-65535, got {args.port}")
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if not _is_loopback(args.host) and token is None:
        print(f"warning: serving on {args.host} without --token: anyone who can reach it can vote", file=sys.stderr)
    serve(args.arena, args.host, args.port, token)
    return 0


def _results(args: argparse.Namespace) -> int:
    import json

    from hebtron.arena.report import render_markdown, write_results
    from hebtron.errors import UserError

    if args.rounds < 1:
        raise UserError(f"--rounds: expected >= 1, got {args.rounds}")
    table, payload, files = write_results(args.arena, args.out, args.rounds, args.seed)
    if args.json:
        print(json.dumps(payload, indent=2, ensure_ascii=False))
    else:
        print(render_markdown(table, Path(payload["db"])), end="")
        print(f"wrote {files['markdown']}, {files['json']} and {files['png']}")
    return 0
