"""The suite-completion tasks (issue 16): all 11 AlephBench configurations, TED EN<->HE translation
and generative NER on NEMO and BMC. The tasks are built by lm-eval itself from their YAMLs on local
stand-in rows; their metrics are checked against sacrebleu called directly and against entity
counts worked out by hand. (lm-eval validate and a real-model run over every hub task, these
included, are in tests/test_eval_tasks.py.)"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import sacrebleu
import yaml

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "eval" / "tasks" / "hebrew"
DATASETS = yaml.safe_load((ROOT / "eval" / "datasets.yaml").read_text(encoding="utf-8"))
# The AlephBench card's `configs` list (huggingface.co/datasets/HebArabNlpProject/AlephBench, snapshot 2026-05-11).
ALEPHBENCH_CONFIGS = {"arc_heb", "copa_heb", "hellaswag_heb", "mmlu_heb", "gsm8k_heb", "Winograd", "HebNLI",
                      "HebrewSentiment", "Hebrew-QA", "ted_heb", "israeli_trivia"}


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"hebrew_task_{name}", TASK_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_task(name: str, rows: list[dict], tmp_path: Path):
    """lm-eval's own task object for TASK_DIR/name.yaml, reading `rows` (every split) from local JSONL."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    files = {}
    for split in DATASETS["hub"][name]["splits"]:
        path = tmp_path / f"{name}.{split}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        files[split] = str(path)
    cfg = load_yaml(TASK_DIR / f"{name}.yaml")
    cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": files})
    return ConfigurableTask(config=cfg)


def score(task, predictions: list[str]) -> dict[str, float]:
    """Each metric of `task` aggregated over its test docs, given one generation per doc."""
    docs = list(task.test_docs())
    assert len(docs) == len(predictions)
    per_doc = [task.process_results(doc, [pred]) for doc, pred in zip(docs, predictions, strict=True)]
    return {metric: agg([r[metric] for r in per_doc]) for metric, agg in task.aggregation().items()}


# ----------------------------------------------------------------------------- AlephBench
def test_all_eleven_alephbench_configurations_have_a_task_in_the_group():
    from lm_eval.tasks._yaml_loader import load_yaml

    aleph = {}
    for path in TASK_DIR.glob("*.yaml"):
        cfg = load_yaml(path)
        if cfg.get("dataset_path") == "HebArabNlpProject/AlephBench":
            aleph[cfg["dataset_name"]] = cfg["task"]
    assert set(aleph) == ALEPHBENCH_CONFIGS
    assert set(load_yaml(TASK_DIR / "_alephbench.yaml")["task"]) == set(aleph.values())
    core = load_yaml(TASK_DIR / "_hebrew_core.yaml")["task"]
    assert {"alephbench", "ted_en_he", "ted_he_en", "nemo_ner", "bmc_ner"} <= set(core)
    for name in ("alephbench_hebnli", "alephbench_hebrew_sentiment", "alephbench_hebrew_qa", "ted_en_he",
                 "ted_he_en", "nemo_ner", "bmc_ner"):
        info = DATASETS["hub"][name]
        assert info["license"] and info["url"] and info["columns_from"] in ("card", "assumed"), name


def test_new_alephbench_configurations_read_their_rows_and_stop_on_unknown_columns(tmp_path):
    nli = build_task("alephbench_hebnli", [{"premise": "ירד גשם.", "hypothesis": "הרחוב יבש.", "label": "contradiction"},
                                           {"translation1": "הוא רץ.", "translation2": "הוא זז.",
                                            "hebrew_label": "entailment"}], tmp_path)
    assert [d["label"] for d in nli.test_docs()] == [2, 0]
    sentiment = build_task("alephbench_hebrew_sentiment", [{"text": "נהדר", "label": "Positive"},
                                                           {"text": "גרוע", "label": "Negative"}], tmp_path)
    assert [d["label"] for d in sentiment.test_docs()] == [0, 1]
    qa = build_task("alephbench_hebrew_qa", [{"context": "חיפה שוכנת למרגלות הכרמל.", "question": "איפה?",
                                              "answers": ["למרגלות הכרמל"]}], tmp_path)
    assert score(qa, ["למרגלות הכרמל."]) == {"exact_match": 1.0, "f1": 1.0, "tlnls": 1.0}
    with pytest.raises(ValueError, match=r"^alephbench_hebnli: no premise column .*rows have hypothesis, label, "
                                         r"sentence_a\); update eval/tasks/hebrew/utils.py$"):
        build_task("alephbench_hebnli", [{"sentence_a": "א", "hypothesis": "ב", "label": "neutral"}], tmp_path)


