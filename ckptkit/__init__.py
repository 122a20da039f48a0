"""ckptkit: checkpoint-first training loops for TensorFlow 2, driven by Hydra configs."""

from ckptkit.checkpointer import Checkpointer
from ckptkit.config import register_configs
from ckptkit.errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointSaveError,
    CheckpointUnreadableError,
    CkptkitError,
    ConfigError,
    DataPipelineError,
    ExportError,
    NonFiniteError,
)
from ckptkit.policies import CheckpointInfo
from ckptkit.preemption import EXIT_INTERRUPTED, EXIT_PREEMPTED, Preempted
from ckptkit.runlock import CheckpointDirOwnedError, RunLockedError
from ckptkit.trainer import FitResult, Trainer
from ckptkit.transfer import RestoreReport, restore_partial

__version__ = "0.1.0"

register_configs()

__all__ = [
    "Checkpointer",
    "CheckpointDirOwnedError",
    "CheckpointInfo",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointSaveError",
    "CheckpointUnreadableError",
    "CkptkitError",
    "ConfigError",
    "DataPipelineError",
    "EXIT_INTERRUPTED",
    "EXIT_PREEMPTED",
    "ExportError",
    "NonFiniteError",
    "Preempted",
    "FitResult",
    "RestoreReport",
    "RunLockedError",
    "Trainer",
    "restore_partial",
]
