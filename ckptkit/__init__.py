"""ckptkit: checkpoint-first training loops for TensorFlow 2, driven by Hydra configs.

Importing ``ckptkit`` does not import TensorFlow (seconds): ``ckptkit --help`` and
``ckptkit ls`` answer at once. The names below that need TensorFlow (``Trainer``,
``Checkpointer``, ``restore_partial``, ...) import it on first use.
"""

import atexit
import gc
import importlib

from ckptkit.config import register_configs
from ckptkit.errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointReadError,
    CheckpointSaveError,
    CheckpointUnreadableError,
    CkptkitError,
    ConfigError,
    DataPipelineError,
    ExportError,
    HookError,
    NonFiniteError,
)

__version__ = "0.1.0"

# name -> the module that defines it, imported when the name is first used (PEP 562)
_LAZY = {
    "Checkpointer": "ckptkit.checkpointer",
    "CheckpointInfo": "ckptkit.policies",
    "EXIT_INTERRUPTED": "ckptkit.preemption",
    "EXIT_PREEMPTED": "ckptkit.preemption",
    "Interrupted": "ckptkit.preemption",
    "Preempted": "ckptkit.preemption",
    "CheckpointDirOwnedError": "ckptkit.ownership",
    "RunLockedError": "ckptkit.runlock",
    "RunTakenOverError": "ckptkit.runlock",
    "FitResult": "ckptkit.trainer",
    "Trainer": "ckptkit.trainer",
    "RestoreReport": "ckptkit.transfer",
    "restore_partial": "ckptkit.transfer",
}


# submodules users reach as attributes (``ckptkit.data.shuffle``), imported on first use
_SUBMODULES = ("data",)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"ckptkit.{name}")
    raise AttributeError(f"module 'ckptkit' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY) + list(_SUBMODULES))


register_configs()

# At exit, Python's last garbage collection walks every object a TensorFlow program made
# (traced functions, Keras layers): 1-7 s of silence after a run ends. Frozen objects are
# left to the operating system; everything with a flush to do (logging, TensorBoard writers,
# checkpoints) has done it before, by fit() or by atexit handlers registered earlier.
atexit.register(gc.freeze)

__all__ = [
    "Checkpointer",
    "CheckpointDirOwnedError",
    "CheckpointInfo",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointSaveError",
    "CheckpointReadError",
    "CheckpointUnreadableError",
    "CkptkitError",
    "ConfigError",
    "DataPipelineError",
    "EXIT_INTERRUPTED",
    "EXIT_PREEMPTED",
    "ExportError",
    "HookError",
    "NonFiniteError",
    "Interrupted",
    "Preempted",
    "FitResult",
    "RestoreReport",
    "RunLockedError",
    "RunTakenOverError",
    "Trainer",
    "restore_partial",
]
