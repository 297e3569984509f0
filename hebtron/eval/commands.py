"""``hebtron eval run|gate|table``: benchmark a checkpoint, keep or reject it, tabulate a run.

Exit codes. ``run``: 0 evaluated; 1 the evaluation failed (a results file with
``status: crashed`` is still written, so a chained gate rejects); 2 usage error. ``gate``:
0 accept, 1 reject, 2 usage or input error (bad policy, a results path that does not exist).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="lm-eval benchmark suites and checkpoint gates")
    ev_sub = ev.add_subparsers(dest="eval_command", metavar="SUBCOMMAND", required=True)

    run = ev_sub.add_parser("run", help="evaluate a checkpoint on a suite; write lm-eval's results JSON")
    run.add_argument("--suite", required=True, help="suite file, or a name in eval/suites/ (e.g. hebrew-mini)")
    run.add_argument("--checkpoint", required=True, help="step_N checkpoint (native or Megatron: converted once, cached in step_N/hf/), "
                          "checkpoints dir (latest) or HF dir")
    run.add_argument("--out", required=True, type=Path, help="results JSON to write")
    run.add_argument("--backend", choices=["hebtron", "hf"], default="hebtron",
                     help="hebtron: native model registered with lm-eval; hf: lm-eval's hf model "
                          "on an HF export (made on the fly for native training checkpoints)")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    run.add_argument("--dtype", default=None, help="auto, float32, bfloat16 (default auto)")
    run.add_argument("--batch-size", type=int, default=None, help="override the suite's batch size")
    run.add_argument("--limit", type=float, default=None, help="examples per task (testing only)")
    run.add_argument("--tokenizer", default=None, help="tokenizer dir, if not recorded with the checkpoint")
    run.add_argument("--tasks-dir", action="append", default=[], metavar="DIR", dest="include",
                     help="task dir built at run time, replacing the suite's workdir_include (repeatable)")
    run.add_argument("--log-samples", action="store_true", help="keep per-example inputs and outputs in the JSON")
    run.set_defaults(func=_run)

    gate = ev_sub.add_parser("gate", help="accept (exit 0) or reject (exit 1) a candidate against a baseline")
    gate.add_argument("--candidate", required=True, type=Path, help="results JSON of the checkpoint under test")
    gate.add_argument("--baseline", required=True, type=Path, help="results JSON of the reference checkpoint")
    gate.add_argument("--policy", required=True, type=Path, help="gate policy YAML, e.g. eval/suites/hebrew-mini.gate.yaml")
    gate.add_argument("--report", type=Path, default=None, help="markdown report (default: CANDIDATE.gate.md)")
    gate.add_argument("--json", type=Path, default=None, dest="json_out",
                      help="verdict JSON (default: CANDIDATE.gate.json; `hebtron eval table` reads these)")
    gate.add_argument("--mark-keep", action="store_true",
                      help="on accept, protect the candidate checkpoint from pruning (KEEP file)")
    gate.set_defaults(func=_gate)

    table = ev_sub.add_parser("table", help="checkpoint x task table and plot of a run's gate verdicts")
    table.add_argument("run_dir", type=Path)
    table.add_argument("--out", type=Path, default=None, help="where to write eval_table.md/.png (default RUN_DIR)")
    table.set_defaults(func=_table)


def _run(args: argparse.Namespace) -> int:
    from hebtron.errors import UserError
    from hebtron.eval.runner import crashed_payload, run_suite, write_json

    try:
        payload = run_suite(args.suite, args.checkpoint, backend=args.backend, device=args.device, dtype=args.dtype,
                            batch_size=args.batch_size, limit=args.limit, tokenizer=args.tokenizer,
                            include=args.include, log_samples=args.log_samples)
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - any failure must leave a crashed record
        write_json(args.out, crashed_payload(err, args.suite, args.checkpoint, args.backend))
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        print(f"wrote {args.out} (status: crashed)", file=sys.stderr)
        if isinstance(err, KeyboardInterrupt):
            return 130
        return err.exit_code if isinstance(err, UserError) else 1
    write_json(args.out, payload)
    print(summarize(payload))
    print(f"wrote {args.out}")
    return 0 if payload["hebtron"]["status"] == "ok" else 1


def summarize(payload: dict) -> str:
    """One line per task: its metrics with stderr."""
    meta = payload.get("hebtron", {})
    lines = [f"{meta.get('suite')} on {meta.get('checkpoint')} ({meta.get('backend')}, {meta.get('wall_s')} s):"]
    for task, row in payload.get("results", {}).items():
        parts = []
        for key, value in row.items():
            if "," not in key or "_stderr," in key or not isinstance(value, int | float):
                continue
            name, _, filt = key.partition(",")
            se = row.get(f"{name}_stderr,{filt}")
            parts.append(f"{key.removesuffix(',none')} {value:.4g}" + (f" ± {se:.2g}" if isinstance(se, float) else ""))
        if parts:
            lines.append(f"  {task}: " + ", ".join(parts))
    return "\n".join(lines)


def _gate(args: argparse.Namespace) -> int:
    from hebtron.eval.config import Policy, load_yaml_model
    from hebtron.eval.gate import default_report_paths, gate, render_markdown
    from hebtron.eval.runner import write_json

    policy = load_yaml_model(args.policy, Policy)
    verdict = gate(args.candidate, args.baseline, policy, args.policy)
    md_default, json_default = default_report_paths(args.candidate)
    report, json_out = args.report or md_default, args.json_out or json_default
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(render_markdown(verdict), encoding="utf-8")
    write_json(json_out, verdict.to_dict())
    print(f"{'ACCEPT' if verdict.accepted else 'REJECT'}: {args.candidate} vs {args.baseline}")
    for reason in verdict.reasons:
        print(f"  - {reason}")
    if verdict.accepted:
        for check in verdict.checks:
            print(f"  - {check.note}")
    print(f"report: {report}")
    if verdict.accepted and args.mark_keep:
        _keep(verdict.candidate.get("checkpoint"), report)
    return verdict.exit_code


def _keep(checkpoint: str | None, report: Path) -> None:
    from hebtron.checkpoints import STATE_FILE, mark_keep

    if checkpoint and (Path(checkpoint) / STATE_FILE).is_file():
        mark_keep(checkpoint, f"accepted by eval gate: {report}")
        print(f"kept: {checkpoint} (KEEP file: never pruned)")
    else:
        print(f"--mark-keep: {checkpoint} is not a training checkpoint; nothing marked", file=sys.stderr)


def _table(args: argparse.Namespace) -> int:
    from hebtron.eval.table import write_table

    text, md, png = write_table(args.run_dir, args.out)
    print(text, end="")
    print(f"wrote {md} and {png}")
    return 0

