"""Hugging Face NemotronH checkpoints in and out.

On disk a NemotronH checkpoint is ``config.json`` plus safetensors (one file, or shards with
``model.safetensors.index.json``) whose names are ``backbone.layers.N.mixer...`` with one tensor
per routed expert (``mixer.experts.E.up_proj.weight``). hebtron stacks the experts of a layer
into one 3-D tensor; everything else has the same name. Files written by transformers 5 with
its in-memory names (``model.`` prefix, stacked experts) load too. Multi-token-prediction
weights (``mtp.*``) are not modelled and are skipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hebtron.errors import CheckpointError, UserError
from hebtron.jsonio import read_json_object
from hebtron.model.config import HybridConfig
from hebtron.model.decoder import HybridModel

_EXPERT_STACKED = re.compile(r"^(backbone\.layers\.\d+\.mixer\.experts)\.(up_proj|down_proj)$")
_EXPERT_ON_DISK = re.compile(r"^(backbone\.layers\.\d+\.mixer\.experts)\.(\d+)\.(up_proj|down_proj)\.weight$")
_SKIPPED_PREFIXES = ("mtp.",)
INDEX_NAME = "model.safetensors.index.json"


# ----------------------------------------------------------------------------- reading
class _SafetensorsDir:
    """Lazy view over the tensors of a checkpoint directory: name -> (file, key)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        index = path / INDEX_NAME
        if index.is_file():
            files = self._index(index)
        else:
            shards = sorted(path.glob("*.safetensors"))
            if not shards:
                raise CheckpointError(f"{path}: no *.safetensors files and no {INDEX_NAME}")
            files = {}
            for shard in shards:
                for name in self._keys(shard):
                    files[name] = shard
        self.files = {_canonical(name): (f, name) for name, f in files.items()}

    @staticmethod
    def _index(index: Path) -> dict[str, Path]:
        """Tensor name -> shard file of ``model.safetensors.index.json``; one line naming the
        index and ``weight_map`` when it is not an object of names to files in this directory."""
        weight_map = read_json_object(index, "safetensors index", CheckpointError).get("weight_map")
        if not isinstance(weight_map, dict):
            got = "missing" if weight_map is None else f"got {type(weight_map).__name__}"
            raise CheckpointError(f"{index}: weight_map: expected an object of tensor name -> shard file, {got}")
        files: dict[str, Path] = {}
        for name, fname in weight_map.items():
            if not isinstance(fname, str) or not fname or Path(fname).name != fname:
                raise CheckpointError(f"{index}: weight_map[{name!r}]: expected a shard file name in "
                                      f"{index.parent}, got {str(fname)[:80]!r}")
            files[name] = index.parent / fname
        return files

    @staticmethod
    def _keys(shard: Path) -> list[str]:
        try:
            with safe_open(str(shard), framework="pt") as handle:
                return list(handle.keys())
        except FileNotFoundError:
            raise CheckpointError(f"{shard}: listed in the checkpoint but missing") from None
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{shard}: not a readable safetensors file ({err})") from None

    def names(self) -> set[str]:
        return set(self.files)

    def get(self, name: str) -> torch.Tensor:
        shard, key = self.files[name]
        try:
            with safe_open(str(shard), framework="pt") as handle:
                return handle.get_tensor(key)
        except FileNotFoundError:
            raise CheckpointError(f"{shard}: listed in {INDEX_NAME} but missing") from None
        except Exception as err:
            raise CheckpointError(f"{shard}: cannot read tensor {key!r} ({err})") from None


def _canonical(name: str) -> str:
    """Map transformers-5 in-memory names onto the on-disk convention."""
    if name.startswith("model."):
        name = "backbone." + name[len("model.") :]
    return name


def _disk_names_for(name: str, tensor_shape: torch.Size) -> list[str]:
    """On-disk tensor names that make up one hebtron state-dict entry."""
    match = _EXPERT_STACKED.match(name)
    if match:
        prefix, proj = match.groups()
        return [f"{prefix}.{e}.{proj}.weight" for e in range(tensor_shape[0])]
    return [name]


