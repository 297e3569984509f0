"""``hebtron eval run|gate|watch|select|table``: benchmark checkpoints, keep or reject them,
follow a run's benchmarks over its checkpoints.

Exit codes. ``run``: 0 evaluated; 1 the evaluation failed (a results file with
``status: crashed`` is still written, so a chained gate rejects); 2 usage error. ``gate``:
0 accept, 1 reject, 2 usage or input error (bad policy, a results path that does not exist).
``select``: as the gate's, 0 a checkpoint chosen (KEEP), 1 none. ``watch``: 0 once the run's
last checkpoint is evaluated (or the watched Slurm job has ended).
"""

from __future__ import annotations

import argparse
import functools
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
    run.add_argument("--backend", choices=["hebtron", "hf", "vllm"], default="hebtron",
                     help="hebtron: native model registered with lm-eval; hf: lm-eval's hf model "
                          "on an HF export (made on the fly for native training checkpoints); vllm: "
                          "lm-eval's vLLM model on that export (GPU, needs the vllm extra)")
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

    watch = ev_sub.add_parser("watch", help="evaluate each new checkpoint of a run as it lands (beside training)")
    watch.add_argument("run_dir", type=Path, help="the run directory (logging.run_dir) or its checkpoint directory")
    watch.add_argument("--suite", required=True, help="suite file, or a name in eval/suites/")
    watch.add_argument("--every", type=int, default=1, help="evaluate every N-th checkpoint (the last one always)")
    watch.add_argument("--policy", type=Path, default=None, help="gate policy: re-select the checkpoint to keep "
                                                                  "after each evaluation (as `eval select`)")
    watch.add_argument("--baseline", type=Path, default=None, help="results JSON for --policy (default: the policy's "
                                                                    "select.baseline, else the first evaluated checkpoint)")
    watch.add_argument("--checkpoints", type=Path, default=None, help="the checkpoint directory, if not found from RUN_DIR")
    watch.add_argument("--poll", type=float, default=30.0, help="seconds between looks for new checkpoints")
    watch.add_argument("--once", action="store_true", help="evaluate what is there now, then exit")
    watch.add_argument("--until-job", default=None, metavar="JOBID",
                       help="also stop once this Slurm job (the training job) has left the queue")
    _eval_model_args(watch)
    watch.set_defaults(func=_watch)

    select = ev_sub.add_parser("select", help="choose the checkpoint to keep among a run's evaluated checkpoints")
    select.add_argument("run_dir", type=Path, help="the run directory or its checkpoint directory")
    select.add_argument("--suite", required=True, help="suite name or file whose results decide")
    select.add_argument("--policy", required=True, type=Path, help="gate policy YAML (its select: section sets ties "
                                                                    "and the plateau window)")
    select.add_argument("--baseline", type=Path, default=None, help="results JSON every checkpoint is gated against")
    select.add_argument("--checkpoints", type=Path, default=None, help="the checkpoint directory, if not found from RUN_DIR")
    select.set_defaults(func=_select)

    table = ev_sub.add_parser("table", help="checkpoint x task table of a run's benchmarks, and their curves "
                                            "beside the training and validation loss")
    table.add_argument("run_dir", type=Path)
    table.add_argument("--suite", default=None, help="only this suite's results (default: every suite found)")
    table.add_argument("--checkpoints", type=Path, default=None, help="the checkpoint directory, if not found from RUN_DIR")
    table.add_argument("--out", type=Path, default=None, help="where to write eval_table.md/.png (default RUN_DIR)")
    table.set_defaults(func=_table)


def _eval_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=["hebtron", "hf", "vllm"], default="hebtron")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--limit", type=float, default=None, help="examples per task (testing only)")
    parser.add_argument("--tasks-dir", action="append", default=[], metavar="DIR", dest="include",
                        help="task dir built at run time, replacing the suite's workdir_include (repeatable)")


