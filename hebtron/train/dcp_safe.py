"""Reading ``torch.distributed.checkpoint`` directories without unpickling untrusted data.

A distributed checkpoint's ``.metadata`` is a pickle, and PyTorch's default load planner reads
non-tensor entries (an optimizer's ``param_groups``) with ``torch.load(weights_only=False)``.
Checkpoints handed to ``hebtron eval`` or ``export`` come from anywhere, so two locks:

- provenance: ``.metadata`` is read only from checkpoints hebtron wrote, whose ``COMPLETE``
  manifest recorded its sha256 at save time (:func:`hebtron.checkpoints.pickle_problem`, checked
  on the very bytes then unpickled); anything else needs ``--trust-checkpoint``
  (:func:`trust_unvouched_metadata`). A Megatron resume, where megatron-core reads the pickles
  itself, checks the same hashes first (:func:`check_pickled_files`);
- content: ``.metadata`` is unpickled through an allow-list that only builds
  ``torch.distributed.checkpoint``'s metadata classes, ``torch.Size``, dtypes and layouts
  (:func:`read_metadata`, :func:`safe_reader`), and non-tensor entries load with
  ``weights_only=True`` (:class:`SafeLoadPlanner`). Tensor data is read by PyTorch's reader with
  ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

from hebtron.checkpoints import PICKLED_FILES, pickle_problem
from hebtron.errors import CheckpointError

_trust_unvouched = False


def trust_unvouched_metadata(trust: bool) -> None:
    """``--trust-checkpoint``: read pickled metadata no hebtron manifest vouches for (this process)."""
    global _trust_unvouched
    _trust_unvouched = trust


def check_vouched(path: Path, data: bytes) -> None:
    """One-line CheckpointError unless hebtron's manifest vouches for ``data`` (read from ``path``)
    or ``--trust-checkpoint`` was given."""
    problem = pickle_problem(path, data)
    if problem is not None and not _trust_unvouched:
        raise CheckpointError(
            f"{path}: not read: {problem}; distributed-checkpoint metadata is a pickle, which can run code when "
            "loaded, so hebtron reads it only from checkpoints it wrote; pass --trust-checkpoint if you trust "
            "where this one came from")


def check_pickled_files(directory: Path) -> None:
    """:func:`check_vouched` for every pickled file of a distributed checkpoint directory, before
    a library that unpickles them itself (megatron-core) reads it."""
    for name in PICKLED_FILES:
        path = directory / name
        if path.is_file():
            try:
                data = path.read_bytes()
            except OSError as err:
                raise CheckpointError(f"{path}: unreadable ({err.strerror or err})") from None
            check_vouched(path, data)


class _Placeholder:
    """Stands in for the empty marker classes old Megatron checkpoints pickle (never used)."""

    def __setstate__(self, state: Any) -> None:
        pass


_DCP = "torch.distributed.checkpoint."
_ALLOWED = {
    _DCP + "metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    _DCP + "filesystem": {"_StorageInfo"},
    _DCP + "planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData",
                       "LoadPlan", "ReadItem", "LoadItemType"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset"},
    "pathlib": {"PosixPath", "PurePosixPath"},  # StorageMeta.checkpoint_id of a torch-written checkpoint
}
_PLACEHOLDERS = {("megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata"),
                 ("megatron.core.dist_checkpointing.strategies.torch", "MCoreSavePlan")}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only the classes a distributed checkpoint's ``.metadata`` is made of."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PLACEHOLDERS:
            return _Placeholder
        value = getattr(torch, name, None) if module == "torch" else None
        if isinstance(value, torch.dtype | torch.layout | torch.memory_format):
            return value
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_metadata(directory: Path) -> Any:
    """The ``Metadata`` of a distributed checkpoint, unpickled through the allow-list."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    path = directory / ".metadata"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a distributed checkpoint?)") from None
    except OSError as err:
        raise CheckpointError(f"{path}: unreadable ({err.strerror or err})") from None
    check_vouched(path, data)
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, IndexError, KeyError,
            ImportError, RecursionError, MemoryError, OverflowError) as err:
        raise CheckpointError(f"{path}: not a distributed-checkpoint metadata file ({err})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: not a distributed-checkpoint metadata file ({type(metadata).__name__})")
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    return metadata


def safe_reader(directory: str | Path) -> FileSystemReader:
    """A FileSystemReader of ``directory`` whose metadata comes from :func:`read_metadata`."""
    metadata = read_metadata(Path(directory))

    class _Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:  # parsed once, safely
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return _Reader(str(directory))


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor entries load with ``weights_only=True``."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded
