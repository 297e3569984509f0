"""Atomic training checkpoints: a crash at any instant leaves the last good one loadable.

The layout (``latest``, ``step_N/``, ``COMPLETE``, ``KEEP``) and every read-only lookup live in
the torch-free :mod:`hebtron.checkpoints`; this module writes and reads the tensors::

    step_00001000/
        model.safetensors     weights (tied tensors stored once, aliases in the metadata)
        optimizer.pt          optimizer state, torch.save; read back with weights_only=True
        trainer_state.json    {"step": ..., "extra": {scheduler, data position, rng, ...}}
        COMPLETE              manifest (file sizes, sha256 of pickled files), written last

A checkpoint is written into ``step_XXXXXXXX.tmp-<host>-<pid>``, every file is fsynced,
``COMPLETE`` goes in last, then the directory is renamed into place and only then is ``latest``
replaced. So ``latest`` can only ever name a directory that already holds a full checkpoint; a
re-saved step is exchanged atomically (or repaired at the next start where the filesystem
cannot exchange: :func:`repair_interrupted_swap`). A writer, right before it writes, removes
scratch entries of crashed writers of its own host (:func:`clean_scratch`); nothing else does,
so a save in progress elsewhere is never touched.

A disk that refuses a save (full, read-only, quota) ends it with one :class:`StorageError` line
(path, errno text, bytes needed vs free) after removing the save's scratch; ``latest`` and every
complete checkpoint stay. :func:`ensure_room` checks the free space against the previous
checkpoint's size before writing, and prunes first where the run asks for it.

These functions take *full* (unsharded) state dicts and are meant to run on one rank (rank 0);
with FSDP2 gather first with ``torch.distributed.checkpoint.state_dict.get_model_state_dict``
/ ``get_optimizer_state_dict`` and ``StateDictOptions(full_state_dict=True, cpu_offload=True)``.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import random
import re
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hebtron.checkpoints import (
    FORMAT_VERSION,
    KEEP_FILE,
    LATEST_FILE,
    STATE_FILE,
    checkpoint_name,
    checkpoint_problem,
    flush_fsync,
    fsync_dir,
    fsync_file,
    list_checkpoints,
    live_leases,
    parse_scratch,
    pid_alive,
    read_pointer,
    read_trainer_state,
    scratch_path,
    scratch_tag,
    stale_scratch,
    step_of,
    this_host,
    write_manifest,
    write_text_synced,
)
from hebtron.jsonio import parse_json
from hebtron.errors import CheckpointError, StorageError
from hebtron.train.storage import free_bytes, previous_checkpoint_bytes, room_error, storage_error

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


# --------------------------------------------------------------------------- writing


def save_checkpoint(
    run_ckpt_dir: str | os.PathLike,
    step: int,
    model_state: Mapping[str, torch.Tensor],
    optimizer_state: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    keep_last: int | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, prune to ``keep_last``.

    ``extra`` must be JSON-serialisable (scheduler, data position, batch size,
    :func:`capture_rng` output, ...). ``keep_last`` of ``None`` or ``0`` keeps everything.
    ``extra_files`` (name -> text) are written beside the weights, e.g. the model's
    ``config.json`` so that a checkpoint directory is also a Hugging Face directory.
    Returns the final checkpoint directory.
    """
    if step < 0:
        raise ValueError(f"save_checkpoint: step must be >= 0, got {step}")
    root = Path(run_ckpt_dir)
    state_json = json.dumps({"format": FORMAT_VERSION, "step": step, "extra": dict(extra or {})})
    tensors, aliases = _dedupe_tensors(model_state)
    tmp = scratch_path(root, checkpoint_name(step))
    with _disk_failures(root, step, tmp, _estimate_bytes(root, tensors, optimizer_state)):
        root.mkdir(parents=True, exist_ok=True)
        clean_scratch(root, include_own=True)
        tmp.mkdir()
        save_file(tensors, str(tmp / MODEL_FILE),
                  metadata={"format": "pt", "hebtron_aliases": json.dumps(aliases)})
        fsync_file(tmp / MODEL_FILE)
        if optimizer_state is not None:
            with open(tmp / OPTIMIZER_FILE, "wb") as fh:
                torch.save(dict(optimizer_state), fh)
                flush_fsync(fh)
        write_text_synced(tmp / STATE_FILE, state_json)
        for fname, text in (extra_files or {}).items():
            write_text_synced(tmp / fname, text)
        final = publish_checkpoint(tmp, root, step, keep_last)
    return final


