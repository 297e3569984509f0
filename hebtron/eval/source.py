"""Find the weights and tokenizer behind a checkpoint path given to ``hebtron eval run``.

Accepted: a training checkpoint ``step_N`` (its ``trainer_state.json`` names the tokenizer), a
run's checkpoints directory (its latest complete checkpoint), or a Hugging Face NemotronH
directory that carries its tokenizer (``hebtron export`` output, a hub snapshot).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hebtron.errors import CheckpointError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "tekken.json")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights and tokenizer live; ``step`` is None for HF directories."""

    model_dir: Path
    tokenizer_dir: Path
    step: int | None
    is_training_checkpoint: bool


def has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def resolve_source(path: str | Path, tokenizer: str | Path | None = None) -> ModelSource:
    """Resolve ``path`` (see module doc); ``tokenizer`` overrides the one recorded with it."""
    from hebtron.train.checkpoint import checkpoint_problem, find_latest

    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or model directory")
    if not (path / "config.json").is_file():
        latest = find_latest(path) if path.is_dir() else None
        if latest is None:
            raise CheckpointError(f"{path}: not a model directory (no config.json) and holds no complete checkpoint")
        path = latest
    state_file = path / "trainer_state.json"
    step = None
    recorded = None
    if state_file.is_file():
        problem = checkpoint_problem(path)
        if problem is not None:
            raise CheckpointError(problem)
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
            step = int(state["step"])
            recorded = state.get("extra", {}).get("tokenizer")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{state_file}: unreadable trainer state ({err})") from None
    if tokenizer is not None:
        tok_dir = Path(tokenizer).expanduser().resolve()
    elif has_tokenizer(path):
        tok_dir = path
    elif recorded:
        tok_dir = Path(recorded).expanduser().resolve()
    else:
        raise CheckpointError(
            f"{path}: no tokenizer files and none recorded in trainer_state.json; pass --tokenizer DIR"
        )
    if tok_dir.is_file():
        tok_dir = tok_dir.parent
    if not has_tokenizer(tok_dir):
        raise CheckpointError(f"{tok_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    return ModelSource(path, tok_dir, step, state_file.is_file())