def load_hf_state_dict(path: str | Path, config: HybridConfig) -> dict[str, torch.Tensor]:
    """Read and check every tensor the model needs; one clear error for a missing or misshaped key."""
    path = Path(path)
    source = _SafetensorsDir(path)
    with torch.device("meta"):
        expected = HybridModel(config).state_dict()
    available = source.names()
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}
    for name, ref in expected.items():
        if name == "lm_head.weight" and config.tie_word_embeddings and name not in available:
            continue
        stacked_name = name if name in available else None
        if stacked_name is not None:  # transformers-5 layout or a plain tensor
            tensor = source.get(name)
            used.add(name)
        else:
            parts = _disk_names_for(name, ref.shape)
            missing = [p for p in parts if p not in available]
            if missing:
                raise CheckpointError(f"{path}: missing tensor {missing[0]!r} (needed for {name}; check config.json)")
            pieces = [source.get(p) for p in parts]
            used.update(parts)
            tensor = torch.stack(pieces) if _EXPERT_STACKED.match(name) else pieces[0]
        if tuple(tensor.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(ref.shape)} from config.json"
            )
        out[name] = tensor
    unexpected = sorted(n for n in available - used if not n.startswith(_SKIPPED_PREFIXES))
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor {unexpected[0]!r} (does config.json match the weights?)")
    return out


def load_hf(path: str | Path, dtype: torch.dtype | None = torch.float32) -> HybridModel:
    """Load a HF NemotronH checkpoint directory into a :class:`HybridModel`.

    ``dtype`` casts floating-point weights (fp32 master weights for training by default;
    None keeps the stored dtype). The expert-bias buffer always stays fp32.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    config = HybridConfig.from_json_file(path / "config.json")
    state = load_hf_state_dict(path, config)
    with torch.device("meta"):
        model = HybridModel(config)
    for name, tensor in state.items():
        if tensor.is_floating_point() and dtype is not None and not name.endswith("e_score_correction_bias"):
            state[name] = tensor.to(dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.backbone.embeddings.weight
    leftover = [n for n, p in model.state_dict().items() if p.is_meta]
    if leftover:
        raise CheckpointError(f"{path}: missing tensor {leftover[0]!r}")
    return model


# ----------------------------------------------------------------------------- writing
def to_hf_tensors(model: HybridModel, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(on-disk name, tensor) pairs; experts split, tied head written as its own copy."""
    return hf_tensors_from_state(model.state_dict(), dtype)


def hf_tensors_from_state(
    state: dict[str, torch.Tensor], dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """The same for a full state dict (e.g. gathered from FSDP shards for a checkpoint)."""
    for name, tensor in state.items():
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point() and not name.endswith("e_score_correction_bias"):
            tensor = tensor.to(dtype)
        if _EXPERT_STACKED.match(name):
            for disk_name, piece in zip(_disk_names_for(name, tensor.shape), tensor.unbind(0)):
                yield disk_name, piece.contiguous().clone()
        else:
            yield name, tensor.contiguous().clone()


def save_hf(
    model: HybridModel,
    path: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write a directory that ``NemotronHForCausalLM.from_pretrained(path)`` loads.

    Written into a temporary sibling and renamed into place, so a crash never leaves half a
    checkpoint under ``path``. Shards with an index when larger than ``max_shard_bytes``.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():  # never replace a file the user has with a directory
        raise UserError(f"{path}: exists and is not a directory; expected an output directory for the HF checkpoint")
    if any(p.is_file() for p in path.parents):
        raise UserError(f"{path}: {next(p for p in path.parents if p.is_file())} is a file, not a directory")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in to_hf_tensors(model, dtype):
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        total = 0
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update({name: fname for name in shard})
            total += sum(t.numel() * t.element_size() for t in shard.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2), encoding="utf-8")
    hf_config = model.config.to_hf_dict()
    stored = dtype or next(model.parameters()).dtype
    hf_config["torch_dtype"] = str(stored).removeprefix("torch.")
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True), encoding="utf-8")
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(path)
    return path
