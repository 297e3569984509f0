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
