"""The demo's arena step: CPT and SFT answers to held-out translation prompts, ready to vote on.

It runs what a team runs after training: ``hebtron arena generate`` on the two checkpoints, with
the prompt the SFT data taught (:func:`hebtron.demo.sft_data.translation_messages`) on strings
no training conversation contained. Voting is for people: the demo prints the ``serve`` command.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from hebtron.arena.generate import Sampling, generate_arena
from hebtron.demo.files import read_jsonl
from hebtron.demo.sft_data import translation_messages

PROMPTS = 20
SAMPLING = Sampling(temperature=0.7, top_p=0.95, max_new_tokens=24, seed=0)
BATCH = 20


def write_prompts(test_file: Path, out: Path, n: int = PROMPTS) -> Path:
    """The first ``n`` held-out English strings as translation requests (JSONL the arena reads)."""
    rows = [r for r in read_jsonl(test_file) if isinstance(r.get("en"), str) and r["en"].strip()][:n]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"messages": translation_messages(r["en"]), "lang": "he",
                                       "id": r.get("source")}, ensure_ascii=False) + "\n" for r in rows),
                   encoding="utf-8")
    return out


def build_demo_arena(demo_root: Path, checkpoints: list[tuple[str, str]], test_file: Path) -> dict[str, Any]:
    """A fresh ``DEMO_ROOT/arena`` (the demo's checkpoints are new on every run); prints what it did."""
    arena_dir = demo_root / "arena"
    shutil.rmtree(arena_dir, ignore_errors=True)
    prompts = write_prompts(test_file, arena_dir / "prompts.jsonl")
    summary = generate_arena(checkpoints, prompts, arena_dir, SAMPLING, batch_size=BATCH, progress=False)
    for name, m in summary["models"].items():
        print(f"  {name}: {m['new_answers']} answers, {m['tokens']} tokens, {m['seconds']} s")
    models = " ".join(f"{name}={ckpt}" for name, ckpt in checkpoints)
    print(f"    = hebtron arena generate --models {models} --prompts {prompts} --out {arena_dir} "
          f"--max-new-tokens {SAMPLING.max_new_tokens} --batch-size {BATCH}")
    print(f"  vote: hebtron arena serve {arena_dir}  (open http://127.0.0.1:8088/), "
          f"then: hebtron arena results {arena_dir}")
    return {"dir": str(arena_dir), "db": summary["db"], "prompts": summary["prompts"], "models": summary["models"]}