def _run(args: argparse.Namespace) -> int:
    from hebtron.errors import UserError
    from hebtron.eval.runner import crashed_payload, run_suite, write_json

    try:
        payload = run_suite(args.suite, args.checkpoint, backend=args.backend, device=args.device, dtype=args.dtype,
                            batch_size=args.batch_size, limit=args.limit, tokenizer=args.tokenizer,
                            include=args.include, log_samples=args.log_samples)
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - any failure must leave a crashed record
        write_json(args.out, crashed_payload(err, args.suite, args.checkpoint, args.backend))
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"error: {reason}; wrote {args.out} (status: crashed)", file=sys.stderr)
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


def evaluator(args: argparse.Namespace):  # noqa: ANN201 - a closure over the command line
    """``checkpoint -> results payload`` for the watcher; a failure becomes a crashed payload."""
    from hebtron.eval.config import load_suite
    from hebtron.eval.runner import crashed_payload, run_suite

    load_suite(args.suite)  # a bad suite is a usage error now, not a crashed result per checkpoint

    def evaluate(checkpoint: Path) -> dict:
        try:
            return run_suite(args.suite, checkpoint, backend=args.backend, device=args.device, dtype=args.dtype,
                             batch_size=args.batch_size, limit=args.limit, include=args.include)
        except Exception as err:  # noqa: BLE001 - one checkpoint's failure is its result, the watch goes on
            print(f"error: {checkpoint}: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
            return crashed_payload(err, args.suite, checkpoint, args.backend)

    return evaluate


def _watch(args: argparse.Namespace) -> int:
    from hebtron.eval.config import Policy, load_yaml_model
    from hebtron.eval.watch import Watcher

    after_each = None
    if args.policy is not None:
        after_each = functools.partial(_report_selection, args, load_yaml_model(args.policy, Policy), quiet=True)
    watcher = Watcher(args.run_dir, args.suite, evaluator(args), every=args.every, checkpoints=args.checkpoints,
                      poll_s=args.poll, until_job=args.until_job, after_each=after_each)
    state = watcher.run_until_done(once=args.once)
    counts: dict[str, int] = {}
    for status in state.evaluated.values():
        counts[status] = counts.get(status, 0) + 1
    print(f"eval watch: {watcher.evaluations} evaluated now; run so far: "
          + (", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "nothing yet"))
    return 0


def _report_selection(args: argparse.Namespace, policy, quiet: bool = False) -> int:  # noqa: ANN001
    from hebtron.eval.run_results import locate_run
    from hebtron.eval.select import select, write_selection

    sel = select(args.run_dir, args.suite, policy, args.policy, args.baseline, args.checkpoints)
    dirs = locate_run(args.run_dir, args.checkpoints)
    assert dirs is not None
    md, _ = write_selection(sel, policy, dirs.ckpt_dir)
    if sel.chosen is not None:
        print(f"KEEP: step {sel.chosen.step} ({sel.chosen.checkpoint}), aggregate {sel.chosen.aggregate:.4g}")
    else:
        print("NONE: no checkpoint chosen")
    if not quiet:
        for reason in sel.reasons:
            print(f"  - {reason}")
        for cand in sel.candidates:
            agg = "—" if cand.aggregate is None else f"{cand.aggregate:.4g}"
            why = "passes" if cand.eligible else ("; ".join(cand.reasons) or "fails")
            print(f"  step {cand.step}: aggregate {agg}: {why}")
    print(f"  {sel.plateau.note}")
    print(f"report: {md}")
    return sel.exit_code


def _select(args: argparse.Namespace) -> int:
    from hebtron.eval.config import Policy, load_yaml_model

    return _report_selection(args, load_yaml_model(args.policy, Policy))


def _table(args: argparse.Namespace) -> int:
    from hebtron.eval.table import write_table

    text, md, png = write_table(args.run_dir, args.out, suite=args.suite, checkpoints=args.checkpoints)
    print(text, end="")
    print(f"wrote {md} and {png}")
    return 0

