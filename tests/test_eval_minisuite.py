"""The offline mini suite builder: deterministic data, absolute paths, held-out translation pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from hebtron.errors import UserError
from hebtron.demo.minisuite import GROUP, TASKS, build_mini_suite, translation_prompt
from tests.test_eval_fixtures import write_demo_corpus


def _load(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_build_is_deterministic_with_absolute_paths(tmp_path, monkeypatch):
    data = write_demo_corpus(tmp_path / "data")
    first = build_mini_suite(data, tmp_path / "a")
    second = build_mini_suite(data, tmp_path / "b")
    assert first["data_sha256"] == second["data_sha256"]
    for name in ("next_sentence.jsonl", "cloze.jsonl"):
        assert (tmp_path / "a" / "data" / name).read_bytes() == (tmp_path / "b" / "data" / name).read_bytes()
    tasks = tmp_path / "a" / "tasks"
    assert sorted(p.stem for p in tasks.glob("*.yaml")) == sorted([*TASKS, GROUP])
    monkeypatch.chdir(tmp_path / "b")  # lm-eval resolves relative data_files against the working directory
    for task in TASKS:
        text = (tasks / f"{task}.yaml").read_text(encoding="utf-8")
        data_file = yaml.load(text.replace("!function", ""), Loader=yaml.SafeLoader)["dataset_kwargs"]["data_files"]["test"]
        assert data_file.startswith("/") and (tmp_path / "a" / "data").exists()
        assert _load(Path(data_file))


def test_items_are_well_formed(tmp_path):
    data = write_demo_corpus(tmp_path / "data")
    build_mini_suite(data, tmp_path / "eval")
    for name in ("next_sentence", "cloze"):
        items = _load(tmp_path / "eval" / "data" / f"{name}.jsonl")
        assert len(items) >= 10
        for it in items:
            assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4 and 0 <= it["label"] < 4
    cloze = _load(tmp_path / "eval" / "data" / "cloze.jsonl")
    for it in cloze:  # the right word, followed by the rest of the sentence, completes the prefix
        assert it["choices"][it["label"]].startswith(it["words"][it["label"]] + " ")


def test_translation_uses_the_sft_held_out_split(tmp_path):
    data = write_demo_corpus(tmp_path / "data")
    build_mini_suite(data, tmp_path / "eval")
    test_pairs = _load(data / "translation_test.jsonl")
    train_text = (data / "sft_train.jsonl").read_text(encoding="utf-8")
    assert test_pairs and all(p["en"] not in train_text and p["he"] not in train_text for p in test_pairs)
    # an existing split (written by the SFT builder) is used as it is
    (data / "translation_test.jsonl").write_text(
        "".join(json.dumps({"en": f"e{i}", "he": f"ה{i}"}) + "\n" for i in range(5)), encoding="utf-8")
    manifest = build_mini_suite(data, tmp_path / "eval")
    assert manifest["tasks"]["hebrew_mini_translation"]["docs"] == 5


def test_translation_prompt_is_the_sft_chat_prompt():
    import jinja2
    from lm_eval.utils import apply_template

    from hebtron.data.chat import DEFAULT_TEMPLATE
    from hebtron.demo.sft_data import translation_messages

    rendered = apply_template(translation_prompt(), {"en": "Open file"})  # as lm-eval renders doc_to_text
    expected = jinja2.Environment().from_string(DEFAULT_TEMPLATE).render(
        messages=translation_messages("Open file"), add_generation_prompt=True)
    assert rendered == expected and rendered.endswith("<|im_start|>assistant\n")


def test_missing_corpus_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="he_valid.jsonl: missing; build the demo corpus first"):
        build_mini_suite(tmp_path / "nothing", tmp_path / "eval")
