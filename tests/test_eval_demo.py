"""The demo's last step: two checkpoints on the mini suite, the gate's verdict printed and saved.

The gate must be able to say no: the baseline is the tiny eval checkpoint taught the suite's
held-out translation pairs (chrF ~100), the candidate the same checkpoint untrained (chrF ~1.5).
Judged that way round it is rejected (exit 1); the other way round the printed ``hebtron eval
gate`` command accepts the trained one (exit 0).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hebtron.eval.gate import ACCEPT, REJECT
from tests.test_eval_fixtures import eval_env, write_demo_corpus  # noqa: F401  (session fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def taught_translation(ckpt: Path, pairs: Path, tokenizer: Path, out: Path, max_steps: int = 200) -> Path:
    """A copy of ``ckpt`` trained (full batch, Adam) until it answers the suite's translation prompts
    with their references: a baseline that is clearly better than the checkpoint it started from."""
    import torch
    import torch.nn.functional as F

    from hebtron.data.chat import ChatTemplate
    from hebtron.data.tokenizer import load_hf_tokenizer
    from hebtron.demo.sft_data import translation_messages
    from hebtron.model.hf import load_hf
    from hebtron.train.checkpoint import save_checkpoint

    tok = load_hf_tokenizer(tokenizer)
    template = ChatTemplate(tok)
    rows = [json.loads(line) for line in pairs.read_text(encoding="utf-8").splitlines() if line.strip()]
    encoded = [template.encode([*translation_messages(r["en"]), {"role": "assistant", "content": r["he"]}])
               for r in rows]
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    for k, (row, mask) in enumerate(encoded):
        ids[k, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        labels[k, : len(row)] = torch.where(torch.as_tensor(mask), ids[k, : len(row)], -100)
    model = load_hf(ckpt)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(max_steps):
        logits = model(ids).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))
        if loss.item() < 0.05:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, f"the baseline did not learn the translation pairs (loss {loss.item():.3f})"
    return save_checkpoint(out, 7, model.state_dict(), extra={"tokenizer": str(tokenizer.resolve())},
                           extra_files={"config.json": (ckpt / "config.json").read_text(encoding="utf-8")})


def test_demo_step_rejects_a_worse_candidate_and_accepts_a_better_one(eval_env, tmp_path, capsys):  # noqa: F811
    from hebtron.cli import main
    from hebtron.demo.evaluate import POLICY, evaluate_and_gate
    from hebtron.demo.sft_data import build_sft_demo

    root = tmp_path / "demo"
    write_demo_corpus(root / "data", docs=8, pairs=60)  # small: the demo step runs the whole suite, twice
    shutil.copytree(eval_env["checkpoint"].parents[1] / "tokenizer", root / "tokenizer")
    build_sft_demo(root / "data")  # the held-out pairs the suite scores (evaluate_and_gate keeps them)
    untrained = eval_env["checkpoint"]
    trained = taught_translation(untrained, root / "data" / "translation_test.jsonl", root / "tokenizer",
                                 tmp_path / "trained" / "checkpoints")

    result = evaluate_and_gate(root, ("trained", trained), ("untrained", untrained))
    out = capsys.readouterr().out
    scores = result["scores"]
    assert set(scores["untrained"]) == {"hebrew_mini_translation chrf", "hebrew_mini_next_sentence acc_mutual_info",
                                        "hebrew_mini_cloze acc"}
    assert scores["trained"]["hebrew_mini_translation chrf"] > 90 > 10 > scores["untrained"]["hebrew_mini_translation chrf"]
    assert result["verdict"] == "reject" and result["exit_code"] == REJECT
    assert any(r.startswith("hebrew_mini_translation: regressed") for r in result["reasons"])
    assert "gate: untrained vs trained: REJECT" in out and f"--tasks-dir {root / 'eval' / 'tasks'}" in out
    assert f"(exit {REJECT}; report" in out
    eval_dir = root / "eval"
    assert (eval_dir / "untrained.gate.md").read_text().startswith("# Gate: REJECT")
    assert json.loads((eval_dir / "untrained.gate.json").read_text())["verdict"] == "reject"
    assert json.loads((eval_dir / "trained.json").read_text())["hebtron"]["suite"] == "hebrew-mini"

    # the same results the other way round: the gate command the demo prints keeps the trained one
    code = main(["eval", "gate", "--candidate", str(eval_dir / "trained.json"),
                 "--baseline", str(eval_dir / "untrained.json"), "--policy", str(POLICY)])
    assert code == ACCEPT
    assert (eval_dir / "trained.gate.md").read_text().startswith("# Gate: ACCEPT")
    assert json.loads((eval_dir / "trained.gate.json").read_text())["verdict"] == "accept"
