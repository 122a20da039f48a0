"""Reading a checkpoint back into the Checkpointer's objects: every existing object must
receive a value, the data position is restored (or started afresh, as the Checkpointer's
``data_check`` decides) and must still produce a batch, and each failure says what it
means (an unreadable file, a model that does not fit, a data pipeline that changed).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from typing import Any

import tensorflow as tf

from ckptkit import metadata
from ckptkit.errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointReadError,
    CheckpointUnreadableError,
    DataPipelineError,
)
from ckptkit.iterator_state import IteratorCheckpoint, peek
from ckptkit.policies import CheckpointInfo

log = logging.getLogger("ckptkit")

#: What a read error means. TensorFlow maps errno to its error classes (EACCES and EPERM to
#: PermissionDenied, EAGAIN and network errors to Unavailable, ETIMEDOUT to DeadlineExceeded,
#: ESTALE to Aborted, EMFILE and ENOMEM to ResourceExhausted) and EIO to Unknown, keeping
#: ``strerror`` in the message, and its checkpoint reader re-wraps some as DataLoss ("Unable to
#: open table file ...: PERMISSION_DENIED: ...; Permission denied"). Those say the storage
#: failed, not the checkpoint: the read is retried, and if it keeps failing the launch stops
#: with the file and the error, moving nothing. Everything else (DataLoss, a missing or
#: truncated file, a bad format) means the checkpoint itself is damaged.
_STORAGE_ERRORS = (
    tf.errors.PermissionDeniedError,
    tf.errors.UnavailableError,
    tf.errors.DeadlineExceededError,
    tf.errors.AbortedError,
    tf.errors.ResourceExhaustedError,
)
_STORAGE_ERRNOS = (errno.EIO, errno.EACCES, errno.EPERM, errno.ESTALE, errno.EAGAIN, errno.ETIMEDOUT, errno.EBUSY)
_STORAGE_TEXTS = tuple(os.strerror(e) for e in _STORAGE_ERRNOS) + ("PERMISSION_DENIED", "UNAVAILABLE")
#: Seconds to wait before each retry of a read that failed for the storage's sake.
READ_RETRY_DELAYS = (0.5, 1.0, 2.0)


def storage_failed(exc: BaseException) -> bool:
    """Whether a read error is the storage's (I/O, permission, timeout), not a damaged file."""
    if isinstance(exc, _STORAGE_ERRORS):
        return True
    message = getattr(exc, "message", None) or str(exc)
    return isinstance(exc, tf.errors.OpError) and any(t in message for t in _STORAGE_TEXTS)


def _read(checkpoint: Any, path: str):
    return checkpoint.read(path)


def _first_line(exc: BaseException) -> str:
    return ((getattr(exc, "message", None) or str(exc)).strip().splitlines() or [""])[0]


def _read_retrying(checkpoint: Any, path: str):
    """``checkpoint.read(path)``, retried with a short backoff while the storage fails."""
    for delay in READ_RETRY_DELAYS:
        try:
            return _read(checkpoint, path)
        except tf.errors.OpError as exc:
            if not storage_failed(exc):
                raise
            log.warning("reading %s failed (%s); retrying in %.1f s", path, _first_line(exc), delay)
            time.sleep(delay)
    try:
        return _read(checkpoint, path)
    except tf.errors.OpError as exc:
        if not storage_failed(exc):
            raise
        raise CheckpointReadError(
            f"cannot read checkpoint {path}: {_first_line(exc)} (tried {len(READ_RETRY_DELAYS) + 1} times "
            f"over {sum(READ_RETRY_DELAYS):.1f} s). A storage or permission error, not a damaged "
            "checkpoint: nothing was moved or skipped; fix the access and launch again."
        ) from exc


def restore(ckpt: Any, path: str, *, assert_consumed: bool = False) -> int:
    """Restore the checkpoint at prefix ``path`` into the trackables; return its step.

    Every existing object must receive a value, else CheckpointMismatchError names the
    first one that did not. ``assert_consumed`` also requires every value in the
    checkpoint to find its object (use it once all variables exist).
    """
    if not tf.io.gfile.exists(path + ".index"):
        raise CheckpointNotFoundError(f"no checkpoint at {path} (missing {path}.index)")
    with_data = True
    if ckpt.data_check is not None and ckpt._iterators:
        step = metadata.step_of(path)
        info = ckpt.book.get(step) if step is not None else None
        with_data = ckpt.data_check(info or CheckpointInfo(step=step or -1, path=path, time=0.0))
    try:
        if with_data:
            status = _read_retrying(ckpt._checkpoint, path)
        else:  # everything but the data position, which starts afresh
            status = _read_retrying(
                tf.train.Checkpoint(
                    **{k: v for k, v in ckpt._trackables.items() if not isinstance(v, IteratorCheckpoint)}
                ),
                path,
            )
        if assert_consumed and with_data:
            status.assert_consumed()
        else:
            status.assert_existing_objects_matched()
    except AssertionError as exc:
        raise CheckpointMismatchError(
            f"checkpoint {path} does not match the objects it is restored into: "
            f"{str(exc).splitlines()[0]}; was it written by another model or config?"
        ) from exc
    except (tf.errors.OpError, IndexError) as exc:  # IndexError: a truncated data file
        message = getattr(exc, "message", None) or str(exc)
        if "DeserializeIterator" in message or "restore dataset iterator" in message:
            raise pipeline_changed(path, message) from exc
        raise CheckpointUnreadableError(f"checkpoint {path} is unreadable ({message.splitlines()[0]})") from exc
    except ValueError as exc:
        raise CheckpointMismatchError(f"cannot restore checkpoint {path}: {exc}") from exc
    status.expect_partial()
    for it in ckpt._iterators if with_data else ():  # a restored position must also produce a batch
        try:
            peek(it.iterator)
        except tf.errors.OutOfRangeError:
            pass
        except tf.errors.OpError as exc:
            raise pipeline_changed(path, exc.message) from exc
    step = metadata.step_of(path)
    return int(step) if step is not None else -1


def pipeline_changed(path: str, message: str) -> DataPipelineError:
    detail = " ".join(message.split())
    detail = detail.split("}}")[-1].strip()[:300]
    return DataPipelineError(
        f"the data position saved in checkpoint {path} does not fit the current training "
        f"dataset: its pipeline changed since the checkpoint was written (batch size, "
        f"shuffle, map or repeat steps, element shapes): {detail}. To resume exactly, "
        "restore the pipeline the checkpoint was written with; to keep the new pipeline, "
        f"start a new run (another name or run_dir) from these weights with "
        f"checkpoint.init_from.path={path}."
    )
