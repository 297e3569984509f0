"""Export a training checkpoint as a Hugging Face NemotronH directory with its tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from hebtron.errors import CheckpointError
from hebtron.model.hf import load_hf, save_hf
from hebtron.train.checkpoint import find_latest, load_checkpoint
from hebtron.train.setup import load_tokenizer


def resolve_checkpoint(path: Path) -> Path:
    """A ``step_N`` directory, or the latest complete one under a checkpoints directory."""
    if (path / "config.json").is_file():
        return path
    latest = find_latest(path) if path.is_dir() else None
    if latest is None:
        raise CheckpointError(f"{path}: not a checkpoint and holds no complete checkpoint")
    return latest


def export_checkpoint(checkpoint: Path, out: Path, dtype: str | None = None) -> Path:
    ckpt = resolve_checkpoint(checkpoint)
    _, _, extra = load_checkpoint(ckpt, load_optimizer=False)
    model = load_hf(ckpt, dtype=None)
    save_hf(model, out, dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype or ""))
    tokenizer_path = extra.get("tokenizer")
    if tokenizer_path:
        tokenizer = load_tokenizer(Path(tokenizer_path))
        if extra.get("chat_template"):  # an SFT checkpoint: serve it with the template it learned
            tokenizer.chat_template = extra["chat_template"]
        tokenizer.save_pretrained(str(out))
    return out
