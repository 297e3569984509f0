"""The on-disk layout of a run's checkpoints, and what a checkpoint path given by a user means.

Torch-free (stdlib and :mod:`hebtron.errors` only) so that read-only commands (``hebtron jobs``,
``recipe show``) and the recipe schema can look at checkpoints without importing torch. The
tensor files are written and read in :mod:`hebtron.train.checkpoint`.

Layout under a run's checkpoint directory::

    latest                    text file naming the newest checkpoint, replaced atomically
    step_00001000/
        config.json           the model's HF config (a step directory is also an HF directory)
        trainer_state.json    {"format": 1, "step": ..., "extra": {tokenizer, scheduler, rng, ...}}
        ...                   weights and optimizer state (backend specific)
        COMPLETE              manifest (file sizes), written last
        KEEP                  optional: pruning never deletes this checkpoint (eval gate)
        EVALUATING-<host>-<pid>   an evaluation lease (``hebtron eval watch``): pruning skips the
                              checkpoint while the lease is live (see :func:`live_leases`)
        eval/SUITE.json       benchmark results of this checkpoint (``hebtron eval watch``)
        megatron/             Megatron backend: the distributed checkpoint (no safetensors), and
        hf/                   its HF conversion, made on first use by export / eval / probe / SFT
    step_00001000.tmp-<host>-<pid>    a save in progress (or one whose writer died)

Everything here that looks (``find_latest``, ``resolve_checkpoint``, ``stale_scratch``, ...) only
reads: a command run on a login node must never delete the scratch directory of a save in
progress on a compute node. Only a writer removes scratch entries, and only its own host's
whose process is gone (:func:`hebtron.train.checkpoint.clean_scratch`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from hebtron.errors import CheckpointError
from hebtron.jsonio import read_json_object

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
STATE_FILE = "trainer_state.json"
COMPLETE_FILE = "COMPLETE"
KEEP_FILE = "KEEP"
LEASE_PREFIX = "EVALUATING-"  # + <host>-<pid>: an evaluator is reading this checkpoint
LEASE_TTL_S = 600.0  # a lease whose heartbeat is older than this is dead (its evaluator is gone)
EVAL_DIR = "eval"  # step_N/eval/<suite>.json: that checkpoint's benchmark results
MEGATRON_DIR = "megatron"  # a Megatron-backend step_N's distributed checkpoint
SHARDED_DIR = "dcp"  # a native FSDP2 step_N's torch.distributed.checkpoint (every rank's shards)
HF_CACHE_DIR = "hf"  # beside either: its Hugging Face conversion (hebtron.backends.hf_dirs)
LATEST_FILE = "latest"
FORMAT_VERSION = 1
# Files a checkpoint holds that are pickles read by torch.distributed.checkpoint / megatron-core
# (``.metadata``) or torch.load (``common.pt``): their sha256 goes into the manifest at save
# time and is checked before they are read (:func:`pickle_problem`).
PICKLED_FILES = (".metadata", "common.pt")
# Files any one of which makes a directory a tokenizer directory (HF fast / slow, Mistral Tekken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "tekken.json")

_STEP_DIR = re.compile(r"^step_(\d+)$")
# step_00000006.tmp-<host>-<pid>, latest.tmp-<host>-<pid>, step_N.trash-..., and inside a step
# step_N/hf.tmp-<host>-<pid> (its HF conversion in progress); before hosts were
# recorded the names were <base>.tmp-<pid> (host group absent).
_SCRATCH = re.compile(r"^(?P<base>step_\d+|latest|hf)\.(?P<kind>tmp|trash)-(?:(?P<host>.+)-)?(?P<pid>\d+)$")

ScratchKind = Literal["tmp", "trash"]


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: str | os.PathLike) -> int | None:
    """The step a ``step_N`` directory name stands for, else ``None``."""
    m = _STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- durable writes


def flush_fsync(fh: IO[Any]) -> None:
    fh.flush()
    os.fsync(fh.fileno())


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Persist a rename: the directory entry itself must reach the disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some network filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def write_text_synced(path: Path, text: str) -> None:
    """Write and fsync: the text is on disk before anything points at it."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        flush_fsync(fh)


