"""The arena database (WAL, append-only, one vote per voter and pair) and the arena half of the gate."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing

import pytest
import yaml

from hebtron.cli import main
from hebtron.errors import UserError
from hebtron.eval import arena_store
from hebtron.eval.config import Policy, load_yaml_model
from hebtron.eval.gate import gate, render_markdown
from tests.arena_fixtures import cast, make_arena
from tests.test_gate import POLICY, results, write


def test_database_is_wal_append_only_and_refuses_a_second_vote(tmp_path):
    root = make_arena(tmp_path / "arena", ["cpt", "sft"], ["p1", "p2"])
    raw = sqlite3.connect(root / arena_store.DB_NAME)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with closing(arena_store.connect(root)) as conn:
        cpt, sft = (m.id for m in arena_store.models(conn))
        assert arena_store.record_vote(conn, 1, cpt, sft, "a", "f" * 32)
        assert not arena_store.record_vote(conn, 1, sft, cpt, "b", "f" * 32)  # same pair, sides swapped
        assert arena_store.record_vote(conn, 2, cpt, sft, "tie", "f" * 32)  # another prompt is another pair
        assert arena_store.record_vote(conn, 1, cpt, sft, "b", "e" * 32)  # another voter
        with pytest.raises(ValueError):
            arena_store.record_vote(conn, 99, cpt, sft, "a", "d" * 32)
        with pytest.raises(ValueError):
            arena_store.record_vote(conn, 1, cpt, sft, "maybe", "d" * 32)
        assert len(arena_store.votes(conn)) == 3
    for statement in ("UPDATE answers SET text = 'x'", "DELETE FROM answers", "UPDATE votes SET outcome = 'a'",
                      "DELETE FROM votes", "DELETE FROM models", "UPDATE prompts SET messages = '[]'"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            raw.execute(statement)
    raw.close()
    with closing(arena_store.connect(root)) as conn:
        # a model name comes back only with the same checkpoint and settings (answers never replaced)
        assert arena_store.add_model(conn, "cpt", "/ckpt/cpt", {"sampling": {"temperature": 0.7}}) == cpt
        with pytest.raises(UserError, match="never overwritten"):
            arena_store.add_model(conn, "cpt", "/ckpt/other", {"sampling": {"temperature": 0.7}})


def test_not_an_arena_is_one_line(tmp_path):
    with pytest.raises(UserError, match="no arena database"):
        arena_store.connect(tmp_path)
    bogus = tmp_path / "x.sqlite"
    bogus.write_bytes(b"not a database at all" * 100)
    with pytest.raises(UserError, match="not an arena database"):
        arena_store.connect(bogus)


def arena_policy(db, **arena) -> Policy:
    return Policy.model_validate(POLICY | {"arena": {"db": str(db), "candidate": "sft", "baseline": "cpt",
                                                     "min_win_rate": 0.5, "min_votes": 10} | arena})


def judge(tmp_path, policy, cand=None):
    c = write(tmp_path / "cand.json", cand or results(translation=(31.0, 1.0)))
    b = write(tmp_path / "base.json", results())
    return gate(c, b, policy)


def test_gate_fails_closed_without_enough_votes(tmp_path):
    root = make_arena(tmp_path / "arena", ["cpt", "sft", "other"], [f"p{i}" for i in range(30)])
    v = judge(tmp_path, arena_policy(tmp_path / "missing"))
    assert not v.accepted and v.benchmark_accepted and v.decided_by == "arena"
    assert "no arena database" in v.reasons[-1]
    cast(root, [("sft", "cpt", "a")] * 9 + [("sft", "other", "a")] * 20)  # 9 head-to-head: too few
    v = judge(tmp_path, arena_policy(root))
    assert not v.accepted and "only 9 head-to-head votes" in v.reasons[-1] and "min_votes 10" in v.reasons[-1]
    v = judge(tmp_path, arena_policy(root, candidate="nope"))
    assert not v.accepted and "no model named 'nope'" in v.reasons[-1]


def test_gate_arena_win_rate_decides_and_report_shows_both(tmp_path):
    root = make_arena(tmp_path / "arena", ["cpt", "sft"], [f"p{i}" for i in range(40)])
    # sft vs cpt: 12 wins, 6 losses, 2 ties: (12 + 1) / 20 = 0.65
    cast(root, [("sft", "cpt", "a")] * 6 + [("cpt", "sft", "b")] * 6 + [("cpt", "sft", "a")] * 6
         + [("sft", "cpt", "tie")] + [("cpt", "sft", "both_bad")])
    v = judge(tmp_path, arena_policy(root))
    assert v.accepted and v.decided_by == "benchmarks and arena"
    assert v.arena["win_rate"] == pytest.approx(0.65) and v.arena["votes"] == 20
    assert (v.arena["wins"], v.arena["losses"], v.arena["ties"], v.arena["both_bad"]) == (12, 6, 1, 1)
    lo, hi = v.arena["win_rate_ci"]
    assert lo < 0.65 < hi
    assert not judge(tmp_path, arena_policy(root, min_win_rate=0.7)).accepted
    # benchmarks regress, voters prefer the candidate: "both" rejects, "arena" overrules
    regressed = results(translation=(20.0, 1.0))
    both = judge(tmp_path, arena_policy(root), regressed)
    assert not both.accepted and not both.benchmark_accepted and both.arena["ok"] and both.decided_by == "benchmarks"
    overruled = judge(tmp_path, arena_policy(root, decides="arena"), regressed)
    assert overruled.accepted and overruled.decided_by == "arena (overruling benchmarks)"
    assert overruled.reasons == [] and any("translation" in r for r in overruled.arena["overruled"])
    report = render_markdown(overruled)
    assert "| benchmarks | REJECT |" in report and "| arena | ACCEPT |" in report
    assert "Decided by: **arena (overruling benchmarks)**" in report and "disagree" in report
    assert "| sft |" in report and "| cpt |" in report  # ratings with intervals
    # a crashed benchmark run is not a disagreement: it rejects whatever the arena says
    crashed = judge(tmp_path, arena_policy(root, decides="arena"), {"results": {}, "hebtron": {"status": "crashed"}})
    assert not crashed.accepted


def test_policy_file_with_arena_and_cli_exit_codes(tmp_path, capsys):
    root = make_arena(tmp_path / "arena", ["cpt", "sft"], [f"p{i}" for i in range(12)])
    cast(root, [("cpt", "sft", "a")] * 12)  # the voters prefer the baseline
    policy_file = tmp_path / "policy.gate.yaml"
    policy_file.write_text(yaml.safe_dump(POLICY | {"arena": {"db": str(root), "candidate": "sft", "baseline": "cpt",
                                                              "min_votes": 12}}), encoding="utf-8")
    assert load_yaml_model(policy_file, Policy).arena.min_win_rate == 0.5  # the default
    cand, base = write(tmp_path / "c.json", results(translation=(31.0, 1.0))), write(tmp_path / "b.json", results())
    assert main(["eval", "gate", "--candidate", str(cand), "--baseline", str(base), "--policy", str(policy_file)]) == 1
    verdict = json.loads((tmp_path / "c.gate.json").read_text())
    assert verdict["verdict"] == "reject" and verdict["benchmark_accepted"] and not verdict["arena"]["ok"]
    assert "loses: win rate 0.000" in capsys.readouterr().out
    bad = tmp_path / "bad.gate.yaml"
    bad.write_text(yaml.safe_dump(POLICY | {"arena": {"db": str(root), "candidate": "sft", "baseline": "cpt",
                                                      "min_win_rate": 1.5, "min_votes": 3}}), encoding="utf-8")
    with pytest.raises(UserError, match=r"arena\.min_win_rate"):
        load_yaml_model(bad, Policy)
