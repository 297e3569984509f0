"""Language ids: the one fixed mapping from language codes to small integers.

Batches carry a per-token language id so monitors can split router load and loss by
language. The ids are stored on disk (``PREFIX.lang.npy``), so this table only ever grows:
never renumber an existing entry.

``UNKNOWN_LANG`` (-1) marks documents whose language is missing or not in the table, and
positions that hold no real token (padding); monitors treat -1 as "other".
"""

from __future__ import annotations

LANG_IDS: dict[str, int] = {"he": 0, "en": 1, "ar": 2, "ru": 3, "code": 4}
UNKNOWN_LANG: int = -1
LANG_NAMES: dict[int, str] = {v: k for k, v in LANG_IDS.items()} | {UNKNOWN_LANG: "unknown"}


def lang_id(code: str | None) -> int:
    """The id of a language code (``"he"``, ``"en"``, case-insensitive); -1 if unknown or None."""
    if not code:
        return UNKNOWN_LANG
    return LANG_IDS.get(code.strip().lower(), UNKNOWN_LANG)


def lang_name(idx: int) -> str:
    """The code of a language id (``"unknown"`` for -1 or an id not in the table)."""
    return LANG_NAMES.get(int(idx), "unknown")
