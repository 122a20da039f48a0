"""Exceptions raised by ckptkit.

Every error names the file, config key or variable it is about and says what to do, so a
user who sees only the last line of a log can act on it. Each class also derives from the
built-in exception that fits (``ValueError`` for bad input, ``OSError`` for storage), so
callers that catch the built-ins keep working.

Every class is also one of Hydra's compact exceptions: under ``@hydra.main`` the user sees
the message alone, no traceback, and exit status 1; ``HYDRA_FULL_ERROR=1`` shows the
traceback.
"""

from __future__ import annotations

from hydra.errors import CompactHydraException


class CkptkitError(CompactHydraException):
    """Base class of every error ckptkit raises on purpose."""


class ConfigError(CkptkitError, ValueError):
    """A config key is unknown, has the wrong type, or holds a value out of range."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"config key `{key}`: {message}")

    def __reduce__(self):  # picklable (a sweep's job in another process hands it back)
        return (type(self), (self.key, self.message))


class HookError(CkptkitError, TypeError):
    """A Trainer's hook is missing or returned what ckptkit cannot use (the README's table
    'The hooks')."""


class CheckpointNotFoundError(CkptkitError, FileNotFoundError):
    """A checkpoint that was asked for does not exist or cannot be read."""


class CheckpointUnreadableError(CkptkitError, OSError):
    """A checkpoint's files are truncated, missing or corrupt."""


class CheckpointReadError(CkptkitError, OSError):
    """Reading a checkpoint failed with an I/O or permission error that persisted through
    retries: the storage, not the checkpoint, is at fault, so nothing was moved."""


class CheckpointMismatchError(CkptkitError, ValueError):
    """A checkpoint does not fit the objects it is restored into."""


class CheckpointSaveError(CkptkitError, OSError):
    """Writing a checkpoint (or its bookkeeping) failed; earlier checkpoints are intact."""


class ExportError(CkptkitError, RuntimeError):
    """Exporting or verifying a SavedModel failed."""


class NonFiniteError(CkptkitError, FloatingPointError):
    """A loss, metric or variable became NaN or infinite; nothing was saved after it."""


class DataPipelineError(CkptkitError, ValueError):
    """The training data cannot serve the run: empty, or changed so that the saved data
    position no longer fits it."""
