"""Accept or reject a candidate checkpoint by its benchmark results against a baseline's.

Fails closed: every problem that stops a fair comparison (a results file that is empty,
unreadable or from a crashed run; a task or metric missing; a NaN; a stderr the policy needs
but does not have) is a rejection whose reason names the cause. A task passes when its drop
from the baseline stays within the larger of ``max_drop`` (metric units) and
``max_drop_stderr`` standard errors of the difference, sqrt(se_c^2 + se_b^2): the absolute
budget, widened when the evaluation is too small to resolve it. The optional aggregate floor
asks the mean of ``scale * (candidate - baseline)`` over gated tasks (oriented so that up is
better) to reach ``min_gain``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hebtron.errors import UserError
from hebtron.jsonio import check_plain
from hebtron.eval.arena_gate import combine, render_verdicts
from hebtron.eval.config import Policy, TaskRule

ACCEPT, REJECT = 0, 1


@dataclass
class Check:
    """One gated task: values, oriented drop (positive = worse), allowed drop, outcome."""

    task: str
    metric: str
    baseline: float | None = None
    baseline_stderr: float | None = None
    candidate: float | None = None
    candidate_stderr: float | None = None
    drop: float | None = None
    allowed: float | None = None
    ok: bool = False
    note: str = ""


@dataclass
class Verdict:
    accepted: bool
    reasons: list[str]
    checks: list[Check] = field(default_factory=list)
    aggregate_gain: float | None = None
    min_gain: float | None = None
    candidate: dict[str, Any] = field(default_factory=dict)
    baseline: dict[str, Any] = field(default_factory=dict)
    policy: str = ""
    arena: dict[str, Any] | None = None  # the arena verdict, when the policy has one (eval/arena_gate.py)
    benchmark_accepted: bool | None = None
    decided_by: str = "benchmarks"

    @property
    def exit_code(self) -> int:
        return ACCEPT if self.accepted else REJECT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"verdict": "accept" if self.accepted else "reject"}


def read_results(path: str | Path) -> tuple[dict[str, Any] | None, str | None]:
    """(results, None) or (None, why it cannot be used). A path that does not exist is a usage error."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such results file")
    try:
        raw = path.read_bytes()
    except OSError as err:
        return None, f"{path}: unreadable ({err.strerror or err})"
    if not raw.strip():
        return None, f"{path}: empty file (the evaluation wrote nothing)"
    try:
        data = check_plain(json.loads(raw.decode("utf-8")), str(path))
    except UnicodeDecodeError as err:
        return None, f"{path}: not UTF-8 text (bad byte at offset {err.start}); the evaluation probably died while writing"
    except RecursionError:
        return None, f"{path}: not JSON (nested too deeply)"
    except ValueError as err:  # not JSON, or integers over 4,300 digits
        return None, f"{path}: not JSON ({str(err).split(';')[0]}); the evaluation probably died while writing"
    except UserError as err:  # nested over check_plain's depth, or lone surrogates
        return None, str(err)
    if not isinstance(data, dict):
        return None, f"{path}: expected a JSON object with 'results'"
    meta = data.get("hebtron") or {}
    if meta.get("status") == "crashed":
        return None, f"{path}: the evaluation crashed ({meta.get('error') or 'no error recorded'})"
    if not isinstance(data.get("results"), dict) or not data["results"]:
        return None, f"{path}: no task results (empty evaluation)"
    return data, None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _lookup(data: dict[str, Any], role: str, task: str, rule: TaskRule) -> tuple[float | None, float | None, str | None]:
    """(value, stderr or None, problem)."""
    results = data["results"]
    if task not in results:
        return None, None, f"{task}: missing from the {role} results"
    row = results[task]
    if rule.key not in row:
        have = ", ".join(sorted(k for k in row if "," in k and "_stderr" not in k)) or "no metrics"
        return None, None, f"{task}: metric {rule.key!r} missing from the {role} results (has: {have})"
    value = _number(row[rule.key])
    if value is None:
        return None, None, f"{task}: {role} {rule.key} is {row[rule.key]!r}, not a number"
    if not math.isfinite(value):
        return None, None, f"{task}: {role} {rule.key} is {value}"
    stderr = _number(row.get(rule.stderr_key))
    if stderr is not None and not math.isfinite(stderr):
        stderr = None
    return value, stderr, None


def _higher_is_better(rule: TaskRule, data: dict[str, Any], task: str) -> bool:
    if rule.higher_is_better is not None:
        return rule.higher_is_better
    recorded = (data.get("higher_is_better") or {}).get(task, {}).get(rule.key.partition(",")[0])
    return True if recorded is None else bool(recorded)


def _fmt(x: float | None, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}g}"


