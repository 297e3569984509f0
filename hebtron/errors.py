"""User-facing errors: one clear line naming the file, the field and what was expected."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in user input (recipe, data file, checkpoint, command line).

    The CLI prints ``error: <message>`` on one line and exits with code 2; no traceback.
    """

    exit_code = 2


class ConfigError(UserError):
    """An invalid model configuration (field named in the message)."""


class CheckpointError(UserError):
    """A missing, incomplete or misshaped checkpoint (file and key named in the message)."""


class StorageError(UserError):
    """The disk refused a write (full, read-only, over quota): one line naming the path, the errno
    text and the bytes needed vs free. Exit code 74 (``EX_IOERR``), beside 75 (stopped by a signal,
    checkpoint saved: requeue) and 3 (aborted on purpose: do not resume): the run can continue
    with ``--resume auto`` once there is room, and a launcher must not requeue it blindly."""

    exit_code = 74
