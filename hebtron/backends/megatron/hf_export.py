"""A Megatron-backend checkpoint as a Hugging Face NemotronH directory: one process, bounded memory.

A Megatron distributed checkpoint (``torch_dist``) stores every tensor *whole* (its global
shape) with the shards' offsets in PyTorch's ``.metadata``, so one process reads any tensor at
any saved tp / ep / pp without torchrun or model-parallel groups. :func:`export_megatron` reads
it one layer at a time through ``torch.distributed.checkpoint`` (only that layer's byte ranges),
converts with :mod:`.convert` (QKV de-interleave, in_proj / conv1d concatenation, experts split
per expert on disk) and streams safetensors shards, so memory stays at about one layer plus one
shard. Optimizer state is never read. The result is what a native export writes: weights,
``config.json``, the recorded tokenizer and, for SFT runs, the chat template
(:func:`hebtron.train.export.save_export_tokenizer`).

:func:`cached_hf_dir` keeps one conversion per checkpoint in ``step_N/hf/``, made once even with
concurrent callers (:mod:`hebtron.train.hf_cache`).

Unpickling: ``.metadata`` is a pickle (PyTorch's format). It is read through an allow-list
unpickler that only builds ``torch.distributed.checkpoint``'s metadata classes, ``torch.Size``,
dtypes and layouts; tensor data is read with ``torch.load(weights_only=True)`` by PyTorch's
reader. ``common.pt`` (a full pickle) is never opened.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from hebtron.train.dcp_safe import read_metadata
from hebtron.train.hf_cache import cached_conversion, publish_directory
from hebtron.backends.megatron.checkpoint_io import CONFIG_NAME
from hebtron.backends.megatron.convert import TOP_KEYS, layer_to_hf, top_to_hf
from hebtron.checkpoints import (
    CONFIG_FILE,
    MEGATRON_DIR,
    CheckpointRef,
    fsync_file,
    is_megatron_checkpoint,
    resolve_checkpoint,
    write_text_synced,
)
from hebtron.errors import CheckpointError
from hebtron.model.config import HybridConfig

log = logging.getLogger(__name__)

CONVERTER_VERSION = 1
INDEX_NAME = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.")


# ----------------------------------------------------------------------------- reading
class DistCheckpointReader:
    """The model tensors of a Megatron distributed checkpoint, read whole, a few at a time."""

    def __init__(self, directory: str | Path) -> None:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.dir = Path(directory)
        meta_file = self.dir / "metadata.json"
        try:
            backend = json.loads(meta_file.read_text(encoding="utf-8")).get("sharded_backend")
        except FileNotFoundError:
            raise CheckpointError(f"{self.dir}: not a Megatron distributed checkpoint (no metadata.json)") from None
        except (OSError, ValueError, AttributeError) as err:
            raise CheckpointError(f"{meta_file}: unreadable ({err})") from None
        if backend != "torch_dist":
            raise CheckpointError(f"{meta_file}: sharded_backend {backend!r}; only torch_dist checkpoints convert")
        metadata = read_metadata(self.dir)

        class _Reader(FileSystemReader):
            def read_metadata(self, *args: Any, **kwargs: Any) -> Any:  # parsed once, safely
                metadata.storage_meta.load_id = self.load_id
                return metadata

        self._reader = _Reader(str(self.dir))
        self.tensors: dict[str, Any] = {
            key: md for key, md in metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata) and not key.startswith("optimizer.")
        }

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Whole tensors for ``keys`` (one load: only their byte ranges are read)."""
        import torch.distributed.checkpoint as dcp

        state = {}
        for key in keys:
            md = self.tensors[key]
            state[key] = torch.empty(md.size, dtype=md.properties.dtype)
        if state:
            try:
                with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                    dcp.load(state, storage_reader=self._reader, no_dist=True)
            except Exception as err:  # PyTorch's reader wraps I/O errors in its own CheckpointException
                last = (str(err).strip().splitlines() or [type(err).__name__])[-1]
                raise CheckpointError(f"{self.dir}: cannot read tensor {keys[0]!r} ({last})") from None
        return state