def check_task(task: str, rule: TaskRule, cand: dict[str, Any], base: dict[str, Any]) -> Check:
    check = Check(task=task, metric=rule.key)
    c, c_se, c_problem = _lookup(cand, "candidate", task, rule)
    b, b_se, b_problem = _lookup(base, "baseline", task, rule)
    check.candidate, check.candidate_stderr, check.baseline, check.baseline_stderr = c, c_se, b, b_se
    if c_problem or b_problem:
        check.note = "; ".join(p for p in (c_problem, b_problem) if p)
        return check
    sign = 1.0 if _higher_is_better(rule, cand, task) else -1.0
    check.drop = sign * (b - c)
    parts, notes = [], []
    if rule.max_drop is not None:
        parts.append(rule.max_drop)
        notes.append(f"{_fmt(rule.max_drop)} abs")
    if rule.max_drop_stderr is not None:
        if c_se is None or b_se is None:
            if rule.max_drop is None:
                check.note = f"{task}: policy needs the stderr of {rule.key}, the results have none"
                return check
            notes.append("stderr unavailable")
        else:
            se = math.hypot(c_se, b_se)
            parts.append(rule.max_drop_stderr * se)
            notes.append(f"{rule.max_drop_stderr:g}×{_fmt(se, 3)} stderr")
    check.allowed = max(parts)
    check.ok = check.drop <= check.allowed + 1e-12
    what = "regressed" if not check.ok else ("dropped within tolerance" if check.drop > 0 else "held or improved")
    check.note = (f"{task}: {what}: {rule.key} {_fmt(b)} → {_fmt(c)} (drop {_fmt(check.drop, 3)}, "
                  f"allowed {_fmt(check.allowed, 3)} = max({', '.join(notes)}))")
    return check


def gate(candidate: str | Path, baseline: str | Path, policy: Policy, policy_path: str | Path = "") -> Verdict:
    """Judge ``candidate`` against ``baseline`` under ``policy``."""
    cand, c_problem = read_results(candidate)
    base, b_problem = read_results(baseline)
    info = {
        "candidate": {"path": str(candidate), **((cand or {}).get("hebtron") or {})},
        "baseline": {"path": str(baseline), **((base or {}).get("hebtron") or {})},
        "policy": str(policy_path),
        "min_gain": policy.aggregate.min_gain if policy.aggregate else None,
    }
    for d in (info["candidate"], info["baseline"]):
        d.pop("traceback", None)
    problems = [p for p in (c_problem and f"candidate: {c_problem}", b_problem and f"baseline: {b_problem}") if p]
    if problems:
        return combine(Verdict(accepted=False, reasons=problems, **info), policy.arena, input_problems=True)
    checks = [check_task(task, rule, cand, base) for task, rule in policy.tasks.items()]
    reasons = [c.note for c in checks if not c.ok]
    gain = None
    if policy.aggregate and all(c.drop is not None for c in checks):
        gain = sum(-c.drop * policy.tasks[c.task].scale for c in checks) / len(checks)
        if gain < policy.aggregate.min_gain - 1e-12:
            reasons.append(f"aggregate: mean scaled gain {gain:+.4g} is below the policy's min_gain "
                           f"{policy.aggregate.min_gain:+.4g}")
    return combine(Verdict(accepted=not reasons, reasons=reasons, checks=checks, aggregate_gain=gain, **info),
                   policy.arena)


def render_markdown(v: Verdict) -> str:
    """A short report: verdict, reasons, one row per gated task."""
    cand, base = v.candidate, v.baseline
    lines = [
        f"# Gate: {'ACCEPT' if v.accepted else 'REJECT'}",
        "",
        f"- candidate: `{cand.get('checkpoint', cand['path'])}`"
        + (f" (step {cand['step']})" if cand.get("step") is not None else "") + f", results `{cand['path']}`",
        f"- baseline: `{base.get('checkpoint', base['path'])}`"
        + (f" (step {base['step']})" if base.get("step") is not None else "") + f", results `{base['path']}`",
        f"- policy: `{v.policy}`" + (f", suite {cand['suite']}" if cand.get("suite") else ""),
        "",
    ]
    lines += render_verdicts(v)  # benchmarks and arena side by side (when the policy has an arena)
    if v.reasons:
        lines += ["## Why rejected", "", *[f"- {r}" for r in v.reasons], ""]
    if v.checks:
        lines += ["| task | metric | baseline | candidate | drop | allowed | |", "|---|---|---|---|---|---|---|"]
        for c in v.checks:
            def pm(x, se):
                return _fmt(x) + (f" ± {_fmt(se, 2)}" if se is not None else "")
            status = "ok" if c.ok else "**fail**"
            lines.append(f"| {c.task} | {c.metric} | {pm(c.baseline, c.baseline_stderr)} | "
                         f"{pm(c.candidate, c.candidate_stderr)} | {_fmt(c.drop, 3)} | {_fmt(c.allowed, 3)} | {status} |")
        lines.append("")
    if v.min_gain is not None:
        lines.append(f"Aggregate gain: {_fmt(v.aggregate_gain)} (min {v.min_gain:g}).")
        lines.append("")
    return "\n".join(lines)


def default_report_paths(candidate: str | Path) -> tuple[Path, Path]:
    """``R.json`` -> ``R.gate.md`` and ``R.gate.json`` beside it."""
    candidate = Path(candidate)
    stem = candidate.name[:-5] if candidate.name.endswith(".json") else candidate.name
    return candidate.with_name(f"{stem}.gate.md"), candidate.with_name(f"{stem}.gate.json")
