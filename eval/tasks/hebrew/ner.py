"""Generative named-entity recognition for Hebrew (NEMO, BMC): ``!function ner.*`` in the YAMLs.

The model reads a sentence and writes its entities on one line, ``TYPE: text; TYPE: text``
(``אין`` when there are none). :func:`parse_entities` reads that line back; gold entities come
from the dataset's BIOES/BIO token tags. Scores are entity-level and micro-averaged over the
split (precision, recall, F1 over (type, text) pairs, as seqeval counts spans): each document
contributes ``(true positives, predicted, gold)`` and the aggregations sum them. ``entity_f1_prefix``
also accepts a prediction that differs from the gold span only by Hebrew clitic prefixes on its
first word (NEMO's token-level spans keep them: the gold ``בקמבל`` for the person ``קמבל``).

Standard library only, so plain ``lm-eval --include_path eval/tasks/hebrew`` runs these tasks.
"""

from __future__ import annotations

import collections
import re
import unicodedata

NO_ENTITIES = "אין"
_NONE_WORDS = {"", NO_ENTITIES, "none", "no entities", "-", "—", "אין ישויות"}
_PREFIX_LETTERS = set("ובכלמשה")
_ITEM = re.compile(r"^\[?\s*([A-Za-z]+)\s*\]?\s*[:：]\s*(.+)$")
_QUOTES = str.maketrans({"״": '"', "”": '"', "“": '"', "׳": "'", "’": "'", "‘": "'"})
_EDGE_PUNCT = " \t.,;:!?()[]{}<>«»\"'-–—"



# ----------------------------------------------------------------------------- text
def clean(text) -> str:
    """Compare entity text without niqqud, quote-style or edge-punctuation differences."""
    text = unicodedata.normalize("NFKD", str(text))
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn").translate(_QUOTES)
    return " ".join(text.split()).strip(_EDGE_PUNCT)


def _prefix_forms(text: str) -> set[str]:
    """The text and its forms with 1-3 clitic prefix letters removed from the first word."""
    forms = {text}
    for k in range(1, 4):
        head = text.split(" ", 1)[0]
        if len(head) - k >= 2 and all(ch in _PREFIX_LETTERS for ch in head[:k]):
            forms.add(text[k:])
    return forms


# ----------------------------------------------------------------------------- tags -> entities
def tags_to_entities(tokens, tags) -> list[tuple[str, str]]:
    """(type, text) spans from BIOES/BIOSE, BILOU, IOB2 or IOB1 tags, in sentence order."""
    spans, start, kind = [], None, None

    def close(end):
        nonlocal start, kind
        if start is not None:
            spans.append((kind, " ".join(str(t) for t in tokens[start:end])))
        start, kind = None, None

    for i, tag in enumerate(str(t).strip() for t in tags):
        if tag in ("O", "") or "-" not in tag:
            close(i)
            continue
        mark, label = tag.split("-", 1)
        mark = mark.upper()
        if mark in ("S", "U"):
            close(i)
            spans.append((label, str(tokens[i])))
        elif mark == "B" or kind != label:  # a continuation of another type opens a span (IOB1)
            close(i)
            start, kind = i, label
            if mark in ("E", "L"):
                close(i + 1)
        elif mark in ("E", "L"):
            close(i + 1)
    close(len(tags))
    return spans


def format_entities(entities) -> str:
    """The answer line the prompt asks for: ``TYPE: text; TYPE: text`` or ``אין``."""
    return "; ".join(f"{kind}: {text}" for kind, text in entities) or NO_ENTITIES


def parse_entities(output) -> list[tuple[str, str]]:
    """Read the model's line back; an item that is not ``TYPE: text`` counts as a wrong entity."""
    line = str(output).strip().splitlines()[0] if str(output).strip() else ""
    if clean(line).lower() in _NONE_WORDS:
        return []
    entities = []
    for item in (part.strip() for part in line.split(";")):
        if not item:
            continue
        match = _ITEM.match(item)
        entities.append((match.group(1).upper(), clean(match.group(2))) if match else ("?", clean(item)))
    return entities


