"""A tiny tokenizer, chat conversations and SFT recipes for the chat / packing / SFT tests."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import yaml

WORDS_HE = "שלום עולם ספר בית ילד מים אור לחם עיר דרך שמש ים הר עץ קובץ שמירה הגדרות".split()
WORDS_EN = "hello world book house child water light bread city road sun sea hill tree file save settings".split()


def _sentence(rng: random.Random, words: list[str], lo: int = 1, hi: int = 8) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))


def build_chat_tokenizer(root: Path) -> Path:
    """A 500-token byte-level BPE with hebtron's specials (ChatML ids 4 and 5)."""
    from hebtron.data.tokenizer import train_tokenizer

    out = root / "tokenizer"
    if (out / "tokenizer.json").is_file():
        return out
    rng = random.Random(0)
    corpus = root / "corpus.txt"
    root.mkdir(parents=True, exist_ok=True)
    corpus.write_text("\n".join(_sentence(rng, WORDS_HE + WORDS_EN, 3, 20) for _ in range(400)), encoding="utf-8")
    train_tokenizer([corpus], 500, out)
    return out


def conversation(rng: random.Random, turns: int | None = None, system: bool | None = None,
                 hi: int = 8) -> list[dict[str, str]]:
    """A random multi-turn conversation (English questions, Hebrew answers)."""
    turns = turns if turns is not None else rng.randint(1, 3)
    system = system if system is not None else rng.random() < 0.4
    messages = [{"role": "system", "content": "You translate: " + _sentence(rng, WORDS_EN, 1, 3)}] if system else []
    for _ in range(turns):
        messages.append({"role": "user", "content": _sentence(rng, WORDS_EN, 1, hi)})
        messages.append({"role": "assistant", "content": _sentence(rng, WORDS_HE, 1, hi)})
    return messages


def write_chat_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def chat_records(n: int, seed: int, hi: int = 8) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"messages": conversation(rng, hi=hi), "lang": "he"} for _ in range(n)]


TINY_MODEL = dict(
    hidden_size=32, hybrid_override_pattern="M*E-", mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8,
    n_groups=1, conv_kernel=4, chunk_size=16, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    intermediate_size=48, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
    moe_shared_expert_intermediate_size=16,
)


def write_sft_recipe(root: Path, run_dir: Path, train: Path, valid: Path, tokenizer: Path,
                     model: dict[str, Any] | None = None, sft: dict[str, Any] | None = None, **train_overrides) -> Path:
    """An SFT recipe for a tiny model: 8 rows of 128 tokens per step."""
    train_section = dict(global_batch=8, micro_batch=4, lr=1e-2, min_lr=1e-3, schedule="cosine", warmup_tokens=256,
                         total_steps=8, precision="fp32", seed=7, eval_interval=4, eval_batches=2)
    train_section.update(train_overrides)
    recipe = {
        "model": model if model is not None else {"init": TINY_MODEL},
        "tokenizer": {"path": str(tokenizer)},
        "data": {
            "seq_len": 128,
            "sources": [{"name": "chat", "path": str(train), "lang": "he"}],
            "valid": [{"name": "chat_valid", "path": str(valid), "lang": "he"}],
        },
        "sft": sft if sft is not None else {},
        "train": train_section,
        "checkpoint": {"interval": 4, "keep_last": 0},
        "logging": {"run_dir": str(run_dir), "log_interval": 1, "tensorboard": False, "progress": False},
    }
    path = root / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    return path
