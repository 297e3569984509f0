"""Why a checkpoint save failed, said in one line: the path, the errno text, bytes needed vs free.

A full disk does not surface as ``OSError`` everywhere: ``torch.save`` into a file object ends in
``RuntimeError: [enforce fail at inline_container.cc] unexpected pos ...`` with the real
``OSError: [Errno 28]`` only in its context, and safetensors raises ``SafetensorError('... I/O
error: No space left on device (os error 28)')``. :func:`storage_error` finds the cause in the
exception chain or the message and, failing both, asks the filesystem (read-only flag, free
space). Torch-free: the sizes come from the checkpoints' manifests.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

from hebtron.checkpoints import COMPLETE_FILE, find_latest
from hebtron.errors import StorageError

_OS_ERROR_IN_TEXT = re.compile(r"os error (\d+)|\[Errno (\d+)\]")
_WRITE_FAILURE_TEXT = ("unexpected pos", "iostream error", "file write failed", "PytorchStreamWriter failed")


def existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (where the filesystem can be asked)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int | None:
    """Bytes free for this user on the filesystem holding ``path`` (None if it cannot be asked)."""
    try:
        return shutil.disk_usage(existing_ancestor(path)).free
    except OSError:
        return None


def is_read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(existing_ancestor(path)).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def checkpoint_bytes(checkpoint: Path) -> int | None:
    """A complete checkpoint's size from its manifest (the files it lists), None if unreadable."""
    try:
        files = json.loads((checkpoint / COMPLETE_FILE).read_text(encoding="utf-8"))["files"]
        return sum(int(size) for size in files.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None


def previous_checkpoint_bytes(root: Path) -> int | None:
    """The size of the newest complete checkpoint under ``root``: what the next save needs."""
    try:
        latest = find_latest(root)
    except OSError:
        return None
    return checkpoint_bytes(latest) if latest is not None else None


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "an unknown amount"
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _errno_of(exc: BaseException) -> tuple[int | None, str | None]:
    """(errno, file name) of the first OSError in ``exc``'s chain, else an errno in its text."""
    seen: set[int] = set()
    node: BaseException | None = exc
    texts = []
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        if isinstance(node, OSError) and node.errno:
            return node.errno, node.filename if isinstance(node.filename, str) else None
        texts.append(str(node))
        node = node.__cause__ or node.__context__
    for text in texts:
        match = _OS_ERROR_IN_TEXT.search(text)
        if match:
            return int(match.group(1) or match.group(2)), None
    return None, None


def storage_error(exc: BaseException, *, action: str, path: Path, root: Path, needed: int | None,
                  outcome: str) -> StorageError | None:
    """The one-line error for a save that failed on the disk, or None if ``exc`` is not that.

    ``action`` says what failed (``saving checkpoint step 8``), ``path`` where, ``outcome`` what
    was done about it (scratch removed, ``latest`` untouched)."""
    code, filename = _errno_of(exc)
    if code is None:
        if is_read_only(root):
            code = errno.EROFS
        elif any(text in str(exc) for text in _WRITE_FAILURE_TEXT):
            free = free_bytes(root)
            if free is not None and (needed is None or free < needed or free < 1 << 20):
                code = errno.ENOSPC
    if code is None:
        return None
    where = filename or str(path)
    return StorageError(
        f"{action}: {where}: {os.strerror(code)} ({errno.errorcode.get(code, code)}); the checkpoint needs about "
        f"{fmt_bytes(needed)}, {fmt_bytes(free_bytes(root))} free on {root}; {outcome}")


def room_error(root: Path, needed: int, free: int, keep_last: int | None, pruned: int) -> StorageError:
    """A save refused before writing: less free space than the previous checkpoint took."""
    hint = ("free some space" if pruned else
            "free some space, or set checkpoint.prune_before_save: true to prune the oldest checkpoint first"
            if keep_last and keep_last > 1 else "free some space")
    done = f" after pruning {pruned} old checkpoint{'s' * (pruned != 1)}" if pruned else ""
    return StorageError(
        f"checkpoint save: {root}: {os.strerror(errno.ENOSPC)} (ENOSPC, checked before writing{done}); the "
        f"checkpoint needs about {fmt_bytes(needed)} (the previous one's size), {fmt_bytes(free)} free; nothing "
        f"was written and latest is untouched; {hint}, then rerun with --resume auto")
