"""The last step of ``make demo``: benchmark two checkpoints on the mini suite and gate one.

The candidate is the SFT checkpoint judged against the CPT checkpoint it started from; when
there is no SFT checkpoint, the CPT checkpoint is judged against the untrained model it
started from (same recipe, same seed). It runs exactly what a cluster job chains after
training: ``hebtron eval run`` for each, then ``hebtron eval gate`` with
``eval/suites/hebrew-mini.gate.yaml``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

from hebtron.demo.minisuite import build_mini_suite
from hebtron.eval.config import SUITES_DIR, Policy, load_yaml_model
from hebtron.eval.gate import default_report_paths, gate, render_markdown
from hebtron.eval.runner import run_suite, write_json

SUITE = SUITES_DIR / "hebrew-mini.yaml"
POLICY = SUITES_DIR / "hebrew-mini.gate.yaml"


def initial_model(recipe_path: Path, out: Path) -> Path:
    """The model a CPT run starts from (its recipe, its seed), saved as an HF dir with tokenizer."""
    from hebtron.data.tokenizer import load_hf_tokenizer
    from hebtron.model.hf import save_hf
    from hebtron.recipe import load_recipe
    from hebtron.train.setup import build_model

    recipe = load_recipe(recipe_path, [])
    tokenizer = load_hf_tokenizer(recipe.tokenizer.path)
    save_hf(build_model(recipe, tokenizer), out)
    tokenizer.save_pretrained(str(out))
    return out


def quiet() -> None:
    """The demo prints its own summary: lm-eval's warnings are not for its readers."""
    for name in ("lm_eval", "transformers", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


def gated_scores(payload: dict[str, Any], policy: Policy) -> dict[str, float]:
    """The policy's metrics from a results payload: {"task metric": value}."""
    scores = {}
    for task, rule in policy.tasks.items():
        value = payload.get("results", {}).get(task, {}).get(rule.key)
        if isinstance(value, int | float):
            scores[f"{task} {rule.metric}"] = float(value)
    return scores


def _mini_suite(demo_root: Path) -> Path:
    """Build the mini suite's tasks (once) and return their directory."""
    eval_dir = demo_root / "eval"
    manifest = build_mini_suite(demo_root / "data", eval_dir, tokenizer_dir=demo_root / "tokenizer")
    print("  mini suite: " + ", ".join(f"{t} ({i['docs']} docs)" for t, i in manifest["tasks"].items()))
    return eval_dir / "tasks"


def evaluate_run(demo_root: Path, run_dir: Path) -> dict[str, Any]:
    """Every checkpoint of the CPT run on the mini suite, as ``hebtron eval watch --once`` does,
    then the run-level choice (``eval select``) and the curves (``eval table``)."""
    from hebtron.eval.select import select, write_selection
    from hebtron.eval.table import write_table
    from hebtron.eval.watch import Watcher

    quiet()
    tasks_dir = _mini_suite(demo_root)

    def evaluate(checkpoint: Path) -> dict[str, Any]:
        with open(demo_root / "eval" / f"{checkpoint.name}.log", "w", encoding="utf-8") as log:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                return run_suite(SUITE, checkpoint, backend="hebtron", include=[tasks_dir])

    watcher = Watcher(run_dir, SUITE.stem, evaluate, say=lambda line: print(f"  {line.removeprefix('eval watch: ')}"))
    watcher.run_until_done(once=True)
    policy = load_yaml_model(POLICY, Policy)
    selection = select(run_dir, SUITE.stem, policy, POLICY)
    assert watcher.dirs is not None
    report, _ = write_selection(selection, policy, watcher.dirs.ckpt_dir)
    _, table_md, png = write_table(run_dir, suite=SUITE.stem)
    chosen = selection.chosen
    print(f"  select: keep step {chosen.step}" if chosen else "  select: no checkpoint chosen", end="")
    print(f" ({selection.plateau.note}); report {report}")
    print(f"  curves: {png} (table {table_md})")
    where = "" if tasks_dir.resolve() == Path("runs/demo/eval/tasks").resolve() else f" --tasks-dir {tasks_dir}"
    print(f"    = hebtron eval watch {run_dir} --suite hebrew-mini --once{where}; hebtron eval select {run_dir} "
          f"--suite hebrew-mini --policy eval/suites/{POLICY.name}; hebtron eval table {run_dir}")
    return {"chosen_step": chosen.step if chosen else None, "plateau": selection.plateau.plateau,
            "report": str(report), "table": str(table_md), "curves": str(png),
            "evaluated": [c.step for c in selection.candidates]}


def evaluate_and_gate(demo_root: Path, baseline: tuple[str, Path], candidate: tuple[str, Path]) -> dict[str, Any]:
    """Evaluate both (name, checkpoint) pairs, gate the candidate, print and return the verdict.
    A checkpoint that ``evaluate_run`` already evaluated reuses its results."""
    from hebtron.eval.run_results import results_path

    quiet()
    eval_dir = demo_root / "eval"
    tasks_dir = _mini_suite(demo_root)
    policy = load_yaml_model(POLICY, Policy)
    where = "" if tasks_dir.resolve() == Path("runs/demo/eval/tasks").resolve() else f" --tasks-dir {tasks_dir}"
    paths, scores = {}, {}
    for name, ckpt in (baseline, candidate):
        out = eval_dir / f"{name}.json"
        done = results_path(ckpt, SUITE.stem)
        if done.is_file():  # evaluated with the rest of its run
            payload = json.loads(done.read_text(encoding="utf-8"))
        else:
            with open(eval_dir / f"{name}.log", "w", encoding="utf-8") as log:  # progress bars and prints
                with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                    payload = run_suite(SUITE, ckpt, backend="hebtron", include=[tasks_dir])
        write_json(out, payload)
        paths[name], scores[name] = out, gated_scores(payload, policy)
        shown = ", ".join(f"{k.removeprefix('hebrew_mini_')} {v:.3f}" for k, v in scores[name].items())
        print(f"  {name}: {shown}  [{payload['hebtron']['wall_s']} s]")
        print(f"    = hebtron eval run --suite hebrew-mini --checkpoint {ckpt} --out {out}{where}")
    cand_json, base_json = paths[candidate[0]], paths[baseline[0]]
    verdict = gate(cand_json, base_json, policy, POLICY)
    report, verdict_json = default_report_paths(cand_json)
    report.write_text(render_markdown(verdict), encoding="utf-8")
    write_json(verdict_json, verdict.to_dict())
    print(f"  gate: {candidate[0]} vs {baseline[0]}: {'ACCEPT' if verdict.accepted else 'REJECT'}")
    for reason in verdict.reasons or [c.note for c in verdict.checks]:
        print(f"    - {reason}")
    if verdict.accepted and verdict.aggregate_gain is not None:
        print(f"    - aggregate: mean scaled gain {verdict.aggregate_gain:+.4g} (policy min_gain {verdict.min_gain:+g})")
    print(f"    = hebtron eval gate --candidate {cand_json} --baseline {base_json} "
          f"--policy eval/suites/{POLICY.name}  (exit {verdict.exit_code}; report {report})")
    return {"baseline": baseline[0], "candidate": candidate[0], "verdict": "accept" if verdict.accepted else "reject",
            "exit_code": verdict.exit_code, "reasons": verdict.reasons, "report": str(report),
            "results": {name: str(p) for name, p in paths.items()}, "scores": scores}