# ----------------------------------------------------------------------------- TED translation
TED_ROWS = [
    {"translations": {"language": ["en", "fr", "he"], "translation": ["Thank you so much, Chris.",
                                                                      "Merci beaucoup, Chris.", "תודה רבה לך, כריס."]},
     "talk_name": "a"},
    {"translations": {"language": ["de", "en"], "translation": ["Hallo.", "Hello."]}, "talk_name": "b"},  # no Hebrew
    {"translations": {"language": ["en", "he"], "translation": ["It is an honor to be here.", "זה כבוד להיות כאן."]},
     "talk_name": "c"},
    {"translations": {"language": ["en", "he"], "translation": ["I love this city.", "אני אוהב את העיר הזאת."]},
     "talk_name": "d"},
]


@pytest.mark.parametrize("name,source,ref_lang,predictions", [
    ("ted_en_he", "en", "he", ["תודה רבה לך כריס.", "זה כבוד גדול להיות פה.", "אני אוהב את העיר הזאת."]),
    ("ted_he_en", "he", "en", ["Thanks a lot, Chris.", "It is an honor to be here.", "I like this town."]),
])
def test_ted_bleu_and_chrf_are_sacrebleus_corpus_scores(tmp_path, name, source, ref_lang, predictions):
    task = build_task(name, TED_ROWS, tmp_path)
    docs = list(task.test_docs())
    by_lang = [dict(zip(r["translations"]["language"], r["translations"]["translation"], strict=True)) for r in TED_ROWS]
    pairs = [lang for lang in by_lang if "he" in lang and "en" in lang]  # the talk without Hebrew is dropped
    assert [d["source"] for d in docs] == [p[source] for p in pairs]
    refs = [p[ref_lang] for p in pairs]
    assert [d["target"] for d in docs] == refs
    assert task.doc_to_text(docs[0]).startswith("English:" if source == "en" else "Hebrew:")
    got = score(task, predictions)
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [refs]).score)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(predictions, [refs]).score)
    assert 0 < got["bleu"] < 100 and 0 < got["chrf"] < 100
    perfect = score(task, refs)
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["chrf"] == pytest.approx(100.0)


def test_ted_stops_on_rows_without_translations(tmp_path):
    with pytest.raises(ValueError, match=r"^ted_en_he: no translations column and no en/he columns "
                                         r"\(rows have source_text, talk_name\)"):
        build_task("ted_en_he", [{"source_text": "x", "talk_name": "t"}], tmp_path)


# ----------------------------------------------------------------------------- NER
def test_tags_to_entities_reads_bioes_bio_and_iob1():
    ner = _module("ner")
    tokens = ["משה", "ויינקרנץ", "ביקר", "בתל", "אביב", "ובחיפה", "."]
    bioes = ["B-PER", "E-PER", "O", "B-GPE", "E-GPE", "S-GPE", "O"]
    want = [("PER", "משה ויינקרנץ"), ("GPE", "בתל אביב"), ("GPE", "ובחיפה")]
    assert ner.tags_to_entities(tokens, bioes) == want
    assert ner.tags_to_entities(tokens, ["B-PER", "I-PER", "O", "B-GPE", "I-GPE", "B-GPE", "O"]) == want  # BIO
    assert ner.tags_to_entities(tokens, ["I-PER", "I-PER", "O", "I-GPE", "I-GPE", "B-GPE", "O"]) == want  # IOB1
    assert ner.tags_to_entities(["א", "ב"], ["B-ORG", "I-PER"]) == [("ORG", "א"), ("PER", "ב")]  # type change splits
    assert ner.tags_to_entities(["א"], ["O"]) == []


def test_entity_line_format_round_trips_and_junk_counts_as_wrong():
    ner = _module("ner")
    entities = [("PER", "דוד בן גוריון"), ("ORG", "הכנסת")]
    line = ner.format_entities(entities)
    assert line == "PER: דוד בן גוריון; ORG: הכנסת"
    assert ner.parse_entities(line + "\nPER: ignored") == entities
    assert ner.parse_entities(" [per] : דוד בן גוריון. ;ORG:הכנסת") == entities
    assert ner.format_entities([]) == "אין" and ner.parse_entities("אין.") == [] and ner.parse_entities("") == []
    assert ner.parse_entities("שלום עולם") == [("?", "שלום עולם")]
    assert ner.parse_entities('ORG: בית״ר') == [("ORG", 'בית"ר')]  # gershayim read as a quote


