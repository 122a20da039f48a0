"""A non-chief worker's part in a multi-worker save.

TensorFlow's rule is that every worker takes part in every save. A non-chief writes its part
into its own ``worker_dir`` (removed after each save: the chief's files are the checkpoint),
reads the chief's checkpoints, and writes nothing in the checkpoint directory itself.
"""

from __future__ import annotations

import logging
from typing import Any

import tensorflow as tf

from ckptkit import metadata, storage
from ckptkit._compat import mark_save_thread, own_executor_only
from ckptkit.errors import CheckpointSaveError

log = logging.getLogger("ckptkit")


def prepare_worker_dir(ckpt: Any, worker_dir: str) -> None:
    """Start from no ``worker_dir``: a link there is moved aside, a real one (an earlier
    launch's) removed."""
    if storage.is_link(worker_dir):
        into = ckpt._move_aside([worker_dir])
        log.warning("moved the link %s aside to %s: a worker writes into a real directory", worker_dir, into)
    if storage.remove_tree(worker_dir):
        log.info("removed %s, left by an earlier launch of this worker", worker_dir)


def save_as_worker(ckpt: Any, step: int, worker_dir: str) -> str:
    """A non-chief worker's part in the save of ``step``, written into ``worker_dir``;
    returns the chief's path."""
    chief_path = metadata.checkpoint_prefix(ckpt.directory, step)
    known = ckpt.book.get(step) is not None
    if known or step in ckpt._worker_saved:  # the chief skips this save too
        return chief_path
    ckpt._worker_saved.add(step)
    tf.io.gfile.makedirs(worker_dir)
    if ckpt._iterators:
        ckpt._checkpoint.sync()
        for it in ckpt._iterators:
            it.snapshot()
    options = tf.train.CheckpointOptions(
        enable_async=ckpt.async_save,
        experimental_write_callbacks=[lambda _path: discard_worker_dir(ckpt, worker_dir)],
    )
    prefix = metadata.checkpoint_prefix(worker_dir, step)
    try:
        with own_executor_only():  # see _compat.patch_async_wait
            ckpt._checkpoint.write(prefix, options=options)
    except Exception as exc:  # noqa: BLE001 - re-raised with the path named
        raise CheckpointSaveError(
            f"this worker's part of checkpoint {chief_path} failed writing {prefix}: {ckpt._failure(prefix, exc)}"
        ) from exc
    return chief_path


def discard_worker_dir(ckpt: Any, worker_dir: str) -> None:
    mark_save_thread()  # see _compat.patch_async_wait
    try:
        storage.remove_tree(worker_dir)
    except Exception as exc:  # noqa: BLE001 - surfaced in the training thread
        ckpt._background_error = CheckpointSaveError(
            f"cannot remove this worker's temporary checkpoint directory {worker_dir}: {exc}"
        )