# ----------------------------------------------------------------------------- scoring
def match_counts(predicted, gold) -> tuple[int, int]:
    """(exact matches, matches allowing clitic prefixes): one-to-one, by type and text."""
    pred = collections.Counter((k, clean(t)) for k, t in predicted)
    want = collections.Counter((k, clean(t)) for k, t in gold)
    exact = pred & want
    left_pred = list((pred - exact).elements())
    left_gold = list((want - exact).elements())
    lenient = 0
    for kind, text in left_pred:
        forms = _prefix_forms(text)
        for j, (g_kind, g_text) in enumerate(left_gold):
            if g_kind == kind and (g_text in forms or text in _prefix_forms(g_text)):
                lenient += 1
                del left_gold[j]
                break
    n_exact = sum(exact.values())
    return n_exact, n_exact + lenient


def ner_results(doc, results):
    """Per document: (true positives, predicted, gold) for each entity metric."""
    gold = list(zip(doc["entity_types"], doc["entity_texts"], strict=True))
    predicted = parse_entities(results[0] if results else "")
    exact, lenient = match_counts(predicted, gold)
    counts = (exact, len(predicted), len(gold))
    return {"entity_f1": counts, "entity_precision": counts, "entity_recall": counts,
            "entity_f1_prefix": (lenient, len(predicted), len(gold))}


def _sums(items):
    tp = sum(i[0] for i in items)
    return tp, sum(i[1] for i in items), sum(i[2] for i in items)


def micro_f1(items) -> float:
    """2·TP / (predicted + gold) over the split; 1.0 when there was nothing to find and nothing found."""
    tp, n_pred, n_gold = _sums(items)
    return 2 * tp / (n_pred + n_gold) if n_pred + n_gold else 1.0


def micro_precision(items) -> float:
    tp, n_pred, n_gold = _sums(items)
    return tp / n_pred if n_pred else float(n_gold == 0)


def micro_recall(items) -> float:
    tp, n_pred, n_gold = _sums(items)
    return tp / n_gold if n_gold else 1.0


# ----------------------------------------------------------------------------- datasets
def _column(row: dict, names, what: str, task: str):
    for name in names:
        if name in row and row[name] is not None:
            return name
    raise ValueError(f"{task}: no {what} column (looked for {', '.join(names)}; rows have "
                     f"{', '.join(sorted(row))}); update eval/tasks/hebrew/ner.py")


def _label_names(dataset, column: str):
    feature = getattr(dataset, "features", {}) or {}
    inner = getattr(feature.get(column), "feature", None)
    return list(getattr(inner, "names", None) or [])


def ner_docs(dataset, task: str):
    """Rows with tokens and BIOES/BIO tags (strings, or ClassLabel ids) -> sentence, gold entities, target."""
    first = next(iter(dataset), None)
    if first is None:
        return dataset
    tokens_col = _column(first, ["tokens", "words"], "tokens", task)
    tags_col = _column(first, ["raw_tags", "ner_tags", "tags", "labels"], "NER tags", task)
    names = _label_names(dataset, tags_col)

    def row(doc):
        tokens, tags = list(doc[tokens_col]), list(doc[tags_col])
        if tags and not isinstance(tags[0], str):
            if not names:
                raise ValueError(f"{task}: column {tags_col} holds label ids and the dataset has no label "
                                 "names; update eval/tasks/hebrew/ner.py")
            tags = [names[int(t)] for t in tags]
        if len(tags) != len(tokens):
            raise ValueError(f"{task}: {len(tokens)} tokens but {len(tags)} tags in row {doc.get('id', '?')}")
        entities = tags_to_entities(tokens, tags)
        sentence = doc.get("sentence") or " ".join(str(t) for t in tokens)
        return {"sentence": str(sentence), "entity_types": [k for k, _ in entities],
                "entity_texts": [t for _, t in entities], "target": format_entities(entities)}

    return dataset.map(row, remove_columns=dataset.column_names)


def nemo_docs(dataset):
    return ner_docs(dataset, "nemo_ner")


def bmc_docs(dataset):
    return ner_docs(dataset, "bmc_ner")
