"""Helpers for hebtron's Hebrew hub tasks (``!function utils.*`` in the YAMLs beside this file).

Self-contained (standard library only), so plain ``lm-eval --include_path eval/tasks/hebrew``
runs these tasks without hebtron installed. Each ``*_docs`` function maps a dataset's rows to
the few fields its YAML renders. Column names come from the dataset cards where they were
found (see ``eval/datasets.yaml``); where a card did not list them, the functions accept
the common spellings and stop with an error naming the columns they did find, so a schema
change shows up as one clear line instead of a silently wrong score.
"""

from __future__ import annotations

import ast
import collections
import json
import re
import unicodedata

LETTERS = "ABCDEFGHIJ"
HEBREW_LETTERS = "אבגדהוזחטי"


# ----------------------------------------------------------------------------- columns
def _lower(doc):
    return {str(k).strip().lower(): v for k, v in doc.items()}


def _present(value):
    return value is not None and value != "" and value != []


def _first(doc, names, what, task):
    for name in names:
        if name in doc and _present(doc[name]):
            return doc[name]
    raise ValueError(
        f"{task}: no {what} column (looked for {', '.join(names)}; rows have {', '.join(sorted(doc))}); "
        "update eval/tasks/hebrew/utils.py"
    )


def _maybe(doc, names):
    for name in names:
        if name in doc and _present(doc[name]):
            return doc[name]
    return None


def _literal(value):
    """A list/dict stored as a JSON or Python-literal string, else the value itself."""
    if isinstance(value, str) and value.strip()[:1] in "[{":
        for parse in (json.loads, ast.literal_eval):
            try:
                return parse(value.strip())
            except (ValueError, SyntaxError):
                continue
    return value


def _truthy(value):
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


# ----------------------------------------------------------------------------- scoring
_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)


def normalize(text):
    """Strip niqqud/cantillation and punctuation, lowercase, collapse spaces."""
    text = unicodedata.normalize("NFKD", str(text))
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn")
    text = _PUNCT.sub(" ", text.lower())
    return " ".join(text.split())