# --------------------------------------------------------------------------- finding


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint, or ``None`` when it is."""
    manifest = path / COMPLETE_FILE
    if not path.is_dir():
        return f"{path}: no such checkpoint directory"
    if not manifest.is_file():
        return f"{manifest}: missing (checkpoint was not completely written)"
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        listed = [(str(fname), int(size)) for fname, size in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        return f"{manifest}: unreadable manifest ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})"
    for fname, size in listed:
        f = path / fname
        try:
            if not f.is_file():
                return f"{f}: missing (listed in {COMPLETE_FILE})"
            if f.stat().st_size != size:
                return f"{f}: size {f.stat().st_size} bytes, expected {size} (truncated or corrupt)"
        except (OSError, ValueError) as exc:
            return f"{f}: unusable ({exc})"
    return None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_manifest(directory: Path, step: int | None = None) -> dict[str, Any]:
    """Write ``directory/COMPLETE``: every file under it with its size, and the sha256 of each
    pickled file (:data:`PICKLED_FILES`), which vouches for it when it is read back. Last
    write of a save; the caller renames the directory into place afterwards."""
    files: dict[str, int] = {}
    hashes: dict[str, str] = {}
    for p in sorted(directory.rglob("*")):
        if not p.is_file() or p.name == COMPLETE_FILE:
            continue
        rel = str(p.relative_to(directory))
        files[rel] = p.stat().st_size
        if p.name in PICKLED_FILES:
            hashes[rel] = sha256_bytes(p.read_bytes())
    manifest: dict[str, Any] = {"format": FORMAT_VERSION, "files": files, "sha256": hashes}
    if step is not None:
        manifest["step"] = step
    write_text_synced(directory / COMPLETE_FILE, json.dumps(manifest))
    return manifest


def pickle_problem(path: Path, data: bytes) -> str | None:
    """Why hebtron should not unpickle ``data`` read from ``path``, or None when a manifest
    hebtron wrote (``COMPLETE`` in the file's directory or the one above: ``step_N/dcp/.metadata``)
    lists the file with this sha256."""
    for root in (path.parent, path.parent.parent):
        manifest = root / COMPLETE_FILE
        if not manifest.is_file():
            continue
        try:
            recorded = json.loads(manifest.read_text(encoding="utf-8")).get("sha256") or {}
        except (OSError, ValueError, AttributeError, RecursionError):
            return f"{manifest} is unreadable"
        rel = str(path.relative_to(root))
        if not isinstance(recorded, dict) or rel not in recorded:
            return f"{manifest} records no hash for {rel} (written before hebtron recorded them, or not by hebtron)"
        if recorded[rel] != sha256_bytes(data):
            return f"its sha256 differs from the one {manifest} recorded when hebtron wrote it (changed since)"
        return None
    return "no hebtron manifest (COMPLETE) vouches for it"


def list_checkpoints(run_ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first."""
    root = Path(run_ckpt_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        step = step_of(p)
        if step is not None and checkpoint_problem(p) is None:
            found.append((step, p))
    return sorted(found)


def read_pointer(pointer: Path) -> str | None:
    """The step name a ``latest`` file holds; None when it is unreadable (binary, a directory,
    permissions) or longer than any step name, so callers fall back instead of failing."""
    try:
        with open(pointer, "rb") as fh:
            raw = fh.read(256)
        return raw.decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None


def find_latest(run_ckpt_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from, or ``None`` if there is none. Changes nothing on disk.

    Trusts ``latest`` when it names a complete checkpoint; otherwise (pointer missing,
    damaged, or naming something incomplete) falls back to the newest complete ``step_*``.
    """
    root = Path(run_ckpt_dir)
    if not root.is_dir():
        return None
    pointer = root / LATEST_FILE
    if pointer.is_file():
        name = read_pointer(pointer)
        if name is not None and _STEP_DIR.match(name):
            problem = checkpoint_problem(root / name)
            if problem is None:
                return root / name
            log.warning("latest checkpoint unusable, falling back: %s", problem)
        else:
            log.warning("%s: expected a step_XXXXXXXX name, got %r; falling back", pointer, name)
    complete = list_checkpoints(root)
    return complete[-1][1] if complete else None


def mark_keep(checkpoint: str | os.PathLike, reason: str = "") -> None:
    """Protect a checkpoint from pruning (e.g. it passed the eval gate)."""
    write_text_synced(Path(checkpoint) / KEEP_FILE, reason + "\n")


def lease_path(checkpoint: str | os.PathLike, tag: str | None = None) -> Path:
    """This process's evaluation lease in ``checkpoint`` (another's with ``tag``)."""
    return Path(checkpoint) / f"{LEASE_PREFIX}{tag or scratch_tag()}"


def live_leases(checkpoint: str | os.PathLike, now: float | None = None) -> list[Path]:
    """Evaluation leases in ``checkpoint`` whose evaluator still runs.

    A lease of this host is live while its process runs. One of another host (the evaluator runs
    on an eval node, training on others) is live while its heartbeat, the file's mtime, which
    the evaluator refreshes every minute, is younger than :data:`LEASE_TTL_S`."""
    import time

    now = time.time() if now is None else now
    root, host, live = Path(checkpoint), this_host(), []
    try:
        names = sorted(p.name for p in root.iterdir() if p.name.startswith(LEASE_PREFIX))
    except OSError:
        return []
    for name in names:
        tag = name[len(LEASE_PREFIX):]
        lease_host, _, pid = tag.rpartition("-")
        path = root / name
        if lease_host == host and pid.isdigit():
            alive = pid_alive(int(pid))
        else:
            try:
                alive = now - path.stat().st_mtime < LEASE_TTL_S
            except OSError:
                alive = False
        if alive:
            live.append(path)
    return live


def read_trainer_state(checkpoint: Path) -> tuple[int, dict[str, Any]]:
    """``(step, extra)`` of a training checkpoint's ``trainer_state.json``; CheckpointError if unreadable."""
    state_file = checkpoint / STATE_FILE
    state = read_json_object(state_file, "trainer state file", CheckpointError)
    try:
        step, extra = state["step"], state["extra"]
    except KeyError as exc:
        raise CheckpointError(f"{state_file}: unreadable trainer state (no {exc} field)") from None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{state_file}: step: expected an integer >= 0, got {str(step)[:40]!r}")
    if not isinstance(extra, dict):
        raise CheckpointError(f"{state_file}: extra: expected an object, got {type(extra).__name__}")
    return step, dict(extra)


# --------------------------------------------------------------------------- what a path is


@dataclass(frozen=True)
class CheckpointRef:
    """What a checkpoint path given by a user turned out to be.

    ``path`` holds the weights: a training checkpoint ``step_N`` (``step`` and ``extra`` from its
    ``trainer_state.json``) or a Hugging Face directory (``step`` None, ``extra`` empty).
    """

    path: Path
    step: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_training_checkpoint(self) -> bool:
        return self.step is not None

    @property
    def recorded_tokenizer(self) -> Path | None:
        """The tokenizer the training run recorded (``extra.tokenizer``), if any."""
        named = self.extra.get("tokenizer")
        return Path(named).expanduser().resolve() if isinstance(named, str) and named else None


def locate_checkpoint(path: str | os.PathLike) -> Path | None:
    """The directory holding the weights ``path`` names, or ``None``: ``path`` itself when it is a
    ``step_N`` or Hugging Face directory, else the newest complete checkpoint under it."""
    path = Path(path)
    if (path / STATE_FILE).is_file() or (path / CONFIG_FILE).is_file():
        return path
    return find_latest(path)


def resolve_checkpoint(path: str | os.PathLike) -> CheckpointRef:
    """A step directory, a checkpoints directory (its latest complete step) or a Hugging Face
    directory, as a :class:`CheckpointRef`; one-line CheckpointError when it is none of them or
    the training checkpoint is incomplete."""
    given = Path(path).expanduser().resolve()
    if not given.exists():
        raise CheckpointError(f"{given}: no such checkpoint or model directory")
    found = locate_checkpoint(given) if given.is_dir() else None
    if found is None:
        raise CheckpointError(f"{given}: not a model directory (no config.json) and holds no complete checkpoint")
    if not (found / STATE_FILE).is_file():
        return CheckpointRef(found)
    problem = checkpoint_problem(found)
    if problem is not None:
        raise CheckpointError(problem)
    step, extra = read_trainer_state(found)
    return CheckpointRef(found, step, extra)


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a native FSDP2 ``step_N`` (weights sharded in ``dcp/``, no safetensors)."""
    return (Path(path) / SHARDED_DIR / ".metadata").is_file()


def is_megatron_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a Megatron-backend ``step_N`` (weights in ``megatron/``, no safetensors)."""
    return (Path(path) / MEGATRON_DIR / "metadata.json").is_file()


def has_tokenizer_files(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def checkpoint_tokenizer(ref: CheckpointRef, override: str | os.PathLike | None = None) -> Path:
    """The tokenizer directory for ``ref``: ``override``, else tokenizer files beside the weights,
    else the one its training run recorded; a one-line CheckpointError when there is none."""
    if override is not None:
        tok_dir = Path(override).expanduser().resolve()
    elif has_tokenizer_files(ref.path):
        tok_dir = ref.path
    elif ref.recorded_tokenizer is not None:
        tok_dir = ref.recorded_tokenizer
    else:
        raise CheckpointError(
            f"{ref.path}: no tokenizer files and none recorded in {STATE_FILE}; pass --tokenizer DIR"
        )
    if tok_dir.is_file():
        tok_dir = tok_dir.parent
    if not has_tokenizer_files(tok_dir):
        raise CheckpointError(f"{tok_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    return tok_dir


def tokenizer_dir(path: str | os.PathLike) -> Path:
    """Where to load a tokenizer from: a tokenizer directory (or a file in one), or a checkpoint /
    checkpoints directory, which names the tokenizer it was trained with (so SFT can start from
    it directly). Falls back to ``path``'s directory, for the loader to report."""
    path = Path(path)
    directory = path.parent if path.is_file() else path
    if has_tokenizer_files(directory):
        return directory
    try:
        return checkpoint_tokenizer(resolve_checkpoint(directory))
    except CheckpointError:
        return directory


# --------------------------------------------------------------------------- scratch entries


@dataclass(frozen=True)
class Scratch:
    """A writer's scratch entry: ``host`` None for names from before hosts were recorded."""

    path: Path
    host: str | None
    pid: int


def this_host() -> str:
    """This machine's name as it appears in scratch names (file-name safe)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"


def scratch_tag(pid: int | None = None) -> str:
    """``<host>-<pid>``: whose scratch entry this is (this process by default)."""
    return f"{this_host()}-{os.getpid() if pid is None else pid}"


def scratch_path(root: Path, name: str, kind: ScratchKind = "tmp", tag: str | None = None) -> Path:
    """Where a writer stages ``name`` (``tmp``) or moves it before deletion (``trash``)."""
    return root / f"{name}.{kind}-{tag or scratch_tag()}"


def parse_scratch(path: Path) -> Scratch | None:
    m = _SCRATCH.match(path.name)
    return Scratch(path, m.group("host"), int(m.group("pid"))) if m else None


def stale_scratch(root: str | os.PathLike, include_own: bool = False) -> list[Path]:
    """Scratch entries under ``root`` whose writer is gone; lists, never deletes.

    Only this host's count (an entry of another host may be a save in progress there; old names
    without a host count as this host's), and only when their process is not running.
    ``include_own`` adds this process's own leftovers (a save of ours that raised).
    """
    root = Path(root)
    if not root.is_dir():
        return []
    host, me = this_host(), os.getpid()
    stale = []
    for p in sorted(root.iterdir()):
        s = parse_scratch(p)
        if s is None or (s.host is not None and s.host != host):
            continue
        if s.pid == me:
            if include_own:
                stale.append(p)
        elif not pid_alive(s.pid):
            stale.append(p)
    return stale


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a process of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
