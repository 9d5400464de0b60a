"""The errors stepstone raises on purpose, under one root.

Every class also derives from the builtin a caller would expect (``ValueError`` for
bad input, ``OSError`` for unreadable files, ...), so ``except ValueError`` keeps
working. The CLI catches :class:`StepstoneError` only: anything else is a bug and
shows its traceback.
"""

from __future__ import annotations


class StepstoneError(Exception):
    """Root of every error stepstone raises on purpose."""


class ConfigError(StepstoneError, ValueError):
    """An option or setting is invalid, or does not apply to what was asked for."""


class RegistryError(StepstoneError, RuntimeError):
    """The registry is missing, corrupt or inconsistent, or an id is unknown."""
