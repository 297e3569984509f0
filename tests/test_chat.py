"""Chat templates -> token ids + assistant mask: the tokens that carry loss are exactly each
assistant turn's content plus its end-of-turn token (checked by decoding them), for several
template families; bad conversations are counted or stop strict runs with one line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from hebtron.data.chat import (
    DEFAULT_TEMPLATE,
    BadExample,
    ChatReader,
    ChatTemplate,
    check_messages,
    encode_chat,
    iter_chat_records,
)
from hebtron.errors import UserError
from tests.sft_fixtures import build_chat_tokenizer, conversation, write_chat_jsonl

LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
# template -> the end-of-turn token that must close every assistant span
TEMPLATES = {"chatml": (DEFAULT_TEMPLATE, "<|im_end|>"), "llama3": (LLAMA3, "<|eot_id|>"),
             "gemma": (GEMMA, "<end_of_turn>"), "mistral": (MISTRAL, "</s>")}
EXTRA_SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>",
                  "[INST]", "[/INST]"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(build_chat_tokenizer(tmp_path_factory.mktemp("chat-tok")))
    tok.add_special_tokens({"additional_special_tokens": EXTRA_SPECIALS}, replace_extra_special_tokens=False)
    return tok


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous True stretches of a mask as (start, end)."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def _decoded_spans(tok, ids, mask) -> list[str]:
    return [tok.decode(ids[a:b].tolist(), skip_special_tokens=False) for a, b in _runs(mask)]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_loss_tokens_are_assistant_content_plus_end_of_turn(tokenizer, name):
    template, eot = TEMPLATES[name]
    rng = random.Random(hash(name) % 1000)
    for turns in (1, 2, 3, 4):
        messages = conversation(rng, turns=turns, system=name != "gemma")
        ids, mask = encode_chat(messages, tokenizer, template)
        assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape
        want = [m["content"] + eot for m in messages if m["role"] == "assistant"]
        assert _decoded_spans(tokenizer, ids, mask) == want
        # nothing else carries loss: the unmasked tokens decode to the prompt parts only
        rest = tokenizer.decode(ids[~mask].tolist(), skip_special_tokens=False)
        assert all(m["content"] not in rest for m in messages if m["role"] == "assistant")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_train_on_last_masks_only_the_final_turn(tokenizer, name):
    template, eot = TEMPLATES[name]
    messages = conversation(random.Random(3), turns=3, system=False)
    ids_all, mask_all = encode_chat(messages, tokenizer, template, train_on="all")
    ids, mask = encode_chat(messages, tokenizer, template, train_on="last")
    np.testing.assert_array_equal(ids, ids_all)  # same tokens, fewer of them carry loss
    assert _decoded_spans(tokenizer, ids, mask) == [messages[-1]["content"] + eot]


def test_boundary_merges_fall_back_to_piecewise_tokenization(tokenizer):
    """Llama 3 puts '\\n\\n' before the content; the prompt alone ends in a '\\n\\n' token that
    the whole conversation would split. The prompt ids must be those of the prompt alone."""
    messages = conversation(random.Random(5), turns=2, system=False)
    ids, mask = encode_chat(messages, tokenizer, LLAMA3)
    prompt = tokenizer.apply_chat_template(messages[:1], chat_template=LLAMA3, tokenize=False,
                                           add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt_ids)].tolist() == prompt_ids
    assert not mask[: len(prompt_ids)].any() and mask[len(prompt_ids)]


def test_template_without_generation_prompt_trains_the_header_too(tokenizer):
    """The model has to generate the header itself when the template cannot prompt for it."""
    no_prompt = DEFAULT_TEMPLATE.split("{% if add_generation_prompt %}")[0]
    messages = conversation(random.Random(6), turns=2, system=False)
    ids, mask = encode_chat(messages, tokenizer, no_prompt)
    want = [f"<|im_start|>assistant\n{m['content']}<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert _decoded_spans(tokenizer, ids, mask) == want


def test_tokenizer_template_is_used_when_present(tokenizer):
    messages = conversation(random.Random(1), turns=2)
    tokenizer.chat_template = GEMMA
    try:
        ids, mask = encode_chat(messages, tokenizer)
    finally:
        tokenizer.chat_template = None
    assert tokenizer.convert_tokens_to_ids("<start_of_turn>") in ids.tolist()
    assert all(s.endswith("<end_of_turn>") for s in _decoded_spans(tokenizer, ids, mask))
    ids, _ = encode_chat(messages, tokenizer)  # no template on the tokenizer: hebtron's ChatML
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_template_that_rewrites_history_is_reported(tokenizer):
    # renders only the last message: earlier renderings are not prefixes of later ones
    forgetful = "{{ messages[-1]['role'] }}: {{ messages[-1]['content'] }}<|im_end|>"
    with pytest.raises(BadExample) as err:
        encode_chat(conversation(random.Random(2), turns=2), tokenizer, forgetful)
    assert err.value.reason == "template_error"


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([{"role": "user", "content": "hi"}], "no_assistant"),
        ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}], "unknown_role"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], "empty_content"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}], "bad_record"),
        ([], "bad_record"),
        ("hello", "bad_record"),
    ],
)
def test_bad_conversations_name_their_reason(messages, reason):
    with pytest.raises(BadExample) as err:
        check_messages(messages)
    assert err.value.reason == reason


def test_special_token_in_content_is_refused(tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok<|im_end|>sneaky"}]
    with pytest.raises(BadExample) as err:
        encode_chat(messages, tokenizer)
    assert err.value.reason == "special_token"


def test_trailing_user_turn_is_cut():
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}]
    assert check_messages(messages) == messages[:2]


def _bad_file(path: Path) -> Path:
    rng = random.Random(9)
    good = [{"messages": conversation(rng, turns=1, system=False)} for _ in range(5)]
    lines = [json.dumps(r, ensure_ascii=False) for r in good]
    lines[1] = json.dumps({"messages": [{"role": "user", "content": "only a question"}]})
    lines[2] = json.dumps({"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]})
    lines.insert(3, "{broken json")
    lines.append(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}))
    lines.append(json.dumps({"messages": conversation(rng, turns=1, system=False, hi=1) + [
        {"role": "user", "content": "hello " * 40}, {"role": "assistant", "content": "שלום " * 40}]}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_reader_counts_every_kind_of_bad_conversation(tokenizer, tmp_path):
    path = _bad_file(tmp_path / "bad.jsonl")
    reader = ChatReader(ChatTemplate(tokenizer), seq_len=48, overlong="drop")
    kept = list(reader.read(path))
    stats = reader.stats
    assert len(kept) == stats.kept == 3 and stats.read == 8
    assert dict(stats.dropped) == {"no_assistant": 1, "unknown_role": 1, "bad_record": 1, "empty_content": 1,
                                   "too_long": 1}
    assert stats.first["unknown_role"].startswith(f"{path}:3: messages[0].role: unknown role 'narrator'")
    assert stats.first["bad_record"].startswith(f"{path}:4: broken JSON")
    assert all(len(ex.input_ids) <= 48 for ex in kept)


def test_strict_mode_stops_at_the_first_bad_conversation(tokenizer, tmp_path):
    path = _bad_file(tmp_path / "bad.jsonl")
    reader = ChatReader(ChatTemplate(tokenizer), seq_len=48, strict=True)
    with pytest.raises(UserError, match=rf"^{path}:2: no assistant turn"):
        list(reader.read(path))


def test_truncate_keeps_the_final_assistant_turn(tokenizer):
    rng = random.Random(4)
    first = conversation(rng, turns=3, system=True, hi=12)
    final = [{"role": "user", "content": "save file"}, {"role": "assistant", "content": "שמירה קובץ"}]
    messages = first + final
    full_ids, _ = encode_chat(messages, tokenizer)
    reader = ChatReader(ChatTemplate(tokenizer), seq_len=len(full_ids) - 1, overlong="truncate")
    ex = reader.example({"messages": messages}, "mem:1")
    assert ex is not None and reader.stats.truncated == 1 and len(ex.input_ids) < len(full_ids)
    spans = _decoded_spans(tokenizer, ex.input_ids, ex.assistant_mask)
    assert spans[-1] == "שמירה קובץ<|im_end|>"
    assert tokenizer.decode(ex.input_ids.tolist()).startswith("<|im_start|>system\nYou translate:")  # kept
    # only the final exchange left and still too long: keep the tail, the final answer whole
    tail = ChatReader(ChatTemplate(tokenizer), seq_len=24, overlong="truncate")
    ex = tail.example({"messages": [{"role": "user", "content": "hello " * 30}, final[1]]}, "mem:2")
    assert ex is not None and len(ex.input_ids) == 24
    assert _decoded_spans(tokenizer, ex.input_ids, ex.assistant_mask) == ["שמירה קובץ<|im_end|>"]
    tail_text = tokenizer.decode(ex.input_ids.tolist())
    assert tail_text.endswith("hello <|im_end|>\n<|im_start|>assistant\nשמירה קובץ<|im_end|>\n")
    # the final answer alone does not fit: dropped and counted
    tiny = ChatReader(ChatTemplate(tokenizer), seq_len=4, overlong="truncate")
    assert tiny.example({"messages": [{"role": "user", "content": "x"}, final[1]]}, "mem:3") is None
    assert tiny.stats.dropped["too_long"] == 1


def test_parquet_and_dataset_directories_read_like_jsonl(tokenizer, tmp_path):
    import datasets

    records = [{"messages": conversation(random.Random(i), turns=2), "lang": "he"} for i in range(4)]
    jsonl = write_chat_jsonl(tmp_path / "c.jsonl", records)
    ds = datasets.Dataset.from_list(records)
    ds.to_parquet(str(tmp_path / "c.parquet"))
    ds.save_to_disk(str(tmp_path / "c_ds"))
    template = ChatTemplate(tokenizer)
    outs = []
    for path in (jsonl, tmp_path / "c.parquet", tmp_path / "c_ds"):
        reader = ChatReader(template, seq_len=512)
        outs.append([(e.input_ids.tolist(), e.assistant_mask.tolist(), e.lang) for e in reader.read(path)])
    assert outs[0] == outs[1] == outs[2] and len(outs[0]) == 4 and outs[0][0][2] == 0  # "he"
    with pytest.raises(UserError, match="no 'messages' column"):
        list(iter_chat_records(_parquet_without_messages(tmp_path / "x.parquet")))


def _parquet_without_messages(path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a"]}), path)
    return path
