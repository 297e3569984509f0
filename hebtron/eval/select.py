"""``hebtron eval select``: choose the checkpoint to keep among a run's evaluated checkpoints.

Each checkpoint with results for the suite is first gated against a baseline with the policy's
per-task tolerances (as ``hebtron eval gate`` does); among those that pass, the one with the
highest aggregate (mean over gated tasks of ``scale x value``, oriented so that up is better)
is chosen, and checkpoints within ``select.tie_margin`` of it count as tied, the latest step
winning (it has seen the most data). The choice gets a ``KEEP`` file (it is never pruned) and a
verdict file ``CKPT_DIR/select/<suite>.json`` with a report that explains it task by task.

Fails closed: a checkpoint whose results are missing, crashed or NaN cannot be chosen, and when
the baseline is unusable or no checkpoint passes, nothing is chosen (exit 1). Exit codes are the
gate's: 0 chosen, 1 none chosen, 2 usage or input error.

The plateau rule says when to stop or change something, the signal the loss cannot give: over
the last ``select.plateau_window`` evaluations, no task's best value rose beyond the standard
error of the difference from its best value before them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hebtron.checkpoints import KEEP_FILE, mark_keep
from hebtron.errors import UserError
from hebtron.eval.config import Policy
from hebtron.eval.gate import ACCEPT, REJECT, Verdict, _higher_is_better, _lookup, gate, read_results
from hebtron.eval.run_results import Evaluated, evaluated_checkpoints, locate_run, suite_tag

SELECT_DIR = "select"
KEEP_NOTE = "chosen by hebtron eval select"  # how select's own KEEP files are told from a gate's


@dataclass
class Candidate:
    step: int
    checkpoint: str
    results: str
    tokens: int | None
    eligible: bool
    aggregate: float | None
    reasons: list[str] = field(default_factory=list)
    values: dict[str, float | None] = field(default_factory=dict)  # as the results hold them
    oriented: dict[str, float | None] = field(default_factory=dict)  # sign-flipped where lower is better
    stderrs: dict[str, float | None] = field(default_factory=dict)


@dataclass
class Plateau:
    window: int
    plateau: bool | None  # None: too few evaluations to tell
    note: str
    improved: dict[str, float] = field(default_factory=dict)  # task -> rise beyond its stderr


@dataclass
class Selection:
    suite: str
    policy: str
    baseline: str
    chosen: Candidate | None
    candidates: list[Candidate]
    plateau: Plateau
    reasons: list[str]

    @property
    def exit_code(self) -> int:
        return ACCEPT if self.chosen is not None else REJECT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"verdict": "keep" if self.chosen else "none"}


def _read_values(cand: Candidate, data: dict[str, Any], policy: Policy) -> list[str]:
    """Fill the candidate's per-task values (raw and oriented so that up is better) and
    stderrs from its results; return the problems (missing task or metric, NaN)."""
    problems = []
    for task, rule in policy.tasks.items():
        value, se, problem = _lookup(data, "candidate", task, rule)
        if problem:
            problems.append(problem)
            cand.values[task] = cand.oriented[task] = cand.stderrs[task] = None
            continue
        sign = 1.0 if _higher_is_better(rule, data, task) else -1.0
        cand.values[task], cand.oriented[task], cand.stderrs[task] = value, sign * value, se
    return problems


def aggregate(values: dict[str, float | None], policy: Policy) -> float | None:
    """Mean over gated tasks of ``scale x oriented value``; None when any is missing."""
    if any(v is None for v in values.values()):
        return None
    return sum(policy.tasks[t].scale * v for t, v in values.items()) / len(values)  # type: ignore[operator]


def plateau(candidates: list[Candidate], window: int) -> Plateau:
    """Whether no task improved beyond its stderr over the last ``window`` evaluations."""
    usable = [c for c in candidates if c.oriented and all(v is not None for v in c.oriented.values())]
    if len(usable) <= window:
        return Plateau(window, None, f"too few evaluations to judge a plateau ({len(usable)} usable, "
                                     f"need more than {window})")
    before, recent = usable[:-window], usable[-window:]
    improved = {}
    for task in usable[0].oriented:
        best_before = max(before, key=lambda c: c.oriented[task])  # type: ignore[arg-type, return-value]
        best_recent = max(recent, key=lambda c: c.oriented[task])  # type: ignore[arg-type, return-value]
        rise = best_recent.oriented[task] - best_before.oriented[task]  # type: ignore[operator]
        ses = [s for s in (best_before.stderrs[task], best_recent.stderrs[task]) if s is not None]
        noise = math.hypot(*ses) if len(ses) == 2 else 0.0
        if rise > noise:
            improved[task] = rise - noise
    steps = f"steps {recent[0].step}-{recent[-1].step}"
    if improved:
        rising = ", ".join(f"{t} (+{r:.3g} beyond its stderr)" for t, r in improved.items())
        return Plateau(window, False, f"no plateau: over the last {window} evaluations ({steps}) {rising}", improved)
    return Plateau(window, True, f"plateau: no task improved beyond its stderr over the last {window} evaluations "
                                 f"({steps}); stop, or change something", {})


def _baseline(policy: Policy, policy_path: Path, given: str | Path | None, evaluated: list[Evaluated]) -> Path | None:
    if given is not None:
        return Path(given)
    if policy.select.baseline is not None:
        path = Path(policy.select.baseline)
        return path if path.is_absolute() or path.exists() else policy_path.parent / path
    return evaluated[0].path if evaluated else None


def select(run: str | Path, suite: str, policy: Policy, policy_path: str | Path, baseline: str | Path | None = None,
           checkpoints: str | Path | None = None) -> Selection:
    """Judge every evaluated checkpoint of ``run`` and choose one (see the module docstring)."""
    dirs = locate_run(run, checkpoints)
    assert dirs is not None
    tag = suite_tag(suite)
    evaluated = evaluated_checkpoints(dirs.ckpt_dir, tag)
    window = policy.select.plateau_window
    base_path = _baseline(policy, Path(policy_path), baseline, evaluated)
    if not evaluated:
        return Selection(tag, str(policy_path), str(base_path), None, [], plateau([], window),
                         [f"{dirs.ckpt_dir}: no checkpoint has results for suite {tag} (step_N/eval/{tag}.json)"])
    if base_path is not None and not base_path.exists():
        raise UserError(f"baseline {base_path}: no such results file")
    _, base_problem = read_results(base_path) if base_path is not None else (None, "no baseline")
    candidates = []
    for e in evaluated:
        cand = Candidate(e.step, str(e.checkpoint), str(e.path), e.tokens, eligible=False, aggregate=None)
        if e.problem is not None:
            cand.reasons.append(e.problem)
        else:
            assert e.data is not None
            problems = _read_values(cand, e.data, policy)
            cand.aggregate = aggregate(cand.oriented, policy)
            if not e.checkpoint.is_dir():
                problems.append(f"{e.checkpoint}: pruned since its evaluation (results archived in {e.path})")
            cand.reasons += problems
            if base_problem is None and not problems:
                verdict: Verdict = gate(e.path, base_path, policy, policy_path)  # type: ignore[arg-type]
                cand.reasons += verdict.reasons
                cand.eligible = verdict.accepted
        candidates.append(cand)
    reasons = [] if base_problem is None else [f"baseline: {base_problem}"]
    eligible = [c for c in candidates if c.eligible and c.aggregate is not None]
    chosen = None
    if eligible:
        best = max(c.aggregate for c in eligible)  # type: ignore[type-var]
        tied = [c for c in eligible if c.aggregate >= best - policy.select.tie_margin - 1e-12]  # type: ignore[operator]
        chosen = max(tied, key=lambda c: c.step)
    elif base_problem is None:
        reasons.append("no evaluated checkpoint passes the policy against the baseline")
    return Selection(tag, str(policy_path), str(base_path), chosen, candidates, plateau(candidates, window), reasons)


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.4g}"


def render_markdown(sel: Selection, policy: Policy) -> str:
    """The report: the choice and why, one row per checkpoint, each task's value, the plateau."""
    lines = [f"# Checkpoint selection: {sel.suite}", ""]
    if sel.chosen is not None:
        c = sel.chosen
        lines.append(f"**Keep step {c.step}** (`{c.checkpoint}`): aggregate {_fmt(c.aggregate)}, the highest among "
                     f"the {sum(x.eligible for x in sel.candidates)} checkpoints that pass the policy against the "
                     f"baseline" + (f" (ties within {policy.select.tie_margin:g} go to the latest step)"
                                    if policy.select.tie_margin else "") + ".")
    else:
        lines.append("**No checkpoint chosen.**")
    lines += ["", f"- baseline: `{sel.baseline}`", f"- policy: `{sel.policy}`", f"- {sel.plateau.note}", ""]
    if sel.reasons:
        lines += ["## Why nothing was chosen" if sel.chosen is None else "## Notes", "", *[f"- {r}" for r in sel.reasons], ""]
    tasks = list(policy.tasks)
    lines += ["| step | tokens | " + " | ".join(tasks) + " | aggregate | passes | |",
              "|---|---|" + "---|" * len(tasks) + "---|---|---|"]
    for c in sel.candidates:
        cells = []
        for t in tasks:
            v, se = c.values.get(t), c.stderrs.get(t)
            cells.append("—" if v is None else _fmt(v) + (f" ± {se:.2g}" if se is not None else ""))
        mark = "**kept**" if sel.chosen is not None and c.step == sel.chosen.step else ""
        lines.append(f"| {c.step} | {c.tokens if c.tokens is not None else '—'} | " + " | ".join(cells)
                     + f" | {_fmt(c.aggregate)} | {'yes' if c.eligible else 'no'} | {mark} |")
    lines.append("")
    failing = [c for c in sel.candidates if c.reasons]
    if failing:
        lines += ["## Per checkpoint", ""]
        lines += [f"- step {c.step}: " + "; ".join(c.reasons) for c in failing]
        lines.append("")
    return "\n".join(lines)


