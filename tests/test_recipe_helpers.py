"""Shared helpers for the recipe tests (no tests here): a small valid recipe and its input files."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

VALID: dict[str, Any] = {
    "model": {"init": {"vocab_size": 512, "hidden_size": 64, "hybrid_override_pattern": "M*E"}},
    "tokenizer": {"path": "tok/tokenizer.json"},
    "data": {
        "seq_len": 64,
        "sources": [
            {"name": "he", "path": "data/he", "weight": 3, "lang": "he"},
            {"name": "en", "path": "data/en.jsonl", "weight": 1, "lang": "en"},
        ],
        "phases": [{"name": "one", "tokens": "2k"}, {"name": "two", "tokens": "2k", "weights": {"en": 0}}],
        "valid": [{"name": "he_valid", "path": "data/he"}],
    },
    "train": {"global_batch": 8, "micro_batch": 2, "lr": 1e-3, "total_tokens": "8k", "warmup_tokens": 512},
    "logging": {"run_dir": "out"},
}


def valid_tree() -> dict[str, Any]:
    return copy.deepcopy(VALID)


def make_inputs(root: Path) -> None:
    """The files ``VALID`` names, relative to ``root``."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "tok").mkdir(parents=True, exist_ok=True)
    for name in ("he.bin", "he.idx"):
        (root / "data" / name).write_bytes(b"\0")
    (root / "data" / "en.jsonl").write_text('{"text": "hello"}\n')
    (root / "tok" / "tokenizer.json").write_text("{}")


def write(path: Path, tree: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def write_recipe(root: Path, tree: dict[str, Any] | None = None, name: str = "recipe.yaml") -> Path:
    """A recipe (``VALID`` unless given) plus its input files, under ``root``."""
    make_inputs(root)
    return write(root / name, valid_tree() if tree is None else tree)
