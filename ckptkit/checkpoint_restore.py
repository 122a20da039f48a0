"""Reading a checkpoint back into the Checkpointer's objects: every existing object must
receive a value, the data position is restored (or started afresh, as the Checkpointer's
``data_check`` decides) and must still produce a batch, and each failure says what it
means (an unreadable file, a model that does not fit, a data pipeline that changed).
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from ckptkit import metadata
from ckptkit.errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointUnreadableError,
    DataPipelineError,
)
from ckptkit.iterator_state import IteratorCheckpoint, peek
from ckptkit.policies import CheckpointInfo


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
            status = ckpt._checkpoint.read(path)
        else:  # everything but the data position, which starts afresh
            status = tf.train.Checkpoint(
                **{k: v for k, v in ckpt._trackables.items() if not isinstance(v, IteratorCheckpoint)}
            ).read(path)
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
