"""``hebtron arena generate`` on a tiny real checkpoint, and ``hebtron arena results``."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing

import pytest
import torch

from hebtron.arena.generate import Generator, Sampling
from hebtron.cli import main
from hebtron.eval import arena_store
from tests.arena_fixtures import cast
from tests.test_eval_fixtures import build_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [{"prompt": "שלום עולם ספר"}, {"prompt": "hello world book house"},
           {"messages": [{"role": "system", "content": "ענה בעברית"}, {"role": "user", "content": "ילד מים אור"}]},
           {"prompt": "עיר דרך שמש ים הר עץ אבן שדה נהר ארץ", "id": "long"}, {"prompt": "מלך"}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # the same place as tests/test_eval_fixtures.eval_env: built once per worker
    return build_tiny_checkpoint(tmp_path_factory.getbasetemp() / "eval_env" / "model")


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in PROMPTS), encoding="utf-8")
    return path


def answers(db, name):
    with closing(sqlite3.connect(db)) as conn:
        return [r for r in conn.execute(
            "SELECT p.messages, a.text, a.tokens, a.finish, a.seed FROM answers a JOIN prompts p ON p.id = a.prompt_id "
            "JOIN models m ON m.id = a.model_id WHERE m.name = ? ORDER BY p.id", (name,))]


def test_generate_is_seeded_batch_independent_and_append_only(checkpoint, prompts_file, tmp_path, capsys):
    out = tmp_path / "arena"
    common = ["--prompts", str(prompts_file), "--out", str(out), "--max-new-tokens", "6", "--no-progress"]
    assert main(["arena", "generate", "--models", f"batched={checkpoint}", "--batch-size", "4", *common]) == 0
    assert main(["arena", "generate", "--models", f"single={checkpoint.parent}", "--batch-size", "1", *common]) == 0
    db = out / arena_store.DB_NAME
    batched, single = answers(db, "batched"), answers(db, "single")
    assert len(batched) == len(PROMPTS) and batched == single  # same weights, seeds per prompt: same answers
    assert any(text for _, text, _, _, _ in batched)
    assert all(finish in ("stop", "length") and tokens <= 6 for _, _, tokens, finish, _ in batched)
    with closing(arena_store.connect(out)) as conn:
        (model, _) = arena_store.models(conn)
    assert model.info["sampling"] == {"temperature": 0.7, "top_p": 0.95, "top_k": 0, "max_new_tokens": 6, "seed": 0}
    assert model.info["step"] == 7 and model.info["chat_template_sha256"]
    # a rerun resumes (nothing new); other settings under the same name are refused, nothing replaced
    assert main(["arena", "generate", "--models", f"batched={checkpoint}", *common]) == 0
    assert "batched: 0 new answers (5 already there)" in capsys.readouterr().out
    assert main(["arena", "generate", "--models", f"batched={checkpoint}", *common, "--temperature", "1.0"]) == 2
    assert "never overwritten" in capsys.readouterr().err
    assert answers(db, "batched") == batched
    # another seed, other samples
    assert main(["arena", "generate", "--models", f"reseeded={checkpoint}", *common, "--seed", "5"]) == 0
    assert answers(db, "reseeded") != batched


def test_greedy_batched_answers_equal_one_prompt_at_a_time_decoding(checkpoint):
    """Left-padded batches (padding as its own document) decode exactly what each prompt alone does."""
    gen = Generator(str(checkpoint), device="cpu")
    from hebtron.arena.prompts import ArenaPrompt

    encoded = [gen.encode(ArenaPrompt([{"role": "user", "content": p["prompt"]}], None, None))
               for p in PROMPTS if "prompt" in p]
    sampling = Sampling(temperature=0.0, max_new_tokens=5)
    batched = gen.sample(encoded, [0] * len(encoded), sampling)
    with torch.inference_mode():
        for ids, (got, _) in zip(encoded, batched, strict=True):
            row, reference = list(ids), []
            for _ in range(5):
                token = int(gen.model(torch.tensor([row])).logits[0, -1].argmax())
                if token in gen.stop_ids:
                    break
                reference.append(token)
                row.append(token)
            assert got == reference


def test_bad_inputs_are_one_line(checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", '
                   '"content": "a"}]}\n', encoding="utf-8")
    assert main(["arena", "generate", "--models", f"m={checkpoint}", "--prompts", str(bad), "--out",
                 str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}:2: messages[1].role: the last turn must be 'user'" in err
    assert main(["arena", "generate", "--models", "no_equals_sign", "--prompts", str(bad), "--out", "x"]) == 2
    assert "expected NAME=CHECKPOINT" in capsys.readouterr().err
    assert main(["arena", "generate", "--models", "<b>=x", "--prompts", str(bad), "--out", "x"]) == 2
    assert main(["arena", "results", str(tmp_path / "empty")]) == 2
    assert "no arena database" in capsys.readouterr().err
    assert main(["arena", "serve", str(tmp_path / "empty")]) == 2
    assert "no arena database" in capsys.readouterr().err
    assert main(["arena", "serve", str(tmp_path), "--port", "70000"]) == 2


def test_results_command_writes_markdown_json_and_png(tmp_path, capsys):
    from matplotlib.image import imread

    from tests.arena_fixtures import make_arena

    root = make_arena(tmp_path / "arena", ["cpt", "sft", "big"], [f"p{i}" for i in range(30)])
    cast(root, [("sft", "cpt", "a")] * 20 + [("big", "sft", "a")] * 20 + [("cpt", "big", "tie")] * 10)
    assert main(["arena", "results", str(root), "--json", "--rounds", "200"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in payload["ratings"]] == ["big", "sft", "cpt"]
    assert payload["votes"] == 50 and payload["voters"] == 50
    assert all(r["lo"] <= r["elo"] <= r["hi"] for r in payload["ratings"])
    assert main(["arena", "results", str(root), "--rounds", "200"]) == 0
    text = capsys.readouterr().out
    assert "| 1 | big |" in text and "| cpt | sft | 20 | 0 | 20 | 0 | 0 | 0.000 |" in text
    image = imread(root / "results.png")
    assert image.shape[0] > 150 and image.shape[1] > 400 and image.std() > 0.01
    assert json.loads((root / "results.json").read_text())["ratings"] == payload["ratings"]


def test_demo_arena_step_answers_twenty_held_out_prompts(checkpoint, tmp_path, capsys):
    from hebtron.demo.arena import PROMPTS as N, build_demo_arena

    test_file = tmp_path / "translation_test.jsonl"
    test_file.write_text("".join(json.dumps({"en": f"Save file {i}", "he": "שמירה", "source": "ui"}) + "\n"
                                 for i in range(30)), encoding="utf-8")
    (tmp_path / "arena").mkdir()
    (tmp_path / "arena" / "stale.txt").write_text("from the last demo")
    summary = build_demo_arena(tmp_path, [("cpt", str(checkpoint)), ("sft", str(checkpoint.parent))], test_file)
    assert summary["prompts"] == N == 20 and not (tmp_path / "arena" / "stale.txt").exists()
    assert all(m["new_answers"] == 20 for m in summary["models"].values())
    out = capsys.readouterr().out
    assert f"hebtron arena serve {tmp_path / 'arena'}" in out and "= hebtron arena generate --models cpt=" in out
    with arena_store.opened(tmp_path / "arena") as conn:
        first = arena_store.prompt(conn, 1)
    assert first.last_user_text.endswith("Save file 0") and first.lang == "he"
