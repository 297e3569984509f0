"""A Hugging Face NemotronH directory for any checkpoint path a user gives: one place for every
command that reads weights (export, eval, monitor probe, convert, SFT's ``model.hf_path``).

- a HF directory, or a native ``step_N`` (already HF layout): itself;
- a Megatron-backend ``step_N``, or a checkpoints directory whose latest is one: its conversion,
  made once and cached as ``step_N/hf/`` (:mod:`hebtron.backends.megatron.hf_export`, imported only
  for Megatron checkpoints; it needs no megatron-core and no process groups);
- a native FSDP2 ``step_N`` (sharded ``dcp/``): likewise, converted once into ``step_N/hf/``
  (:mod:`hebtron.backends.native_sharded`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from hebtron.checkpoints import CheckpointRef, is_megatron_checkpoint, is_sharded_checkpoint, resolve_checkpoint


@dataclass(frozen=True)
class HFCheckpoint:
    """``ref``: what the user's path resolved to (``step_N`` or HF directory, with its trainer
    state); ``hf_dir``: a HF directory holding those weights (``ref.path`` unless converted)."""

    ref: CheckpointRef
    hf_dir: Path

    @property
    def converted(self) -> bool:
        return self.hf_dir != self.ref.path

    @property
    def weights_ref(self) -> CheckpointRef:
        """``ref`` pointing at the HF weights: tokenizer lookups try files there, then the recorded one."""
        return replace(self.ref, path=self.hf_dir)


def hf_checkpoint(path: str | os.PathLike) -> HFCheckpoint:
    """Resolve ``path`` (see module doc); one-line CheckpointError for anything else."""
    ref = resolve_checkpoint(path)
    if is_megatron_checkpoint(ref.path):
        from hebtron.backends.megatron.hf_export import cached_hf_dir

        return HFCheckpoint(ref, cached_hf_dir(ref))
    if is_sharded_checkpoint(ref.path):
        from hebtron.backends.native_sharded import cached_hf_dir as sharded_hf_dir

        return HFCheckpoint(ref, sharded_hf_dir(ref))
    return HFCheckpoint(ref, ref.path)


def hf_directory(path: str | os.PathLike) -> Path:
    """The HF directory for ``path`` (see module doc)."""
    return hf_checkpoint(path).hf_dir


def export_hf(checkpoint: str | os.PathLike, out: str | os.PathLike, dtype: str | None = None) -> Path:
    """``hebtron export``: a training checkpoint of either backend -> HF directory ``out`` with the
    tokenizer and (SFT runs) the chat template."""
    ref = resolve_checkpoint(checkpoint)
    if is_megatron_checkpoint(ref.path):
        from hebtron.backends.megatron.hf_export import export_megatron

        return export_megatron(ref.path, out, dtype)
    from hebtron.train.export import export_checkpoint

    if is_sharded_checkpoint(ref.path):  # gathered here, once, never at save time
        return export_checkpoint(ref.path, Path(out), dtype, weights=hf_directory(ref.path))
    return export_checkpoint(ref.path, Path(out), dtype)
