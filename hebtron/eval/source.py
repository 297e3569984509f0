"""Find the weights and tokenizer behind a checkpoint path given to ``hebtron eval run``.

Accepted: a training checkpoint ``step_N`` of either backend (its ``trainer_state.json`` names the
tokenizer), a run's checkpoints directory (its latest complete checkpoint), or a Hugging Face
NemotronH directory that carries its tokenizer (``hebtron export`` output, a hub snapshot). A
Megatron checkpoint is evaluated on its HF conversion, made once and cached in ``step_N/hf/``.
The lookup itself is :func:`hebtron.backends.hf_dirs.hf_checkpoint`, shared with export, the
probe and SFT.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hebtron.backends.hf_dirs import hf_checkpoint
from hebtron.checkpoints import checkpoint_tokenizer


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights and tokenizer live; ``step`` is None for HF directories.

    ``checkpoint`` is what the path resolved to (the ``step_N`` a gate marks KEEP, or the HF
    directory); ``model_dir`` holds the HF weights (``checkpoint`` itself unless converted)."""

    model_dir: Path
    tokenizer_dir: Path
    step: int | None
    is_training_checkpoint: bool
    checkpoint: Path


def resolve_source(path: str | Path, tokenizer: str | Path | None = None) -> ModelSource:
    """Resolve ``path`` (see module doc); ``tokenizer`` overrides the one recorded with it."""
    found = hf_checkpoint(path)
    ref = found.ref
    return ModelSource(found.hf_dir, checkpoint_tokenizer(found.weights_ref, tokenizer), ref.step,
                       ref.is_training_checkpoint, ref.path)
