"""Find the weights and tokenizer behind a checkpoint path given to ``hebtron eval run``.

Accepted: a training checkpoint ``step_N`` (its ``trainer_state.json`` names the tokenizer), a
run's checkpoints directory (its latest complete checkpoint), or a Hugging Face NemotronH
directory that carries its tokenizer (``hebtron export`` output, a hub snapshot). The lookup
itself is :func:`hebtron.checkpoints.resolve_checkpoint`, shared with export and the probe.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hebtron.checkpoints import checkpoint_tokenizer, resolve_checkpoint


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights and tokenizer live; ``step`` is None for HF directories."""

    model_dir: Path
    tokenizer_dir: Path
    step: int | None
    is_training_checkpoint: bool


def resolve_source(path: str | Path, tokenizer: str | Path | None = None) -> ModelSource:
    """Resolve ``path`` (see module doc); ``tokenizer`` overrides the one recorded with it."""
    ref = resolve_checkpoint(path)
    return ModelSource(ref.path, checkpoint_tokenizer(ref, tokenizer), ref.step, ref.is_training_checkpoint)
