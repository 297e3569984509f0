"""The demo's last step: both checkpoints on the mini suite, the gate's verdict printed and saved."""

from __future__ import annotations

import json
import shutil

from tests.test_eval_fixtures import eval_env, write_demo_corpus  # noqa: F401  (session fixture)


def test_demo_step_evaluates_gates_and_reports(eval_env, tmp_path, capsys):  # noqa: F811
    from hebtron.eval.demo import evaluate_and_gate

    root = tmp_path / "demo"
    write_demo_corpus(root / "data", docs=8, pairs=60)  # small: the demo step runs the whole suite, twice
    shutil.copytree(eval_env["checkpoint"].parents[1] / "tokenizer", root / "tokenizer")
    ckpt = eval_env["checkpoint"]
    result = evaluate_and_gate(root, ("cpt", ckpt), ("sft", ckpt))
    out = capsys.readouterr().out
    # the same weights on both sides: every task holds, so the default policy accepts
    assert result["verdict"] == "accept" and result["scores"]["cpt"] == result["scores"]["sft"]
    assert set(result["scores"]["sft"]) == {"hebrew_mini_translation chrf", "hebrew_mini_next_sentence acc_mutual_info",
                                            "hebrew_mini_cloze acc"}
    assert "gate: sft vs cpt: ACCEPT" in out and f"--tasks-dir {root / 'eval' / 'tasks'}" in out
    assert (root / "eval" / "sft.gate.md").read_text().startswith("# Gate: ACCEPT")
    assert json.loads((root / "eval" / "sft.gate.json").read_text())["verdict"] == "accept"
    assert json.loads((root / "eval" / "cpt.json").read_text())["hebtron"]["suite"] == "hebrew-mini"