# ----------------------------------------------------------------------------- writing
class _ShardWriter:
    """safetensors shards of at most ``max_bytes``, written as tensors arrive; named and indexed
    like transformers' at the end (the shard count is known only then)."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.dir, self.max_bytes = directory, max_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.size = 0
        self.shards: list[tuple[Path, list[str], int]] = []
        probe = directory / ".mode-probe"  # safetensors writes 0600 files: give shards the umask's mode
        probe.touch()
        self.mode = probe.stat().st_mode & 0o777
        probe.unlink()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.current and self.size + nbytes > self.max_bytes:
            self.flush()
        self.current[name] = tensor
        self.size += nbytes

    def flush(self) -> None:
        if not self.current:
            return
        path = self.dir / f"shard-{len(self.shards):05d}.part"
        save_file(self.current, str(path), metadata={"format": "pt"})
        os.chmod(path, self.mode)
        fsync_file(path)
        self.shards.append((path, list(self.current), self.size))
        self.current, self.size = {}, 0

    def finish(self) -> None:
        self.flush()
        if len(self.shards) == 1:
            self.shards[0][0].rename(self.dir / "model.safetensors")
            return
        weight_map, total = {}, 0
        for i, (path, names, size) in enumerate(self.shards, start=1):
            fname = f"model-{i:05d}-of-{len(self.shards):05d}.safetensors"
            path.rename(self.dir / fname)
            weight_map.update(dict.fromkeys(names, fname))
            total += size
        write_text_synced(self.dir / INDEX_NAME,
                          json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _expected_shapes(config: HybridConfig) -> dict[str, tuple[int, ...]]:
    """hebtron's native state names and shapes for ``config`` (no memory: a meta-device model)."""
    from hebtron.model.decoder import HybridModel

    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in HybridModel(config).state_dict().items()}


def _native_units(reader: DistCheckpointReader, config: HybridConfig) -> Iterator[dict[str, torch.Tensor]]:
    """hebtron-native tensors, one layer (then the embedding, norm and head) at a time; every
    model tensor of the checkpoint must be used."""
    by_layer: dict[int, list[str]] = {}
    top, other = [], []
    for key in reader.tensors:
        m = _LAYER_KEY.match(key)
        if m and int(m.group(1)) < config.num_hidden_layers:
            by_layer.setdefault(int(m.group(1)), []).append(key)
        elif key in TOP_KEYS:
            top.append(key)
        else:
            other.append(key)
    if other:
        raise CheckpointError(f"{reader.dir}: tensor {sorted(other)[0]!r} has no place in a NemotronH model "
                              f"of {config.num_hidden_layers} layers (does the config match the checkpoint?)")
    for i in range(config.num_hidden_layers):
        canon = reader.read(by_layer.get(i, []))
        try:
            yield layer_to_hf(i, canon, config)
        except KeyError as err:
            raise CheckpointError(f"{reader.dir}: missing tensor {err.args[0]!r} for layer {i} "
                                  f"({config.layer_types[i]}; does the config match the checkpoint?)") from None
    canon = reader.read(top)
    try:
        yield top_to_hf(canon, config)
    except KeyError as err:
        raise CheckpointError(f"{reader.dir}: missing tensor {err.args[0]!r}") from None


def write_hf_weights(dist_dir: Path, config: HybridConfig, out: Path, dtype: torch.dtype | None = None,
                     max_shard_bytes: int = 2 * 2**30) -> torch.dtype:
    """Stream the model weights of distributed checkpoint ``dist_dir`` into safetensors shards and
    ``config.json`` in the existing directory ``out``; returns the dtype written."""
    from hebtron.model.hf import hf_tensors_from_state

    reader = DistCheckpointReader(dist_dir)
    expected = _expected_shapes(config)
    writer = _ShardWriter(out, max_shard_bytes)
    stored: torch.dtype | None = None
    seen: set[str] = set()
    for unit in _native_units(reader, config):
        for name, tensor in unit.items():
            want = expected.get(name)
            if want is None or tuple(tensor.shape) != want:
                found = f"shape {tuple(tensor.shape)}, expected {want}" if want else "not in the model"
                raise CheckpointError(f"{dist_dir}: tensor {name!r}: {found} (does the config match the checkpoint?)")
            if stored is None and tensor.is_floating_point():
                stored = tensor.dtype
        seen.update(unit)
        for disk_name, tensor in hf_tensors_from_state(unit, dtype):
            writer.add(disk_name, tensor)
        del unit
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"{dist_dir}: no tensor for {missing[0]!r} (does the config match the checkpoint?)")
    writer.finish()
    written = dtype or stored or torch.float32
    hf_config = config.to_hf_dict()
    hf_config["torch_dtype"] = str(written).removeprefix("torch.")
    write_text_synced(out / CONFIG_FILE, json.dumps(hf_config, indent=2, sort_keys=True))
    return written


