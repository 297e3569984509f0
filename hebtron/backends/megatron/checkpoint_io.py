"""Whole-checkpoint conversion on disk: HF NemotronH directory <-> Megatron distributed checkpoint.

The Megatron side is written with whole tensors (one process); Megatron reads any tp / ep / pp
slice of it, so one converted checkpoint serves every parallel layout. hebtron stores the HF
``config.json`` beside the shards as ``hebtron_config.json`` so the way back needs no flags.
On a machine without CUDA the CPU compatibility layer is applied first (Megatron's checkpoint
writer assumes a GPU); on GPU machines nothing is patched. The way back
(:func:`megatron_to_hf_dir`) needs neither: it reads the files with ``torch.distributed.checkpoint``
on one process (:mod:`.hf_export`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from hebtron.backends.megatron.convert import hf_to_megatron, save_canonical
from hebtron.checkpoints import write_manifest
from hebtron.errors import CheckpointError
from hebtron.model.config import HybridConfig

CONFIG_NAME = "hebtron_config.json"


def _prepare() -> None:
    if not torch.cuda.is_available():
        from hebtron.backends.megatron import compat

        compat.apply()
    from hebtron.backends.megatron import runtime

    runtime.init_distributed()


def hf_dir_to_megatron(hf_dir: str | Path, out: str | Path) -> Path:
    """Convert a HF NemotronH checkpoint directory; written to a temporary sibling, then renamed."""
    from hebtron.model.hf import load_hf_state_dict

    hf_dir, out = Path(hf_dir), Path(out)
    config = HybridConfig.from_json_file(hf_dir / "config.json")
    state = load_hf_state_dict(hf_dir, config)
    canon = hf_to_megatron(state, config)
    _prepare()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_canonical(canon, tmp)
    (tmp / CONFIG_NAME).write_text(json.dumps(config.to_hf_dict(), indent=2, sort_keys=True), encoding="utf-8")
    write_manifest(tmp)  # vouches for the pickled .metadata: megatron-to-hf reads it back without --trust-checkpoint
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def megatron_to_hf_dir(
    checkpoint: str | Path, out: str | Path, model_config: str | Path | None = None, dtype: str | None = None
) -> Path:
    """``hebtron convert megatron-to-hf``: a Megatron ``step_N``, checkpoints directory (latest) or
    distributed checkpoint -> a complete HF directory (weights, config, and for training
    checkpoints the tokenizer and chat template), streamed one layer at a time
    (:func:`hebtron.backends.megatron.hf_export.export_megatron`)."""
    from hebtron.backends.megatron.hf_export import export_megatron

    return export_megatron(checkpoint, out, dtype=dtype, model_config=model_config)


class LazyHFState(Mapping):
    """hebtron's native state names over a HF NemotronH directory, read tensor by tensor
    (experts stacked on demand). Every rank of a large run reads only what it needs."""

    _EXPERT = re.compile(r"^(backbone\.layers\.\d+\.mixer\.experts)\.(up_proj|down_proj)$")

    def __init__(self, hf_dir: str | Path, config: HybridConfig) -> None:
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            self.files = {name: self.dir / fname for name, fname in weight_map.items()}
        else:
            self.files = {}
            for shard in sorted(self.dir.glob("*.safetensors")):
                with safe_open(str(shard), framework="pt") as handle:
                    self.files.update({name: shard for name in handle.keys()})
        if not self.files:
            raise CheckpointError(f"{self.dir}: no safetensors weights")
        self.files = {("backbone." + k[len("model."):] if k.startswith("model.") else k): (f, k)
                      for k, f in self.files.items()}
        self.config = config
        self._names = sorted({self._EXPERT.sub(r"\1.\2", _stacked_name(k)) for k in self.files})

    def _read(self, name: str) -> torch.Tensor:
        try:
            path, key = self.files[name]
        except KeyError:
            raise KeyError(name) from None
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(key)

    def __getitem__(self, name: str) -> torch.Tensor:
        match = self._EXPERT.match(name)
        if match and name not in self.files:
            prefix, proj = match.groups()
            return torch.stack([self._read(f"{prefix}.{e}.{proj}.weight") for e in range(self.config.n_routed_experts)])
        return self._read(name)

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _stacked_name(disk_name: str) -> str:
    """``...experts.7.up_proj.weight`` -> ``...experts.up_proj`` (other names unchanged)."""
    return re.sub(r"^(backbone\.layers\.\d+\.mixer\.experts)\.\d+\.(up_proj|down_proj)\.weight$", r"\1.\2", disk_name)