def write_selection(sel: Selection, policy: Policy, ckpt_dir: Path) -> tuple[Path, Path]:
    """Verdict JSON and report beside the checkpoints; KEEP on the choice (select's earlier
    KEEP for this suite is withdrawn when the choice moves, so improvements do not pile up)."""
    from hebtron.eval.runner import write_json

    out = ckpt_dir / SELECT_DIR
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / f"{sel.suite}.md", out / f"{sel.suite}.json"
    md.write_text(render_markdown(sel, policy), encoding="utf-8")
    write_json(js, sel.to_dict())
    note = f"{KEEP_NOTE} ({sel.suite}): {md}"
    for cand in sel.candidates:
        keep = Path(cand.checkpoint) / KEEP_FILE
        chosen = sel.chosen is not None and cand.step == sel.chosen.step
        if not chosen and keep.is_file() and keep.read_text(encoding="utf-8", errors="replace").startswith(
                f"{KEEP_NOTE} ({sel.suite})"):
            keep.unlink()
    if sel.chosen is not None:
        mark_keep(sel.chosen.checkpoint, note)
    return md, js


def best_checkpoint(ckpt_dir: Path) -> dict[str, Any] | None:
    """The latest selection verdict under a checkpoint directory, for ``hebtron jobs``."""
    import json

    best = None
    for path in sorted((ckpt_dir / SELECT_DIR).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError, UnicodeDecodeError):
            continue
        if isinstance(data, dict) and isinstance(data.get("chosen"), dict):
            if best is None or path.stat().st_mtime > best["mtime"]:
                best = {"suite": data.get("suite"), "step": data["chosen"].get("step"),
                        "checkpoint": data["chosen"].get("checkpoint"), "mtime": path.stat().st_mtime,
                        "plateau": (data.get("plateau") or {}).get("plateau")}
    return best