NER_ROWS = [  # NEMO's columns; raw_tags as on the card
    {"id": "0", "tokens": ["חניכיו", "של", "משה", "ויינקרנץ", "ישקיפו", "מתל", "אביב", "."],
     "sentence": "חניכיו של משה ויינקרנץ ישקיפו מתל אביב .",
     "raw_tags": ["O", "O", "B-PER", "E-PER", "O", "B-GPE", "E-GPE", "O"], "ner_tags": [0, 0, 1, 2, 0, 3, 4, 0]},
    {"id": "1", "tokens": ["הכל", "תלוי", "בהפועל", "חולון", "."], "sentence": "הכל תלוי בהפועל חולון .",
     "raw_tags": ["O", "O", "B-ORG", "E-ORG", "O"], "ner_tags": [0, 0, 5, 6, 0]},
    {"id": "2", "tokens": ["חבל", "שהליגה", "יוצאת", "לפגרה", "."], "sentence": "חבל שהליגה יוצאת לפגרה .",
     "raw_tags": ["O", "O", "O", "O", "O"], "ner_tags": [0, 0, 0, 0, 0]},
    {"id": "3", "tokens": ["נתקלו", "בקמבל", "."], "sentence": "נתקלו בקמבל .",
     "raw_tags": ["O", "S-PER", "O"], "ner_tags": [0, 7, 0]},
]


def test_ner_entity_f1_matches_hand_counts(tmp_path):
    task = build_task("nemo_ner", NER_ROWS, tmp_path)
    docs = list(task.test_docs())
    assert [d["target"] for d in docs] == ["PER: משה ויינקרנץ; GPE: מתל אביב", "ORG: בהפועל חולון", "אין",
                                           "PER: בקמבל"]
    prompt = task.fewshot_context(docs[3], num_fewshot=0)
    assert prompt.startswith("מצא את הישויות") and prompt.endswith("משפט: נתקלו בקמבל .\nישויות:")
    predictions = ["PER: משה ויינקרנץ; GPE: תל אביב",   # 1 exact; "תל אביב" matches only without the prefix מ
                   "ORG: בהפועל חולון; PER: חולון",     # 1 exact, 1 spurious
                   "אין",                              # nothing to find, nothing found
                   "PER: קמבל"]                         # prefix-only match
    # exact: TP 1+1+0+0 = 2, predicted 2+2+0+1 = 5, gold 2+1+0+1 = 4; prefix-tolerant TP 2+1+0+1 = 4
    got = score(task, predictions)
    assert got["entity_precision"] == pytest.approx(2 / 5)
    assert got["entity_recall"] == pytest.approx(2 / 4)
    assert got["entity_f1"] == pytest.approx(2 * (2 / 5) * (2 / 4) / (2 / 5 + 2 / 4))  # = 4/9
    assert got["entity_f1_prefix"] == pytest.approx(2 * 4 / (5 + 4))
    assert score(task, [d["target"] for d in docs])["entity_f1"] == 1.0
    assert score(task, ["אין"] * 4) == {"entity_f1": 0.0, "entity_precision": 0.0, "entity_recall": 0.0,
                                        "entity_f1_prefix": 0.0}


def test_ner_reads_classlabel_ids_and_stops_on_unknown_columns(tmp_path):
    from datasets import ClassLabel, Dataset, Features, List, Value

    ner = _module("ner")
    names = ["O", "B-LOC", "I-LOC", "E-LOC", "S-DATE"]
    ds = Dataset.from_dict({"tokens": [["ביום", "שני", "בים", "המלח"]], "ner_tags": [[4, 0, 1, 3]]},
                           features=Features({"tokens": List(Value("string")), "ner_tags": List(ClassLabel(names=names))}))
    docs = ner.bmc_docs(ds)
    assert docs[0]["entity_texts"] == ["ביום", "בים המלח"] and docs[0]["entity_types"] == ["DATE", "LOC"]
    assert docs[0]["sentence"] == "ביום שני בים המלח"
    with pytest.raises(ValueError, match=r"^bmc_ner: column ner_tags holds label ids and the dataset has no label names"):
        ner.bmc_docs(Dataset.from_dict({"tokens": [["א"]], "ner_tags": [[1]]}))
    with pytest.raises(ValueError, match=r"^nemo_ner: no NER tags column \(looked for raw_tags, ner_tags, tags, "
                                         r"labels; rows have bio, id, tokens\); update eval/tasks/hebrew/ner.py$"):
        build_task("nemo_ner", [{"id": "0", "tokens": ["א"], "bio": ["O"]}], tmp_path)