def token_f1(pred, gold):
    p, g = normalize(pred).split(), normalize(gold).split()
    if not p or not g:
        return float(p == g)
    same = sum((collections.Counter(p) & collections.Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def _levenshtein(a, b):
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _similarity(a, b):
    return 1.0 - _levenshtein(a, b) / max(len(a), len(b), 1)


def tlnls(pred, gold):
    """Token-level normalized Levenshtein similarity as a soft F1.

    Every token counts with its best similarity (1 - edit distance / longer length) to the
    other side, so an answer that differs from the gold span only by an attached prefix
    (ו, ה, ב, ל, מ, ש, כ) still earns most of its credit: the HeQ paper's point that plain
    token F1 is too harsh for Hebrew. hebtron's implementation, not the paper's scorer.
    """
    p, g = normalize(pred).split(), normalize(gold).split()
    if not p or not g:
        return float(p == g)
    precision = sum(max(_similarity(t, u) for u in g) for t in p) / len(p)
    recall = sum(max(_similarity(t, u) for u in p) for t in g) / len(g)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def qa_results(doc, results):
    """exact_match / f1 / tlnls of the generation against the best gold answer."""
    pred = results[0] if results else ""
    golds = doc["answers"] or [""]
    return {
        "exact_match": max(float(normalize(pred) == normalize(g)) for g in golds),
        "f1": max(token_f1(pred, g) for g in golds),
        "tlnls": max(tlnls(pred, g) for g in golds),
    }


# ----------------------------------------------------------------------------- HeQ
def _answer_texts(value):
    value = _literal(value)
    if isinstance(value, dict):
        value = value.get("text", value.get("answer_text", []))
    if isinstance(value, str):
        value = [value]
    return [str(v).strip() for v in value or [] if str(v).strip()]


def heq_docs(dataset, task="heq"):
    """Answerable HeQ questions: context, question, answers (list of gold spans)."""
    def row(doc):
        d = _lower(doc)
        answers = _answer_texts(_maybe(d, ["answers", "answer", "answer_text"]) or [])
        return {
            "context": str(_first(d, ["context", "paragraph"], "context", task)),
            "question": str(_first(d, ["question"], "question", task)),
            "answers": answers,
            "answerable": bool(answers) and not _truthy(d.get("is_impossible", False)),
        }
    return dataset.map(row, remove_columns=dataset.column_names).filter(lambda d: d["answerable"])


def alephbench_qa_docs(dataset):
    """AlephBench's Hebrew-QA configuration (HeQ questions; columns assumed to be HeQ's)."""
    return heq_docs(dataset, "alephbench_hebrew_qa")


# ----------------------------------------------------------------------------- classification
SENTIMENT_LABELS = {"positive": 0, "negative": 1, "neutral": 2, "חיובי": 0, "שלילי": 1, "ניטרלי": 2}
NLI_LABELS = {"entailment": 0, "neutral": 1, "contradiction": 2, "היסק": 0, "ניטרלי": 1, "סתירה": 2}


def _label(value, names, task):
    key = str(_literal(value)).strip().strip("[]'\"").lower()
    if key not in names:
        raise ValueError(f"{task}: label {value!r} is not one of {', '.join(sorted(set(names)))}")
    return names[key]


def sentiment_docs(dataset, task="hebrew_sentiment"):
    """HebrewSentiment: text and label 0 positive / 1 negative / 2 neutral."""
    def row(doc):
        d = _lower(doc)
        return {"text": str(_first(d, ["text", "sentence"], "text", task)),
                "label": _label(_first(d, ["tag_ids", "label", "sentiment"], "label", task), SENTIMENT_LABELS, task)}
    return dataset.map(row, remove_columns=dataset.column_names)


def nli_docs(dataset, task="hebnli"):
    """HebNLI: Hebrew premise/hypothesis (translation1/2) and label 0 entailment / 1 neutral / 2 contradiction."""
    def row(doc):
        d = _lower(doc)
        raw = str(_first(d, ["hebrew_label", "original_label", "label", "gold_label"], "label", task)).strip()
        return {"premise": str(_first(d, ["translation1", "premise", "sentence1"], "premise", task)),
                "hypothesis": str(_first(d, ["translation2", "hypothesis", "sentence2"], "hypothesis", task)),
                "raw_label": raw}
    docs = dataset.map(row, remove_columns=dataset.column_names)
    docs = docs.filter(lambda d: d["raw_label"] not in ("", "-"))  # MultiNLI rows without a consensus label
    return docs.map(lambda d: {"label": _label(d["raw_label"], NLI_LABELS, task)})


def alephbench_sentiment_docs(dataset):
    """AlephBench's HebrewSentiment configuration (columns assumed to be HebrewSentiment's or text/label)."""
    return sentiment_docs(dataset, "alephbench_hebrew_sentiment")


def alephbench_nli_docs(dataset):
    """AlephBench's HebNLI configuration (columns assumed to be HebNLI's or premise/hypothesis/label)."""
    return nli_docs(dataset, "alephbench_hebnli")


# ----------------------------------------------------------------------------- AlephBench multiple choice
def _choices(d, task):
    value = _literal(_maybe(d, ["choices", "options", "endings", "answers_list", "candidates"]))
    if isinstance(value, dict):
        texts = _literal(value.get("text", []))
        labels = [str(x) for x in _literal(value.get("label", []))]
        return [str(t) for t in texts], labels
    if isinstance(value, list | tuple):
        return [str(t) for t in value], []
    for group in (["choice1", "choice2", "choice3", "choice4"], ["option1", "option2", "option3", "option4"],
                  ["sol1", "sol2", "sol3", "sol4"], ["a", "b", "c", "d"], ["option_a", "option_b", "option_c", "option_d"]):
        found = [str(d[k]) for k in group if k in d and _present(d[k])]
        if len(found) >= 2:
            return found, []
    raise ValueError(f"{task}: no answer choices (rows have {', '.join(sorted(d))}); update eval/tasks/hebrew/utils.py")


def _query(d, task):
    if "premise" in d and "choice1" in d:  # COPA: the question says whether a cause or an effect is wanted
        connective = " כי" if str(d.get("question", "")).strip().lower() in ("cause", "סיבה") else " ולכן"
        return str(d["premise"]).rstrip(" .") + connective
    if "ctx_a" in d and "ctx_b" in d:  # HellaSwag split context
        return f"{d['ctx_a']} {str(d['ctx_b']).strip()}".strip()
    return str(_first(d, ["question", "query", "ctx", "context", "sentence", "prompt", "text", "input"],
                      "question", task))


def _gold_index(raw, choices, labels):
    """A gold answer as written -> (index, how it was read); index None when unreadable.

    Labels, choice texts and letters give 0-based indices directly; a bare integer is
    returned as written ("int"), its base decided by :func:`mc_docs` over the whole split.
    """
    raw = _literal(raw)
    if isinstance(raw, list) and len(raw) == 1:
        raw = raw[0]
    text = str(raw).strip()
    if labels and text in labels:
        return labels.index(text), "label"
    if text in choices:
        return choices.index(text), "text"
    if len(text) == 1 and text.upper() in LETTERS[: len(choices)]:
        return LETTERS.index(text.upper()), "letter"
    if len(text) == 1 and text in HEBREW_LETTERS[: len(choices)]:
        return HEBREW_LETTERS.index(text), "letter"
    if re.fullmatch(r"-?\d+", text):
        return int(text), "int"
    return None, "unreadable"


def mc_docs(dataset, task="alephbench"):
    """Rows -> query, choices, label (0-based); integer golds are read as 1-based when the data shows it."""
    rows = []
    for doc in dataset:
        d = _lower(doc)
        choices, labels = _choices(d, task)
        raw = _first(d, ["answer", "label", "gold", "answerkey", "answer_key", "correct", "target", "answer_index"],
                     "answer", task)
        gold, how = _gold_index(raw, choices, labels)
        rows.append({"query": _query(d, task), "choices": choices, "gold": gold, "how": how, "raw": str(raw)})
    ints = [r for r in rows if r["how"] == "int"]
    # 1-based only on evidence: no 0 anywhere and some answer equal to the number of choices
    one_based = bool(ints) and min(r["gold"] for r in ints) >= 1 and any(r["gold"] == len(r["choices"]) for r in ints)
    out = {"query": [], "choices": [], "label": []}
    for r in rows:
        gold = r["gold"] - 1 if one_based and r["how"] == "int" else r["gold"]
        if gold is None or not 0 <= gold < len(r["choices"]):
            raise ValueError(f"{task}: answer {r['raw']!r} does not name one of {len(r['choices'])} choices")
        out["query"].append(r["query"])
        out["choices"].append(r["choices"])
        out["label"].append(gold)
    return type(dataset).from_dict(out)


def arc_docs(dataset):
    return mc_docs(dataset, "arc_heb")


def copa_docs(dataset):
    return mc_docs(dataset, "copa_heb")


def hellaswag_docs(dataset):
    return mc_docs(dataset, "hellaswag_heb")


def mmlu_docs(dataset):
    return mc_docs(dataset, "mmlu_heb")


def winograd_docs(dataset):
    return mc_docs(dataset, "winograd_he")


# ----------------------------------------------------------------------------- generation
def gsm8k_docs(dataset):
    """question and answer (a worked solution ending in '#### number', as in GSM8K)."""
    def row(doc):
        d = _lower(doc)
        return {"question": str(_first(d, ["question", "query", "problem"], "question", "gsm8k_heb")),
                "answer": str(_first(d, ["answer", "solution", "target"], "answer", "gsm8k_heb"))}
    return dataset.map(row, remove_columns=dataset.column_names)


def trivia_docs(dataset):
    """Short-answer questions: question and the accepted answers."""
    def row(doc):
        d = _lower(doc)
        answers = _answer_texts(_first(d, ["answer", "answers", "target", "gold"], "answer", "israeli_trivia"))
        return {"question": str(_first(d, ["question", "query", "prompt"], "question", "israeli_trivia")),
                "answers": answers}
    return dataset.map(row, remove_columns=dataset.column_names)


def translation_docs(dataset):
    """English source and Hebrew reference from paired columns or a {'en','he'} translation dict."""
    def row(doc):
        d = _lower(doc)
        pair = _literal(d.get("translation"))
        if isinstance(pair, dict):
            return {"source": str(pair.get("en", "")), "target": str(pair.get("he", ""))}
        return {"source": str(_first(d, ["en", "english", "source", "src"], "English source", "ted_heb")),
                "target": str(_first(d, ["he", "hebrew", "target", "tgt", "reference"], "Hebrew reference", "ted_heb"))}
    return dataset.map(row, remove_columns=dataset.column_names)


def _ted_pair(d, source, target, task):
    """(source, target) text of one TED row, or None when the talk lacks either language."""
    pair = _literal(d.get("translations"))
    if isinstance(pair, dict) and "language" in pair:
        by_lang = dict(zip(pair.get("language") or [], pair.get("translation") or [], strict=False))
    elif isinstance(pair, dict):
        by_lang = pair
    elif source in d or target in d:
        by_lang = d
    else:
        raise ValueError(f"{task}: no translations column and no {source}/{target} columns (rows have "
                         f"{', '.join(sorted(d))}); update eval/tasks/hebrew/utils.py")
    src, tgt = (str(by_lang.get(k) or "").strip() for k in (source, target))
    return (src, tgt) if src and tgt else None


def _ted_docs(dataset, source, target, task):
    """TED talk sentences (NeuLab TED corpus, neulab/ted_multi) that exist in both languages."""
    pairs = [_ted_pair(_lower(doc), source, target, task) for doc in dataset]
    pairs = [p for p in pairs if p]
    return type(dataset).from_dict({"source": [p[0] for p in pairs], "target": [p[1] for p in pairs]})


def ted_en_he_docs(dataset):
    return _ted_docs(dataset, "en", "he", "ted_en_he")


def ted_he_en_docs(dataset):
    return _ted_docs(dataset, "he", "en", "ted_he_en")
