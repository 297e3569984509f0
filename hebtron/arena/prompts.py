"""The arena's prompt file: JSONL, one prompt a line, checked with one-line errors.

A line is ``{"prompt": "text"}`` (one user turn) or ``{"messages": [{"role", "content"}, ...]}``
(a conversation ending with a user turn), with optional ``"id"`` (a label shown nowhere to
voters) and ``"lang"`` (e.g. ``"he"``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hebtron.errors import UserError

ROLES = ("system", "user", "assistant")
MAX_PROMPT_CHARS = 20_000


@dataclass(frozen=True)
class ArenaPrompt:
    messages: list[dict[str, str]]
    lang: str | None
    label: str | None


def _messages(record: dict, where: str) -> list[dict[str, str]]:
    if "prompt" in record:
        if not isinstance(record["prompt"], str) or not record["prompt"].strip():
            raise UserError(f"{where}: prompt: expected a non-empty string")
        return [{"role": "user", "content": record["prompt"]}]
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: expected a 'prompt' string or a non-empty 'messages' list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: messages[{i}]: expected {{'role': one of {', '.join(ROLES)}, 'content': str}}")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise UserError(f"{where}: messages[{len(out) - 1}].role: the last turn must be 'user' (the models answer it)")
    return out


def read_prompts(path: str | Path) -> list[ArenaPrompt]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such prompt file")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                record = json.loads(line)
            except ValueError as err:
                raise UserError(f"{where}: not JSON ({err})") from None
            if not isinstance(record, dict):
                raise UserError(f"{where}: expected a JSON object")
            messages = _messages(record, where)
            if sum(len(m["content"]) for m in messages) > MAX_PROMPT_CHARS:
                raise UserError(f"{where}: prompt longer than {MAX_PROMPT_CHARS:,} characters")
            lang, label = record.get("lang"), record.get("id")
            if lang is not None and not isinstance(lang, str):
                raise UserError(f"{where}: lang: expected a string such as 'he'")
            prompts.append(ArenaPrompt(messages, lang, None if label is None else str(label)))
    if not prompts:
        raise UserError(f"{path}: no prompts")
    return prompts