def _estimate_bytes(root: Path, tensors: Mapping[str, torch.Tensor], optimizer_state: Mapping[str, Any] | None) -> int:
    """What this save will take: the previous checkpoint's size, else the tensors' bytes."""
    previous = previous_checkpoint_bytes(root)
    if previous is not None:
        return previous
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    per_param = (optimizer_state or {}).get("state") or {}
    for value in per_param.values() if isinstance(per_param, Mapping) else ():
        if isinstance(value, Mapping):
            total += sum(t.numel() * t.element_size() for t in value.values() if isinstance(t, torch.Tensor))
    return total


@contextmanager
def _disk_failures(root: Path, step: int, tmp: Path, needed: int | None) -> Iterator[None]:
    """Turn a save that the disk refused (full, read-only, quota) into one StorageError line,
    after removing this save's scratch (``tmp``, ``latest.tmp-*``): ``latest`` and every complete
    checkpoint stay as they were. Other failures propagate unchanged (after the same cleanup)."""
    try:
        yield
    except StorageError:
        raise
    except BaseException as exc:
        removed = _remove_own_scratch(root, tmp)
        if not isinstance(exc, Exception):
            raise
        pointer = read_pointer(root / LATEST_FILE) if (root / LATEST_FILE).is_file() else None
        outcome = (f"the partial {tmp.name} was {'removed' if removed else 'not created'}, "
                   f"latest ({pointer or 'none yet'}) and every complete checkpoint are untouched; "
                   "free space (or set checkpoint.prune_before_save: true), then rerun with --resume auto")
        error = storage_error(exc, action=f"saving checkpoint step {step}", path=tmp, root=root, needed=needed,
                              outcome=outcome)
        if error is None:
            raise
        raise error from None


def _remove_own_scratch(root: Path, tmp: Path) -> bool:
    """Remove ``tmp`` and this process's ``latest`` scratch; whether ``tmp`` existed."""
    existed = tmp.exists()
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        scratch_path(root, LATEST_FILE).unlink(missing_ok=True)
    except OSError:
        pass
    return existed


def save_collectively(
    root: str | os.PathLike,
    step: int,
    rank: int,
    write_shards: Callable[[Path], None],
    extra: Mapping[str, Any],
    extra_files: Mapping[str, str],
    keep_last: int | None = None,
) -> Path:
    """A checkpoint every rank writes part of (its shards), published as :func:`save_checkpoint`
    publishes one: collective, every rank calls it. All ranks write into rank 0's scratch
    directory (``step_N.tmp-<host>-<pid>`` of rank 0, so ranks on other nodes use the same
    name); ``write_shards(tmp)`` is the collective write; rank 0 then adds the trainer state and
    ``extra_files`` and publishes (manifest, rename, ``latest``, pruning). A crash at any point
    leaves the previous checkpoint the newest complete one. Returns the final directory."""
    import torch.distributed as dist

    root = Path(root)
    name = checkpoint_name(step)
    tag = [scratch_tag()]
    dist.broadcast_object_list(tag, src=0)
    tmp = scratch_path(root, name, "tmp", tag[0])
    needed = previous_checkpoint_bytes(root) if rank == 0 else None

    def on_rank0(work: Callable[[], None]) -> None:
        """``work`` on rank 0, its disk failure raised on every rank (one line each)."""
        failure: list[str | None] = [None]
        if rank == 0:
            try:
                with _disk_failures(root, step, tmp, needed):
                    work()
            except StorageError as err:
                failure[0] = str(err)
        dist.broadcast_object_list(failure, src=0)
        if failure[0] is not None:
            raise StorageError(failure[0] if rank == 0 else f"rank {rank}: rank 0 failed: {failure[0]}")

    def make_scratch() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    on_rank0(make_scratch)
    failures: list[str | None] = [None] * dist.get_world_size()
    mine: str | None = None
    try:
        write_shards(tmp)
    except Exception as exc:  # every rank reports, so none waits at a barrier for one that failed
        error = storage_error(exc, action=f"saving checkpoint step {step} (rank {rank}'s shards)", path=tmp,
                              root=root, needed=needed, outcome="the partial scratch directory was removed, "
                              "latest and every complete checkpoint are untouched; rerun with --resume auto once "
                              "there is room")
        if error is None:
            raise
        mine = str(error)
    dist.all_gather_object(failures, mine)  # every rank's shards are on disk before the manifest lists them
    first = next((f for f in failures if f is not None), None)
    if first is not None:
        if rank == 0:
            _remove_own_scratch(root, tmp)
        raise StorageError(first)

    def publish() -> None:
        write_text_synced(tmp / STATE_FILE, json.dumps({"format": FORMAT_VERSION, "step": step, "extra": dict(extra)}))
        for fname, text in extra_files.items():
            write_text_synced(tmp / fname, text)
        publish_checkpoint(tmp, root, step, keep_last)

    on_rank0(publish)
    return root / name


