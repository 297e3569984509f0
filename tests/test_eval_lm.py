"""The lm-eval adapter: the registered ``hebtron`` model and lm-eval's ``hf`` model on the HF
export score the mini suite the same; padding never changes an answer; ``hebtron eval run``
writes lm-eval's results layout, and a failed run leaves a record the gate rejects."""

from __future__ import annotations

import json
import math

import pytest

from hebtron.cli import main
from tests.test_eval_fixtures import eval_env  # noqa: F401  (session fixture)


def metrics(payload: dict) -> dict[str, float]:
    return {f"{task} {key}": value for task, row in payload["results"].items() for key, value in row.items()
            if "," in key and isinstance(value, float)}


def test_registered_model_and_hf_export_score_the_same(eval_env):  # noqa: F811
    from hebtron.eval.runner import run_suite

    ours = run_suite(eval_env["suite"], eval_env["checkpoint"], backend="hebtron", device="cpu", log_samples=True)
    # batch 1 for hf: in padded batches its rows keep generating past a special-token stop string
    # (<|im_end|>), whose text is then stripped with the special token and cannot be cut at
    theirs = run_suite(eval_env["suite"], eval_env["checkpoint"], backend="hf", device="cpu", dtype="float32",
                       batch_size=1, log_samples=True)
    assert theirs["config"]["model"] == "hf" and ours["config"]["model"] == "hebtron"
    a, b = metrics(ours), metrics(theirs)
    assert set(a) == set(b) and len(a) == 12  # chrf, 3 + 2 multiple-choice metrics, each with its stderr
    assert a == b
    # the scores come from the same per-example answers, not a coincidence of means
    gen_a = [s["resps"] for s in ours["samples"]["hebrew_mini_translation"]]
    gen_b = [s["resps"] for s in theirs["samples"]["hebrew_mini_translation"]]
    assert gen_a == gen_b and any(r[0][0] for r in gen_a)
    for task in ("hebrew_mini_next_sentence", "hebrew_mini_cloze"):
        for x, y in zip(ours["samples"][task], theirs["samples"][task], strict=True):
            for (lx, _), (ly, _) in zip((r[0] for r in x["resps"]), (r[0] for r in y["resps"]), strict=True):
                assert lx == pytest.approx(ly, abs=1e-3)


@pytest.fixture(scope="module")
def lm(eval_env):  # noqa: F811
    from hebtron.eval.lm import HebtronLM

    return HebtronLM(str(eval_env["checkpoint"]), device="cpu", batch_size=4, max_length=24)


def _requests(kind: str, args_list):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=0) for args in args_list]


def test_padding_and_batching_do_not_change_answers(lm):
    contexts = ["שלום עולם ספר", "בית", "ילד מים אור לחם עיר דרך שמש", "hello world"]
    gen = _requests("generate_until", [(c, {"until": ["\n"], "max_gen_toks": 5}) for c in contexts])
    ll = _requests("loglikelihood", [(c, " עיר דרך") for c in contexts])
    lm.batch_size = 4
    batched_gen, batched_ll = lm.generate_until(gen), lm.loglikelihood(ll)
    lm.batch_size = 1
    single_gen, single_ll = lm.generate_until(gen), lm.loglikelihood(ll)
    lm.batch_size = 4
    assert batched_gen == single_gen and any(batched_gen)
    for (x, gx), (y, gy) in zip(batched_ll, single_ll, strict=True):
        assert x == pytest.approx(y, abs=1e-4) and gx == gy


def test_left_padding_needs_its_own_document(lm, monkeypatch):
    """Without seq_idx the padding leaks into Mamba state and attention: answers change."""
    import torch

    prompts = [lm.tok_encode("שלום"), lm.tok_encode("ילד מים אור לחם עיר דרך שמש ים הר")]
    honest = lm._logits(prompts, left_pad=True)[0, -1]
    alone = lm._logits(prompts[:1])[0, -1]
    assert torch.allclose(honest, alone, atol=1e-4)
    forward = lm.model.forward
    monkeypatch.setattr(lm.model, "forward", lambda ids, position_ids=None, seq_idx=None: forward(ids))
    leaky = lm._logits(prompts, left_pad=True)[0, -1]
    assert not torch.allclose(leaky, alone, atol=1e-3)


def test_rolling_loglikelihood_matches_hf(lm, eval_env, tmp_path):  # noqa: F811
    from lm_eval.models.huggingface import HFLM

    from hebtron.model.hf import load_hf, save_hf

    export = save_hf(load_hf(eval_env["checkpoint"]), tmp_path / "hf")
    lm.tokenizer.save_pretrained(str(export))
    hf = HFLM(pretrained=str(export), device="cpu", dtype="float32", batch_size=1, max_length=24)
    text = " ".join(["שלום עולם ספר בית ילד מים אור לחם"] * 12)  # several 24-token windows
    reqs = _requests("loglikelihood_rolling", [(text,), ("hello world",)])
    ours, theirs = lm.loglikelihood_rolling(reqs), hf.loglikelihood_rolling(reqs)
    assert len(lm.tok_encode(text)) > 3 * 24
    assert ours == pytest.approx(theirs, abs=1e-3) and all(math.isfinite(x) and x < 0 for x in ours)


def test_cli_run_writes_lm_eval_layout_and_records_crashes(eval_env, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "r.json"
    code = main(["eval", "run", "--suite", str(eval_env["suite"]), "--checkpoint", str(eval_env["checkpoint"].parent),
                 "--out", str(out), "--device", "cpu", "--limit", "3"])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["hebtron"]["status"] == "ok" and data["hebtron"]["step"] == 7
    assert data["hebtron"]["checkpoint"] == str(eval_env["checkpoint"])  # the checkpoints dir resolved to latest
    row = data["results"]["hebrew_mini_cloze"]
    assert {"acc,none", "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none"} <= set(row)
    assert data["n-samples"]["hebrew_mini_cloze"]["effective"] == 3 and "versions" in data and "n-shot" in data
    assert "hebrew_mini_cloze: acc" in capsys.readouterr().out

    crashed = tmp_path / "crashed.json"
    code = main(["eval", "run", "--suite", str(eval_env["suite"]), "--checkpoint", str(tmp_path / "no-such"),
                 "--out", str(crashed)])
    assert code == 2
    record = json.loads(crashed.read_text())
    assert record["hebtron"]["status"] == "crashed" and "no such checkpoint" in record["hebtron"]["error"]
    policy = tmp_path / "p.yaml"
    policy.write_text("tasks:\n  hebrew_mini_cloze: {metric: acc, max_drop: 0.1}\n")
    assert main(["eval", "gate", "--candidate", str(crashed), "--baseline", str(out), "--policy", str(policy)]) == 1
    assert "the evaluation crashed (CheckpointError" in capsys.readouterr().out
