"""Arena databases for the tests, written through the same store the app uses (no model needed)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import closing
from pathlib import Path

from hebtron.eval import arena_store

HE_ANSWERS = ("שמירת הקובץ נכשלה", "לא ניתן לשמור", "הורדה כארכיון", "על אודות הליבה", "רשימת התורמים",
              "להסיר את כל נקודות העצירה?", "פתיחת קובץ חדש", "הגדרות מתקדמות")


def hebrew_answer(model: int, prompt: int) -> str:
    return f"{HE_ANSWERS[(model * 3 + prompt) % len(HE_ANSWERS)]} ({prompt})"


def make_arena(root: Path, models: list[str], prompts: list[str],
               answer: Callable[[int, int], str] = hebrew_answer) -> Path:
    """An arena directory: every model answered every prompt; returns the directory."""
    root.mkdir(parents=True, exist_ok=True)
    with closing(arena_store.connect(root, create=True)) as conn:
        ids = arena_store.add_prompts(conn, [([{"role": "user", "content": p}], "he", None) for p in prompts])
        for m, name in enumerate(models):
            model_id = arena_store.add_model(conn, name, f"/ckpt/{name}", {"sampling": {"temperature": 0.7}})
            arena_store.add_answers(conn, model_id, [(pid, answer(m, i), 3, "stop", i) for i, pid in enumerate(ids)])
    return root


def cast(root: Path, outcomes: list[tuple[str, str, str]], voter_prefix: str = "v") -> None:
    """Votes (left model, right model, outcome), each by its own voter, on prompts in turn."""
    with closing(arena_store.connect(root)) as conn:
        ids = {m.name: m.id for m in arena_store.models(conn)}
        prompts = [r[0] for r in conn.execute("SELECT id FROM prompts ORDER BY id")]
        for n, (a, b, outcome) in enumerate(outcomes):
            assert arena_store.record_vote(conn, prompts[n % len(prompts)], ids[a], ids[b], outcome,
                                           f"{voter_prefix}{n:031x}"[-32:])
