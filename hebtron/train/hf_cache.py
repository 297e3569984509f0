"""One Hugging Face conversion per training checkpoint, kept as ``step_N/hf/``, for checkpoints
whose weights are not already HF safetensors (Megatron distributed checkpoints, FSDP2 sharded
ones). The conversion is written to ``step_N/hf.tmp-<host>-<pid>`` under a lock and renamed into
place, so concurrent callers (every rank of a run starting from the checkpoint, an evaluation
job) convert once and never see half a directory. A crash leaves only a scratch entry, removed
by the next conversion on that host. Nothing here needs a process group.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from hebtron.checkpoints import (
    HF_CACHE_DIR,
    CheckpointRef,
    fsync_dir,
    scratch_path,
    stale_scratch,
    write_text_synced,
)
from hebtron.errors import CheckpointError

log = logging.getLogger(__name__)

MARKER = "hebtron_export.json"  # in a cached conversion: which converter wrote it


def publish_directory(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``, replacing an older ``final`` (moved aside first, then deleted)."""
    old = None
    if final.exists():
        old = scratch_path(final.parent, final.name, "trash")
        final.rename(old)
    tmp.rename(final)  # a directory created under ``final`` meanwhile makes this fail: never merged
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _cache_valid(directory: Path, converter: str) -> bool:
    try:
        return json.loads((directory / MARKER).read_text(encoding="utf-8")).get("converter") == converter
    except (OSError, ValueError, AttributeError):
        return False


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created); where the filesystem has no locks, none: the
    atomic rename alone keeps the result whole (callers may then convert twice)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise CheckpointError(f"{path.parent}: cannot write the HF conversion beside the checkpoint ({err.strerror}); "
                              "export it elsewhere with `hebtron export CHECKPOINT --hf DIR` and use DIR") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            log.warning("%s: no file locks on this filesystem; concurrent conversions may repeat work", path)
        yield
    finally:
        os.close(fd)  # releases the lock


def cached_conversion(ref: CheckpointRef, converter: str, what: str, write: Callable[[Path], None]) -> Path:
    """``step_N/hf``: ``write(tmp)`` (weights, config, tokenizer into ``tmp``) made once for the
    checkpoint ``ref``; ``converter`` names the converter and its version (a cache written by
    another is redone); ``what`` names the source format for the one message."""
    step_dir = ref.path
    final = step_dir / HF_CACHE_DIR
    if _cache_valid(final, converter):
        return final
    with _locked(step_dir / f"{HF_CACHE_DIR}.lock"):
        if _cache_valid(final, converter):  # another process converted while we waited
            return final
        for leftover in stale_scratch(step_dir):  # conversions on this host whose process died
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = scratch_path(step_dir, HF_CACHE_DIR, "tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"converting {what} checkpoint {step_dir} to Hugging Face format in {final} (once)",
              file=sys.stderr, flush=True)  # stderr: stdout may be a command's JSON
        tmp.mkdir()
        try:
            write(tmp)
            write_text_synced(tmp / MARKER, json.dumps({"converter": converter, "step": ref.step}))
            if not _cache_valid(final, converter):  # without working locks another process may have won the race
                publish_directory(tmp, final)
        except OSError as err:
            if not _cache_valid(final, converter):
                raise CheckpointError(f"{final}: cannot write the HF conversion ({err.strerror or err})") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
