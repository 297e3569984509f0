"""Export a training checkpoint as a Hugging Face NemotronH directory with its tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from hebtron.checkpoints import STATE_FILE, resolve_checkpoint
from hebtron.data.tokenizer import load_hf_tokenizer
from hebtron.errors import CheckpointError
from hebtron.model.hf import load_hf, save_hf


def export_checkpoint(checkpoint: Path, out: Path, dtype: str | None = None) -> Path:
    """``checkpoint`` (a ``step_N`` or a checkpoints directory: its latest) -> HF directory ``out``."""
    ref = resolve_checkpoint(checkpoint)
    if not ref.is_training_checkpoint:
        raise CheckpointError(f"{ref.path}: already a Hugging Face directory (no {STATE_FILE}); nothing to export")
    model = load_hf(ref.path, dtype=None)
    save_hf(model, out, dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype or ""))
    if ref.recorded_tokenizer is not None:
        tokenizer = load_hf_tokenizer(ref.recorded_tokenizer)
        if ref.extra.get("chat_template"):  # an SFT checkpoint: serve it with the template it learned
            tokenizer.chat_template = ref.extra["chat_template"]
        tokenizer.save_pretrained(str(out))
    return out
