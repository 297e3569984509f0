"""The offline Hebrew mini suite: three small lm-eval tasks built from the demo corpus.

``hebtron data demo`` calls :func:`build_mini_suite`, which writes under ``runs/demo/eval/``:

- ``data/next_sentence.jsonl``: multiple choice; after a Hebrew sentence (news from the UD
  Hebrew treebank, or a Bible verse), which of four sentences really came next;
- ``data/cloze.jsonl``: a treebank sentence with one word blanked, four candidate words;
- the translation task reads ``runs/demo/data/translation_test.jsonl`` (English->Hebrew UI
  strings held out of SFT by :mod:`hebtron.demo.sft_data`) where it lies, prompts with SFT's
  instruction in the chat template and scores chrF;
- ``tasks/*.yaml``: the lm-eval task configs and the ``hebrew_mini`` group, with absolute
  ``data_files`` paths because lm-eval resolves relative ones against the working directory.

Everything is a deterministic function of the corpus files and the seed.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any

from hebtron.data.text import stable_key, write_jsonl
from hebtron.demo.files import read_jsonl, write_manifest, write_text
from hebtron.demo.sft_data import build_sft_demo, translation_messages
from hebtron.errors import UserError

BUILDER_VERSION = 1
TRANSLATION_TEST = "translation_test.jsonl"
TRANSLATION_EVAL_DOCS = 40      # pairs the mini task scores (generation is the slow part)
MC_ITEMS = 100
CLOZE_ITEMS = 100
GROUP = "hebrew_mini"
TASKS = ("hebrew_mini_translation", "hebrew_mini_next_sentence", "hebrew_mini_cloze")
HEBREW_WORD = re.compile(r"^[\u05d0-\u05ea]{3,}$")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
LICENSES = {
    "hebrew_mini_translation": "jupyterlab-language-pack-he-il UI strings: BSD-3-Clause",
    "hebrew_mini_next_sentence": "UD Hebrew-HTB: CC BY-NC-SA 4.0 (non-commercial); Westminster Leningrad Codex: public domain",
    "hebrew_mini_cloze": "UD Hebrew-HTB: CC BY-NC-SA 4.0 (non-commercial)",
}


def ensure_translation_split(data_dir: Path, seed: int = 0) -> Path:
    """``translation_test.jsonl``: the SFT data builder's held-out pairs (built here if missing).

    :func:`hebtron.demo.sft_data.build_sft_demo` splits the UI pairs so that no test pair, nor
    any pair sharing its English or Hebrew side, is trained on; the mini suite scores those.
    """
    path = data_dir / TRANSLATION_TEST
    if not path.is_file():
        build_sft_demo(data_dir, seed=seed)
    return path


def translation_docs(dataset):
    """lm-eval ``process_docs``: a seeded spread of ``TRANSLATION_EVAL_DOCS`` held-out pairs."""
    order = sorted(range(len(dataset)), key=lambda i: stable_key(0, "mini_translation", dataset[i]["en"]))
    return dataset.select(sorted(order[:TRANSLATION_EVAL_DOCS]))


def translation_prompt(tokenizer_dir: str | Path | None = None) -> str:
    """The lm-eval ``doc_to_text`` for one pair: SFT's instruction in the chat template.

    The same rendering SFT trains on (the tokenizer's template, else ChatML) with the
    generation prompt, so a chat model is asked the way it was taught; a base model sees
    the same text and has to cope.
    """
    from hebtron.data.chat import DEFAULT_TEMPLATE, ChatTemplate

    marker = "\x00EN\x00"
    messages = translation_messages(marker)
    if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
        from hebtron.data.tokenizer import load_hf_tokenizer

        text = ChatTemplate(load_hf_tokenizer(Path(tokenizer_dir))).render(messages, add_generation_prompt=True)
    else:
        import jinja2

        text = jinja2.Environment().from_string(DEFAULT_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    before, after = text.split(marker)
    return _jinja_literal(before) + "{{en}}" + _jinja_literal(after)


def _jinja_literal(text: str) -> str:
    """``text`` as a Jinja template that renders to itself."""
    return f"{{% raw %}}{text}{{% endraw %}}" if "{" in text or "%" in text else text


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(text) if 3 <= len(s.split()) <= 40]


def next_sentence_items(docs: list[dict[str, Any]], seed: int, n: int = MC_ITEMS) -> list[dict[str, Any]]:
    """(sentence, 4 candidates for the next one) from news paragraphs and Bible chapters."""
    rng = random.Random(f"{seed}:next_sentence")
    by_doc = [(d["source"], _sentences(d["text"])) for d in docs if d["source"] in ("ud-hebrew-htb", "wlc-bible")]
    pool: dict[str, list[tuple[int, str]]] = {}
    for i, (source, sents) in enumerate(by_doc):
        pool.setdefault(source, []).extend((i, s) for s in sents)
    candidates = []
    for i, (source, sents) in enumerate(by_doc):
        pairs = list(zip(sents, sents[1:]))
        rng.shuffle(pairs)
        candidates += [(i, source, a, b) for a, b in pairs[:3]]
    rng.shuffle(candidates)
    items = []
    for doc_i, source, context, true_next in candidates:
        others = [s for j, s in pool[source] if j != doc_i and s != true_next]
        width = len(true_next.split())
        close = [s for s in others if abs(len(s.split()) - width) <= max(2, width // 2)]
        if len(set(close)) < 3:
            continue
        distractors = rng.sample(sorted(set(close)), 3)
        choices = [true_next, *distractors]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(true_next), "source": source})
        if len(items) == n:
            break
    return items


def cloze_items(docs: list[dict[str, Any]], seed: int, n: int = CLOZE_ITEMS) -> list[dict[str, Any]]:
    """Treebank sentences with one Hebrew word blanked and three same-length distractor words."""
    rng = random.Random(f"{seed}:cloze")
    sents = [s for d in docs if d["source"] == "ud-hebrew-htb" for s in _sentences(d["text"])]
    vocab = sorted({w for s in sents for w in s.split() if HEBREW_WORD.match(w)})
    rng.shuffle(sents)
    items = []
    for sent in sents:
        words = sent.split()
        spots = [i for i in range(2, len(words) - 1) if HEBREW_WORD.match(words[i])]
        if len(words) < 6 or not spots:
            continue
        i = rng.choice(spots)
        word = words[i]
        near = [w for w in vocab if w != word and abs(len(w) - len(word)) <= 1]
        if len(near) < 3:
            continue
        options = [word, *rng.sample(near, 3)]
        rng.shuffle(options)
        rest = " ".join(words[i + 1:])
        items.append({
            "prefix": " ".join(words[:i]),
            "choices": [f"{w} {rest}" for w in options],
            "words": options,
            "label": options.index(word),
        })
        if len(items) == n:
            break
    return items


def _q(value: str) -> str:
    """A YAML double-quoted scalar (JSON strings are valid YAML)."""
    return json.dumps(value, ensure_ascii=False)


def _task_yamls(data: dict[str, Path], prompt: str) -> dict[str, str]:
    meta = "metadata:\n  version: 1.0\n  built_by: hebtron data demo\n"
    common_mc = (
        "output_type: multiple_choice\n"
        "test_split: test\n"
        "doc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
    )
    return {
        "hebrew_mini_translation": (
            "# English -> Hebrew UI strings held out of SFT, asked as SFT asks them (chat template), scored with chrF.\n"
            f"# data: {LICENSES['hebrew_mini_translation']}\n"
            "task: hebrew_mini_translation\n"
            "dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {_q(str(data['translation']))}\n"
            "test_split: test\n"
            "process_docs: !function hebtron.demo.minisuite.translation_docs\n"
            "output_type: generate_until\n"
            f"doc_to_text: {_q(prompt)}\n"
            "doc_to_target: \"{{he}}\"\n"
            "generation_kwargs:\n  until: [\"<|im_end|>\", \"\\n\"]\n  max_gen_toks: 24\n  do_sample: false\n"
            "metric_list:\n  - {metric: chrf, aggregation: chrf, higher_is_better: true}\n" + meta
        ),
        "hebrew_mini_next_sentence": (
            "# Which of four sentences really follows (UD Hebrew-HTB news, Westminster Leningrad Codex).\n"
            f"# data: {LICENSES['hebrew_mini_next_sentence']}\n"
            "task: hebrew_mini_next_sentence\n"
            "dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {_q(str(data['next_sentence']))}\n"
            "doc_to_text: \"{{context}}\"\n" + common_mc
            + "  - {metric: acc_mutual_info, aggregation: mean, higher_is_better: true}\n" + meta
        ),
        "hebrew_mini_cloze": (
            "# UD Hebrew-HTB sentence with one word blanked: pick the word (scored with the rest of the sentence).\n"
            f"# data: {LICENSES['hebrew_mini_cloze']}\n"
            "task: hebrew_mini_cloze\n"
            "dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {_q(str(data['cloze']))}\n"
            "doc_to_text: \"{{prefix}}\"\n" + common_mc + meta
        ),
        GROUP: (
            "# The offline Hebrew mini suite (hebtron data demo); gate policy: eval/suites/hebrew-mini.gate.yaml\n"
            f"group: {GROUP}\n"
            "task:\n" + "".join(f"  - {t}\n" for t in TASKS) + "metadata:\n  version: 1.0\n"
        ),
    }


def build_mini_suite(data_dir: str | Path, out_dir: str | Path, seed: int = 0,
                     tokenizer_dir: str | Path | None = None) -> dict[str, Any]:
    """Write the mini suite's data and task YAMLs; return a manifest (also written as manifest.json).

    ``tokenizer_dir`` supplies the chat template of the translation prompt (default ChatML).
    """
    data_dir, out_dir = Path(data_dir).resolve(), Path(out_dir).resolve()
    docs = read_jsonl(data_dir / "he_valid.jsonl")
    translation = ensure_translation_split(data_dir, seed)
    n_translation = len(read_jsonl(translation))
    if n_translation < 3:
        raise UserError(f"{translation}: {n_translation} pairs; the translation task needs at least 3")
    next_items = next_sentence_items(docs, seed)
    cloze = cloze_items(docs, seed)
    for name, items in (("next_sentence", next_items), ("cloze", cloze)):
        if len(items) < 10:
            raise UserError(f"{data_dir / 'he_valid.jsonl'}: only {len(items)} {name} items could be built (need 10)")
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    (out_dir / "tasks").mkdir(parents=True, exist_ok=True)
    paths = {"translation": translation, "next_sentence": out_dir / "data" / "next_sentence.jsonl",
             "cloze": out_dir / "data" / "cloze.jsonl"}
    write_jsonl(paths["next_sentence"], next_items)
    write_jsonl(paths["cloze"], cloze)
    for name, text in _task_yamls(paths, translation_prompt(tokenizer_dir)).items():
        write_text(out_dir / "tasks" / f"{name}.yaml", text)
    digest = hashlib.sha256()
    for p in paths.values():
        digest.update(p.read_bytes())
    manifest = {
        "builder_version": BUILDER_VERSION,
        "seed": seed,
        "group": GROUP,
        "tasks_dir": str(out_dir / "tasks"),
        "tasks": {
            "hebrew_mini_translation": {"docs": min(n_translation, TRANSLATION_EVAL_DOCS), "file": str(translation),
                                        "license": LICENSES["hebrew_mini_translation"]},
            "hebrew_mini_next_sentence": {"docs": len(next_items), "file": str(paths["next_sentence"]),
                                          "license": LICENSES["hebrew_mini_next_sentence"]},
            "hebrew_mini_cloze": {"docs": len(cloze), "file": str(paths["cloze"]),
                                  "license": LICENSES["hebrew_mini_cloze"]},
        },
        "data_sha256": digest.hexdigest()[:16],
        "note": "derived from CC BY-NC-SA 4.0 treebank text: non-commercial use only, never commit or redistribute",
    }
    write_manifest(out_dir / "manifest.json", manifest)
    return manifest
