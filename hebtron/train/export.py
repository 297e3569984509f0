"""Export a training checkpoint as a Hugging Face NemotronH directory with its tokenizer.

:func:`export_checkpoint` handles native checkpoints (already HF-layout weights);
:func:`save_export_tokenizer` is what every export adds beside the weights (the tokenizer the run
recorded and, for SFT runs, the chat template it trained with), shared with the Megatron export
(``hebtron.backends.megatron.hf_export``) so both write the same directory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hebtron.checkpoints import STATE_FILE, CheckpointRef, is_megatron_checkpoint, resolve_checkpoint
from hebtron.data.tokenizer import load_hf_tokenizer
from hebtron.errors import CheckpointError
from hebtron.model.hf import load_hf, save_hf


def save_export_tokenizer(ref: CheckpointRef, out: Path) -> bool:
    """Write the tokenizer ``ref``'s run recorded into ``out``, with the SFT chat template when the
    checkpoint has one (so ``apply_chat_template`` on the export renders what it trained on).
    Returns False when the checkpoint records no tokenizer; a one-line UserError when the recorded
    one does not load."""
    if ref.recorded_tokenizer is None:
        return False
    tokenizer = load_hf_tokenizer(ref.recorded_tokenizer)
    if ref.extra.get("chat_template"):  # an SFT checkpoint: serve it with the template it learned
        tokenizer.chat_template = ref.extra["chat_template"]
    tokenizer.save_pretrained(str(out))
    return True


def export_checkpoint(checkpoint: Path, out: Path, dtype: str | None = None, weights: Path | None = None) -> Path:
    """Native ``checkpoint`` (a ``step_N`` or a checkpoints directory: its latest) -> HF directory
    ``out``; ``weights``: a HF directory holding its weights when the step directory does not (a
    sharded checkpoint's conversion). Megatron checkpoints go through
    ``hebtron.backends.hf_dirs.export_hf``."""
    ref = resolve_checkpoint(checkpoint)
    if not ref.is_training_checkpoint:
        raise CheckpointError(f"{ref.path}: already a Hugging Face directory (no {STATE_FILE}); nothing to export")
    if is_megatron_checkpoint(ref.path):
        raise CheckpointError(f"{ref.path}: a Megatron checkpoint; export it with `hebtron export` "
                              "(hebtron.backends.hf_dirs.export_hf)")
    model = load_hf(weights or ref.path, dtype=None)
    save_hf(model, out, dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype or ""))
    save_export_tokenizer(ref, out)
    return out