def publish_checkpoint(tmp: Path, root: Path, step: int, keep_last: int | None = None) -> Path:
    """Turn the fully written directory ``tmp`` into checkpoint ``step`` of ``root``.

    Writes the manifest (every file under ``tmp``, relative path and size, and the sha256 of the
    pickled files: :func:`hebtron.checkpoints.write_manifest`) last, renames the directory into
    place (a re-saved step is swapped in whole, :func:`_swap_in`), points ``latest`` at it and
    prunes to ``keep_last``. Until the rename the previous checkpoint stays the newest complete
    one. Shared by every backend's saver, so they stay equally crash-safe; it first removes
    scratch entries of crashed writers of this host (never ``tmp``, whose writer is this process).
    """
    clean_scratch(root)
    write_manifest(tmp, step)
    fsync_dir(tmp)

    name = checkpoint_name(step)
    final = root / name
    if final.exists():  # re-saving a step (resumed from an older checkpoint): swap it out
        _swap_in(tmp, final, root, name)
    else:
        os.rename(tmp, final)
    fsync_dir(root)

    _write_latest(root, name)
    if keep_last:
        prune_checkpoints(root, keep_last)
    return final


# Linux renameat2(2) flag: exchange two paths atomically (tmpfs, ext4, xfs, btrfs; not NFS).
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one atomic step; False where the system or filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _swap_in(tmp: Path, final: Path, root: Path, name: str) -> None:
    """Replace the existing checkpoint ``final`` by ``tmp`` without ``final`` ever being absent:
    an atomic exchange where the filesystem has one, so ``latest`` always names a complete
    directory. Elsewhere two renames; a kill between them leaves ``final`` absent with both
    copies complete under scratch names, and :func:`repair_interrupted_swap` puts one back at
    the next start."""
    if exchange_paths(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the replaced copy
        return
    trash = scratch_path(root, name, "trash")
    os.rename(final, trash)
    os.rename(tmp, final)
    shutil.rmtree(trash, ignore_errors=True)


def repair_interrupted_swap(root: str | os.PathLike) -> Path | None:
    """Undo a re-save swap that a kill cut between its two renames (:func:`_swap_in`): ``latest``
    names ``step_N``, which is absent, while a complete copy of it sits under a scratch name of
    a writer that is gone. The re-saved copy (``.tmp-``) is put back if complete, else the
    replaced one (``.trash-``). Returns the restored checkpoint. Writers call it at start,
    before looking for the checkpoint to resume from."""
    root = Path(root)
    pointer = root / LATEST_FILE
    name = read_pointer(pointer) if pointer.is_file() else None
    if not name or step_of(name) is None or (root / name).exists():
        return None
    host, me = this_host(), os.getpid()
    copies = []
    for entry in sorted(root.iterdir()):
        scratch = parse_scratch(entry)
        if scratch is None or not entry.name.startswith(name + "."):
            continue
        if scratch.pid == me or ((scratch.host is None or scratch.host == host) and pid_alive(scratch.pid)):
            continue  # a save in progress
        if checkpoint_problem(entry) is None:
            copies.append((".tmp-" not in entry.name, entry))  # tmp (the re-saved copy) first
    if not copies:
        return None
    _, chosen = min(copies)
    try:
        os.rename(chosen, root / name)
    except OSError:  # another rank of this run restored it first
        return root / name if (root / name).is_dir() else None
    fsync_dir(root)
    log.warning("restored %s from %s (a re-save swap was interrupted)", name, chosen.name)
    return root / name


def _dedupe_tensors(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store tied tensors once and record the other names as aliases.

    safetensors refuses tensors that share memory. Identical views (a tied embedding and LM
    head) become one entry plus an alias, so loading gives back one shared tensor; other
    overlapping views are cloned so each is written independently.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple, str] = {}
    storages: set[tuple[str, int]] = set()
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"save_checkpoint: model_state[{name!r}] is "
                            f"{type(t).__name__}, not a tensor")
        if hasattr(t, "full_tensor"):
            raise TypeError(
                f"save_checkpoint: model_state[{name!r}] is a DTensor shard; gather a full state "
                "dict first (get_model_state_dict with full_state_dict=True)")
        t = t.detach()
        if t.numel() == 0:
            tensors[name] = t.cpu().contiguous()
            continue
        storage = (str(t.device), t.untyped_storage().data_ptr())
        view = (*storage, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in views:
            aliases[name] = views[view]
            continue
        views[view] = name
        shared = storage in storages
        storages.add(storage)
        t = t.cpu()
        if shared or not t.is_contiguous() or t.untyped_storage().nbytes() != t.nbytes:
            t = t.clone(memory_format=torch.contiguous_format)
        tensors[name] = t
    return tensors, aliases


def _write_latest(root: Path, name: str) -> None:
    tmp = scratch_path(root, LATEST_FILE)
    write_text_synced(tmp, name + "\n")
    os.replace(tmp, root / LATEST_FILE)
    fsync_dir(root)


# --------------------------------------------------------------------------- pruning, cleaning


def prune_checkpoints(run_ckpt_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest ``keep_last``; return what was deleted.

    Never deletes the one ``latest`` names, nor any holding a ``KEEP`` file, nor one with a live
    evaluation lease (``hebtron eval watch`` is reading it). A checkpoint is renamed to a scratch
    name before removal, so a crash mid-delete never leaves a half-deleted ``step_*`` directory
    that looks like a checkpoint. The lease is checked again after that rename, and a leased
    checkpoint is renamed back: an evaluator takes its lease by the checkpoint's name, so a lease
    is either inside the renamed directory (seen here) or failed to be made (the evaluator skips).
    """
    if keep_last < 1:
        raise ValueError(f"prune_checkpoints: keep_last must be >= 1, got {keep_last}")
    root = Path(run_ckpt_dir)
    pointer = root / LATEST_FILE
    protected = read_pointer(pointer) if pointer.is_file() else None
    deleted = []
    for _, path in list_checkpoints(root)[:-keep_last]:
        if path.name == protected or (path / KEEP_FILE).exists() or live_leases(path):
            continue
        trash = scratch_path(root, path.name, "trash")
        os.rename(path, trash)
        if live_leases(trash):  # leased between the check and the rename: give it back
            os.rename(trash, path)
            continue
        shutil.rmtree(trash, ignore_errors=True)
        deleted.append(path)
    return deleted


def ensure_room(run_ckpt_dir: str | os.PathLike, keep_last: int | None, prune_before_save: bool = False) -> list[Path]:
    """Check, before a save writes anything, that the disk has room for it: as much as the
    previous checkpoint took. When it has not and ``prune_before_save`` is on, first prune to
    ``keep_last - 1`` complete checkpoints (the save then brings it back to ``keep_last``), with
    :func:`prune_checkpoints`' protections: never the one ``latest`` names, never the newest,
    never a ``KEEP`` or leased one. Still short: :class:`StorageError`, one line, nothing written.
    Returns the pruned checkpoints. Rank 0 only (the trainer shares the outcome)."""
    root = Path(run_ckpt_dir)
    needed = previous_checkpoint_bytes(root)
    free = free_bytes(root)
    if needed is None or free is None or free >= needed:
        return []
    pruned: list[Path] = []
    if prune_before_save and keep_last and keep_last > 1:
        pruned = prune_checkpoints(root, keep_last - 1)
        free = free_bytes(root) or 0
        if free >= needed:
            log.warning("pruned %s before saving: %d bytes free, the checkpoint needs about %d",
                        ", ".join(p.name for p in pruned), free, needed)
            return pruned
    raise room_error(root, needed, free, keep_last, len(pruned))


def clean_scratch(root: str | os.PathLike, include_own: bool = False) -> list[Path]:
    """Remove the scratch entries :func:`hebtron.checkpoints.stale_scratch` lists (this host's,
    writer gone; with ``include_own`` also this process's); return them. Writers only: called
    right before a save writes, never by a lookup."""
    removed = stale_scratch(root, include_own=include_own)
    for p in removed:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return removed


# --------------------------------------------------------------------------- loading


def load_checkpoint(
    path: str | os.PathLike, *, load_optimizer: bool = True, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, dict[str, Any]]:
    """Read a checkpoint directory back as ``(model_state, optimizer_state, extra)``.

    Tied tensors come back as one shared tensor under every name. ``extra`` is what was
    saved, with ``"step"`` added. ``optimizer_state`` is ``None`` when not saved or not asked
    for. Anything missing or unreadable raises :class:`CheckpointError` naming the file.
    """
    ckpt = Path(path)
    problem = checkpoint_problem(ckpt)
    if problem is not None:
        raise CheckpointError(problem)

    model_file = ckpt / MODEL_FILE
    try:
        with safe_open(str(model_file), framework="pt", device=str(device)) as f:
            model_state = {k: f.get_tensor(k) for k in f.keys()}
            raw_aliases = (f.metadata() or {}).get("hebtron_aliases", "{}")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{model_file}: unreadable safetensors file ({exc})") from exc
    aliases = parse_json(raw_aliases, f"{model_file}: metadata hebtron_aliases", CheckpointError)
    if not isinstance(aliases, dict):
        raise CheckpointError(f"{model_file}: metadata hebtron_aliases: expected an object of alias -> tensor name, "
                              f"got {type(aliases).__name__}")
    for alias, target in aliases.items():
        if not isinstance(target, str) or target not in model_state:
            raise CheckpointError(
                f"{model_file}: alias {alias!r} points to missing tensor {target!r}")
        model_state[alias] = model_state[target]

    step, extra = read_trainer_state(ckpt)
    extra["step"] = step

    optimizer_state = None
    optim_file = ckpt / OPTIMIZER_FILE
    if load_optimizer and optim_file.exists():
        try:
            optimizer_state = torch.load(optim_file, map_location=device, weights_only=True)
        except Exception as exc:  # torch.load raises many types on damaged files
            raise CheckpointError(f"{optim_file}: unreadable optimizer state ({_load_failure(exc)})") from None
    return model_state, optimizer_state, extra


# What restoring a run-state field from a trainer_state.json that came from disk may raise.
RUN_STATE_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError, RuntimeError)


def run_state_error(checkpoint: Path, field: str, err: BaseException) -> CheckpointError:
    """The one line for a field of ``extra`` that is missing or misshaped (``extra.rng``, ``extra.moe``)."""
    detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    if isinstance(err, KeyError):
        detail = f"missing {detail}"
    return CheckpointError(f"{Path(checkpoint) / STATE_FILE}: extra.{field}: unusable run state ({detail})")


def _load_failure(exc: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in a short clause: its own message is
    paragraphs of advice (among them to load with weights_only=False, which would run the file's code)."""
    text = str(exc)
    if "Weights only load failed" in text:
        match = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
        reason = match.group(1).strip() if match else "not tensors and plain data"
        reason = reason.split(" was not an allowed global")[0].split(". ")[0][:200]
        return (f"damaged, or pickled objects beyond tensors and plain data: {reason}; hebtron reads optimizer "
                "state with weights_only=True, never running code from a checkpoint")
    return " ".join(text.split())[:300] or type(exc).__name__


# --------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU, CUDA) as plain JSON data.

    JSON keeps it inside ``trainer_state.json`` and loadable without unpickling. Each rank
    has its own RNG; the loop decides whether to save rank 0's or gather all ranks'.
    """
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "torch": torch.get_rng_state().tolist(),
        "cuda": None,
        "numpy": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Restore states from :func:`capture_rng`; accepts its output or an ``extra`` holding it
    under ``"rng"``. Missing parts (no numpy, no CUDA now or then) are skipped."""
    if "rng" in state:
        state = state["rng"]
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in cuda])
        else:
            log.warning("CUDA RNG saved for %d devices, %d present; not restored",
                        len(cuda), torch.cuda.device_count())
    if state.get("numpy") is not None:
        try:
            import numpy as np
        except ImportError:
            return
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