# ----------------------------------------------------------------------------- what to convert
@dataclass(frozen=True)
class MegatronSource:
    """A Megatron checkpoint given by a user: its distributed checkpoint and, for a training
    checkpoint ``step_N``, its trainer state (tokenizer, chat template)."""

    dist_dir: Path
    config_file: Path
    ref: CheckpointRef | None


def locate(path: str | Path, model_config: str | Path | None = None) -> MegatronSource:
    """A ``step_N``, a checkpoints directory (its latest), ``step_N/megatron`` or a bare distributed
    checkpoint (``hebtron convert hf-to-megatron`` output); one-line CheckpointError otherwise."""
    path = Path(path).expanduser().resolve()
    ref: CheckpointRef | None = None
    if (path / "metadata.json").is_file():  # a distributed checkpoint itself
        dist_dir = path
        if path.name == MEGATRON_DIR and is_megatron_checkpoint(path.parent):
            ref = resolve_checkpoint(path.parent)
    else:
        if not path.exists():
            raise CheckpointError(f"{path}: no such checkpoint directory")
        ref = resolve_checkpoint(path)
        if not is_megatron_checkpoint(ref.path):
            raise CheckpointError(f"{ref.path}: not a Megatron checkpoint (no {MEGATRON_DIR}/metadata.json)")
        dist_dir = ref.path / MEGATRON_DIR
    owner = ref.path if ref is not None else dist_dir
    candidates = [Path(model_config)] if model_config else [owner / CONFIG_NAME, owner / CONFIG_FILE,
                                                             dist_dir / CONFIG_NAME]
    config_file = next((c for c in candidates if c.is_file()), None)
    if config_file is None:
        shown = candidates[0] if model_config else f"{owner}/{CONFIG_FILE}"
        raise CheckpointError(f"{shown}: missing; pass --model-config with the model's config.json")
    return MegatronSource(dist_dir, config_file, ref)


def _write_export(source: MegatronSource, tmp: Path, dtype: str | None, strict_tokenizer: bool = True) -> None:
    """Weights, config and (when the run recorded one) tokenizer with chat template, into ``tmp``.

    ``strict_tokenizer`` False (the cache): a recorded tokenizer that no longer loads is left out
    with a warning; the caller's tokenizer lookup (``--tokenizer``, the recorded path) decides."""
    from hebtron.errors import UserError
    from hebtron.train.export import save_export_tokenizer

    if dtype not in (None, *DTYPES):
        raise CheckpointError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    config = HybridConfig.from_json_file(source.config_file)
    write_hf_weights(source.dist_dir, config, tmp, DTYPES.get(dtype or ""))
    if source.ref is not None:
        try:
            save_export_tokenizer(source.ref, tmp)
        except UserError as err:
            if strict_tokenizer:
                raise
            log.warning("%s: conversion written without the tokenizer (%s)", tmp, err)
    for f in tmp.iterdir():
        if f.is_file():
            fsync_file(f)


def export_megatron(checkpoint: str | Path, out: str | Path, dtype: str | None = None,
                    model_config: str | Path | None = None) -> Path:
    """Write HF directory ``out`` (replaced atomically) from a Megatron checkpoint (see :func:`locate`)."""
    source = locate(checkpoint, model_config)
    out = Path(out).expanduser().resolve()
    if out == source.dist_dir or source.dist_dir.is_relative_to(out) or (source.ref and out == source.ref.path):
        raise CheckpointError(f"{out}: the output would replace the checkpoint it is converted from")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_export(source, tmp, dtype)
        publish_directory(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- the cache
def cached_hf_dir(ref: CheckpointRef) -> Path:
    """``step_N/hf``: the HF conversion of Megatron checkpoint ``ref``, made on first use (see module doc)."""
    return cached_conversion(ref, f"megatron-{CONVERTER_VERSION}", "Megatron",
                             lambda tmp: _write_export(locate(ref.path), tmp, None, strict_tokenizer=False))
