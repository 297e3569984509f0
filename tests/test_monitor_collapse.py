"""The collapse scenario on CPU: a tiny MoE whose deep layer sends Hebrew to two experts.

Without balancing the alarm fires and names that layer; with the sequence aux loss on, Hebrew
load entropy there rises above the alarm threshold within the run; a ``stop`` rule ends the
run. Both runs get their report plots and a side-by-side entropy plot.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from hebtron.train.guards import TrainingAborted
from tests.collapse_scenario import RULE, SKEWED_LAYER, THRESHOLD, alarms, he_entropy, run_collapse, shared_fixture


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory) -> Path:
    return shared_fixture(tmp_path_factory)


@pytest.mark.slow
def test_collapse_alarm_then_aux_loss_recovers(fixture_dir: Path, tmp_path: Path) -> None:
    from hebtron.monitor.plots import entropy_lines
    from hebtron.train.report import write_report

    plain = run_collapse(fixture_dir, tmp_path / "plain", {})
    balanced = run_collapse(fixture_dir, tmp_path / "balanced", {"aux_loss": {"sequence": 1e-2}})

    # without balancing: collapsed in the skewed layer all along, and the alarm names it first
    he_plain = he_entropy(plain)
    assert len(he_plain) == 40 and he_plain[0] < THRESHOLD and max(he_plain[-10:]) < THRESHOLD
    fired = alarms(plain)
    assert fired, "the collapse rule never fired"
    first_step = fired[0][0]
    first = [m for step, m in fired if step == first_step]
    assert first_step <= 10 and all(f"layer {SKEWED_LAYER}, lang he:" in m for m in first), first
    assert "load_entropy" in first[0] and "max_share" in first[0] and "warning only" in first[0]

    # with the sequence aux loss: the same start, then Hebrew spreads over the experts again
    he_bal = he_entropy(balanced)
    assert he_bal[0] == pytest.approx(he_plain[0], abs=0.05) and he_bal[0] < THRESHOLD
    assert statistics.mean(he_bal[-10:]) > THRESHOLD > statistics.mean(he_plain[-10:])
    assert min(he_bal[-10:]) > max(he_plain[-10:])
    assert len(alarms(balanced)) < len(fired)
    assert all(r["moe_aux"]["sequence"] > 0 for r in balanced)

    # plots: each run's report, and both runs side by side
    for run in ("plain", "balanced"):
        names = {p.name for p in write_report(tmp_path / run)}
        assert {"router_load_entropy.png", "router_expert_load.png"} <= names
    fig = entropy_lines({"no balancing": plain, "sequence aux loss 1e-2": balanced}, SKEWED_LAYER, "he", THRESHOLD)
    fig.savefig(tmp_path / "collapse.png")
    assert (tmp_path / "collapse.png").stat().st_size > 10_000

    # the probe reads a hebtron checkpoint too (tokenizer: the one its run recorded)
    from hebtron.monitor.probe import probe

    result = probe(tmp_path / "plain" / "checkpoints", [fixture_dir / "he_valid.jsonl", fixture_dir / "en_valid.jsonl"],
                   seq_len=64)
    layers = {e["layer"]: e["lang"] for e in result["layers"]}
    assert result["checkpoint"].endswith("step_00000040")
    assert layers[SKEWED_LAYER]["he"]["load_entropy"] < THRESHOLD


def test_stop_rule_ends_the_run_and_logs_the_step(fixture_dir: Path, tmp_path: Path) -> None:
    from hebtron.train.metrics import read_metrics

    with pytest.raises(TrainingAborted, match=f"layer {SKEWED_LAYER}, lang he: load_entropy") as info:
        run_collapse(fixture_dir, tmp_path / "stop", {"alarms": [{**RULE, "action": "stop"}]})
    assert "stopping the run" in str(info.value)
    records = read_metrics(tmp_path / "stop")
    assert 3 <= len(records) < 40 and "router_alarm" in records[-1]
