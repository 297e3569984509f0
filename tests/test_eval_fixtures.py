"""Shared pieces for the eval tests: a tiny tokenizer and hybrid model saved as a training
checkpoint, a synthetic demo corpus, and the mini suite built from it. Built once per session."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DISABLE_MULTIPROC", "1")

HE_WORDS = ("שלום עולם ספר בית ילד מים אור לחם עיר דרך שמש ים הר עץ אבן שדה נהר ארץ שמים "
            "מלך עם יום לילה איש אשה דבר קול").split()
EN_WORDS = "hello world book house child water light bread city road sun sea hill tree".split()
TINY_MODEL = dict(
    hidden_size=32, hybrid_override_pattern="M*E", mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8,
    n_groups=1, conv_kernel=4, chunk_size=16, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, moe_shared_expert_intermediate_size=16,
    initializer_range=0.2,
)


def _sentence(rng: random.Random, words: list[str]) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(5, 12))) + "."


def write_demo_corpus(data_dir: Path, seed: int = 3, docs: int = 24, pairs: int = 200) -> Path:
    """he_valid.jsonl (news-like and Bible-like paragraphs) and ui_pairs.jsonl, like `hebtron data demo`."""
    rng = random.Random(seed)
    data_dir.mkdir(parents=True, exist_ok=True)
    records = [{"text": " ".join(_sentence(rng, HE_WORDS) for _ in range(8)), "lang": "he",
                "source": "ud-hebrew-htb" if i % 2 else "wlc-bible"} for i in range(docs)]
    (data_dir / "he_valid.jsonl").write_text(
        "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in records), encoding="utf-8")
    ui = []
    for i in range(pairs):
        k = rng.randint(1, 3)
        ui.append({"en": " ".join(rng.sample(EN_WORDS, k)) + f" {i}", "he": " ".join(rng.sample(HE_WORDS, k)) + f" {i}",
                   "source": "ui"})
    (data_dir / "ui_pairs.jsonl").write_text(
        "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in ui), encoding="utf-8")
    return data_dir


def build_tiny_checkpoint(root: Path, seed: int = 0) -> Path:
    """tokenizer/ and checkpoints/step_00000007 (a training checkpoint that names its tokenizer)."""
    import torch

    from hebtron.data.tokenizer import train_tokenizer
    from hebtron.model import HybridConfig, HybridModel
    from hebtron.train.checkpoint import save_checkpoint

    ckpt = root / "checkpoints" / "step_00000007"
    if (ckpt / "COMPLETE").is_file():
        return ckpt
    rng = random.Random(seed)
    corpus = root / "corpus.jsonl"
    root.mkdir(parents=True, exist_ok=True)
    corpus.write_text("".join(json.dumps({"text": " ".join(_sentence(rng, HE_WORDS + EN_WORDS) for _ in range(4))},
                                         ensure_ascii=False) + "\n" for _ in range(200)), encoding="utf-8")
    tok = train_tokenizer([corpus], 400, root / "tokenizer")
    config = HybridConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, **TINY_MODEL)
    torch.manual_seed(seed)
    model = HybridModel(config)
    save_checkpoint(root / "checkpoints", 7, model.state_dict(),
                    extra={"tokenizer": str((root / "tokenizer").resolve())},
                    extra_files={"config.json": json.dumps(config.to_hf_dict(), indent=2)})
    return ckpt


def write_suite(path: Path, tasks_dir: Path, **fields) -> Path:
    import yaml

    suite = {"name": "test-mini", "tasks": ["hebrew_mini"], "workdir_include": [str(tasks_dir)],
             "batch_size": 4, "bootstrap_iters": 100, "offline": True,
             "gen_kwargs": {"max_gen_toks": 6}} | fields
    path.write_text(yaml.safe_dump(suite, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def eval_env(tmp_path_factory) -> dict[str, Path]:
    """Tiny checkpoint, mini suite (built from a synthetic corpus) and a suite file using it."""
    from hebtron.demo.minisuite import build_mini_suite

    root = tmp_path_factory.getbasetemp() / "eval_env"  # shared by every module that imports this fixture
    ckpt = build_tiny_checkpoint(root / "model")
    data = root / "data"
    if not (root / "eval" / "manifest.json").is_file():
        write_demo_corpus(data)
        build_mini_suite(data, root / "eval")
    suite = write_suite(root / "test-mini.yaml", root / "eval" / "tasks", limit=8)
    return {"root": root, "checkpoint": ckpt, "data": data, "eval": root / "eval", "suite": suite}
