"""A tiny tokenizer, prepared indexed datasets and a recipe, built once per test session."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import yaml

WORDS_HE = "שלום עולם ספר בית ילד מים אור לחם עיר דרך שמש ים הר עץ".split()
WORDS_EN = "hello world book house child water light bread city road sun sea hill tree".split()


def _docs(words: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 60))) for _ in range(n)]


def build_training_fixture(root: Path) -> Path:
    """Writes tokenizer/, data/{he,en}_{train,valid} and returns the directory."""
    from hebtron.data.indexed import prepare
    from hebtron.data.tokenizer import train_tokenizer

    if (root / "ready").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for lang, words in (("he", WORDS_HE), ("en", WORDS_EN)):
        for split, n, seed in (("train", 300, 1), ("valid", 20, 2)):
            path = root / f"{lang}_{split}.jsonl"
            path.write_text(
                "".join(json.dumps({"text": t, "lang": lang}, ensure_ascii=False) + "\n" for t in _docs(words, n, seed)),
                encoding="utf-8",
            )
            files[f"{lang}_{split}"] = path
    train_tokenizer([files["he_train"], files["en_train"]], 400, root / "tokenizer")
    for name, path in files.items():
        prepare([path], str(root / "tokenizer"), root / "data" / name)
    (root / "ready").write_text("ok")
    return root


TINY_MODEL = dict(
    hidden_size=32, hybrid_override_pattern="M*E", mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8,
    n_groups=1, conv_kernel=4, chunk_size=16, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, moe_shared_expert_intermediate_size=16,
)


def write_recipe(fixture: Path, run_dir: Path, **train_overrides) -> Path:
    train = dict(
        global_batch=8, micro_batch=4, lr=3e-3, min_lr=3e-4, schedule="wsd", warmup_tokens=256,
        total_steps=12, precision="fp32", seed=7, eval_interval=4, eval_batches=2,
    )
    train.update(train_overrides)
    recipe = {
        "model": {"init": TINY_MODEL},
        "tokenizer": {"path": str(fixture / "tokenizer")},
        "data": {
            "seq_len": 32,
            "sources": [
                {"name": "he", "path": str(fixture / "data" / "he_train"), "weight": 0.7, "lang": "he"},
                {"name": "en", "path": str(fixture / "data" / "en_train"), "weight": 0.3, "lang": "en"},
            ],
            "valid": [{"name": "he_valid", "path": str(fixture / "data" / "he_valid"), "lang": "he"}],
        },
        "train": train,
        "checkpoint": {"interval": 4, "keep_last": 2},
        "logging": {"run_dir": str(run_dir), "log_interval": 1, "tensorboard": False, "progress": False},
    }
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def run_two_ranks(script: str | Path, *args: str, timeout: int = 600):
    """``script`` on 2 gloo ranks under torchrun (``--standalone``: its own free rendezvous port),
    one thread each; the completed process."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(repo)}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), *args],
        cwd=repo, env=env, capture_output=True, text=True, timeout=timeout,
    )


def stop_saves(text: str, signum: int) -> list[int]:
    """The steps at which a run stopped on ``signum`` with that step's checkpoint on disk, from its
    log: saved for the stop, or already saved because the signal landed on an interval step (the
    loop then does not save twice, and says so)."""
    pattern = (rf"signal {signum}: (?:saving a checkpoint at step (\d+) and stopping"
               rf"|stopping at step (\d+) \(its checkpoint is on disk\))")
    return [int(a or b) for a, b in re.findall(pattern, text)]
