"""The checkpoint gate: accept, reject with a named cause, fail closed, exit codes, report, table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from hebtron.cli import main
from hebtron.errors import UserError
from hebtron.eval.config import Policy, load_yaml_model
from hebtron.eval.gate import gate
from hebtron.eval.table import collect, markdown

POLICY = {
    "suite": "hebrew-mini",
    "tasks": {
        "translation": {"metric": "chrf", "max_drop": 1.0, "max_drop_stderr": 2.0, "scale": 0.01},
        "cloze": {"metric": "acc", "max_drop": 0.02},
        "next": {"metric": "acc_mutual_info", "max_drop_stderr": 2.0},
    },
    "aggregate": {"min_gain": -0.05},
}


def results(translation=(30.0, 1.0), cloze=(0.50, 0.05), nxt=(0.40, 0.05), step=None, **meta) -> dict:
    def row(name, value, se):
        return {f"{name},none": value, f"{name}_stderr,none": se}
    return {
        "results": {"translation": row("chrf", *translation), "cloze": row("acc", *cloze),
                    "next": row("acc_mutual_info", *nxt)},
        "higher_is_better": {"translation": {"chrf": True}, "cloze": {"acc": True}, "next": {"acc_mutual_info": True}},
        "hebtron": {"status": "ok", "suite": "hebrew-mini", "checkpoint": f"/run/checkpoints/step_{step or 0:08d}",
                    "step": step, **meta},
    }


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture
def policy() -> Policy:
    return Policy.model_validate(POLICY)


def judge(tmp_path: Path, policy: Policy, cand, base=None):
    c = write(tmp_path / "cand.json", cand)
    b = write(tmp_path / "base.json", base if base is not None else results())
    return gate(c, b, policy)


def test_accepts_equal_or_better(tmp_path, policy):
    v = judge(tmp_path, policy, results(translation=(31.0, 1.0), cloze=(0.52, 0.05)))
    assert v.accepted and v.exit_code == 0 and v.reasons == []
    assert all(c.ok for c in v.checks)
    assert v.aggregate_gain == pytest.approx((0.01 + 0.02 + 0.0) / 3)


def test_rejects_regression_beyond_tolerance(tmp_path, policy):
    v = judge(tmp_path, policy, results(cloze=(0.40, 0.05)))  # drop 0.10 > 0.02 abs (no stderr rule)
    assert not v.accepted and v.exit_code == 1
    assert len(v.reasons) == 1 and v.reasons[0].startswith("cloze: regressed")
    assert "0.5 → 0.4" in v.reasons[0]


def test_accepts_regression_inside_stderr(tmp_path, policy):
    # chrF falls 3 points: beyond max_drop 1.0, inside 2 x sqrt(2) x 1.5 = 4.24 (noise on a small set)
    v = judge(tmp_path, policy, results(translation=(27.0, 1.5)), results(translation=(30.0, 1.5)))
    assert v.accepted, v.reasons
    check = next(c for c in v.checks if c.task == "translation")
    assert check.drop == pytest.approx(3.0) and check.allowed == pytest.approx(2 * math.hypot(1.5, 1.5))
    assert "dropped within tolerance" in check.note
    # the same drop with a tight stderr is a regression
    v = judge(tmp_path, policy, results(translation=(27.0, 0.2)), results(translation=(30.0, 0.2)))
    assert not v.accepted and v.reasons[0].startswith("translation: regressed")


def test_lower_is_better_metrics_are_oriented(tmp_path):
    pol = Policy.model_validate({"tasks": {"ppl": {"metric": "word_perplexity", "max_drop": 0.5}}})
    def res(v):
        return {"results": {"ppl": {"word_perplexity,none": v}},
                "higher_is_better": {"ppl": {"word_perplexity": False}}}
    assert judge(tmp_path, pol, res(10.0), res(12.0)).accepted
    v = judge(tmp_path, pol, res(13.0), res(12.0))
    assert not v.accepted and "drop 1" in v.reasons[0]


def test_missing_task_rejects(tmp_path, policy):
    cand = results()
    del cand["results"]["next"]
    v = judge(tmp_path, policy, cand)
    assert not v.accepted
    assert v.reasons == ["next: missing from the candidate results"]


def test_missing_metric_rejects(tmp_path, policy):
    cand = results()
    del cand["results"]["cloze"]["acc,none"]
    cand["results"]["cloze"]["acc_norm,none"] = 0.9
    v = judge(tmp_path, policy, cand)
    assert not v.accepted
    assert v.reasons[0].startswith("cloze: metric 'acc,none' missing from the candidate results (has: acc_norm,none")


def test_nan_rejects(tmp_path, policy):
    v = judge(tmp_path, policy, results(cloze=(float("nan"), 0.05)))
    assert not v.accepted and v.reasons == ["cloze: candidate acc,none is nan"]
    v = judge(tmp_path, policy, results(), results(translation=(float("nan"), 1.0)))
    assert not v.accepted and v.reasons == ["translation: baseline chrf,none is nan"]


def test_missing_stderr_rejects_when_only_stderr_decides(tmp_path, policy):
    cand = results()
    cand["results"]["next"]["acc_mutual_info_stderr,none"] = "N/A"
    v = judge(tmp_path, policy, cand)
    assert not v.accepted and "needs the stderr" in v.reasons[0]


def test_crashed_and_empty_results_reject(tmp_path, policy):
    crashed = {"results": {}, "hebtron": {"status": "crashed", "error": "RuntimeError: CUDA out of memory"}}
    v = judge(tmp_path, policy, crashed)
    assert not v.accepted and "crashed (RuntimeError: CUDA out of memory)" in v.reasons[0]
    for broken, cause in (("", "empty file"), ('{"results": {"cl', "not JSON"), ("[]", "expected a JSON object"),
                          ({"results": {}}, "no task results")):
        v = judge(tmp_path, policy, broken)
        assert not v.accepted and cause in v.reasons[0] and v.reasons[0].startswith("candidate: ")
    v = judge(tmp_path, policy, results(), crashed)
    assert not v.accepted and v.reasons[0].startswith("baseline: ")


def test_aggregate_floor(tmp_path, policy):
    # every task inside its tolerance, but together they lose more than min_gain allows
    base = results(translation=(30.0, 3.0), cloze=(0.50, 0.05), nxt=(0.40, 0.10))
    cand = results(translation=(25.0, 3.0), cloze=(0.49, 0.05), nxt=(0.20, 0.10))
    v = judge(tmp_path, policy, cand, base)
    assert all(c.ok for c in v.checks)
    assert not v.accepted and v.reasons[0].startswith("aggregate: mean scaled gain")


def test_policy_errors_are_one_line(tmp_path):
    bad = write(tmp_path / "p.yaml", yaml.safe_dump({"tasks": {"cloze": {"metric": "acc"}}}))
    with pytest.raises(UserError, match=r"p.yaml: tasks.cloze: give max_drop, max_drop_stderr or both"):
        load_yaml_model(bad, Policy)
    typo = write(tmp_path / "q.yaml", yaml.safe_dump({"tasks": {"cloze": {"metric": "acc", "max_dorp": 1}}}))
    with pytest.raises(UserError, match=r"q.yaml: tasks.cloze.max_dorp: unknown key"):
        load_yaml_model(typo, Policy)


def test_cli_exit_codes_report_and_keep(tmp_path, capsys):
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000100"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    policy = write(tmp_path / "policy.yaml", yaml.safe_dump(POLICY))
    base = write(tmp_path / "base.json", results())
    good = results(step=100)
    good["hebtron"]["checkpoint"] = str(ckpt)
    cand = write(ckpt / "eval.json", good)
    args = ["eval", "gate", "--candidate", str(cand), "--baseline", str(base), "--policy", str(policy)]
    assert main(args + ["--mark-keep"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ACCEPT") and (ckpt / "KEEP").is_file()
    report = (ckpt / "eval.gate.md").read_text()
    assert report.startswith("# Gate: ACCEPT") and "| cloze | acc,none |" in report
    assert json.loads((ckpt / "eval.gate.json").read_text())["verdict"] == "accept"

    write(cand, results(cloze=(0.1, 0.05), step=100))
    assert main(args) == 1
    assert "REJECT" in capsys.readouterr().out
    assert "## Why rejected" in (ckpt / "eval.gate.md").read_text()

    assert main(args[:-1] + [str(tmp_path / "missing.yaml")]) == 2        # usage: no policy file
    assert main(["eval", "gate", "--candidate", str(tmp_path / "nope.json"), "--baseline", str(base),
                 "--policy", str(policy)]) == 2                            # usage: no results file
    assert "no such results file" in capsys.readouterr().err


def test_table_collects_gated_checkpoints(tmp_path, policy):
    run = tmp_path / "run"
    base = write(tmp_path / "base.json", results())
    for step, cloze in ((200, 0.4), (100, 0.55)):
        d = run / "checkpoints" / f"step_{step:08d}"
        d.mkdir(parents=True)
        write(d / "eval.json", results(cloze=(cloze, 0.05), step=step))
        assert main(["eval", "gate", "--candidate", str(d / "eval.json"), "--baseline", str(base),
                     "--policy", str(write(tmp_path / "p.yaml", yaml.safe_dump(POLICY)))]) in (0, 1)
    rows = collect(run)
    assert [r["step"] for r in rows] == [100, 200] and [r["verdict"] for r in rows] == ["accept", "reject"]
    text = markdown(rows)
    assert "| step_00000100 | 100 | 0.55 | 0.4 | 30 | accept |" in text
    assert main(["eval", "table", str(run)]) == 0
    assert (run / "eval_table.md").is_file() and (run / "eval_table.png").stat().st_size > 1000
    assert main(["eval", "table", str(tmp_path / "empty")]) == 2
