"""Moving in: a run directory whose ``checkpoints/`` a plain ``tf.train.CheckpointManager``
wrote (a project that switches to ckptkit) is adopted, not refused.

Such a directory has ``ckpt-<n>`` files and TensorFlow's state file, and neither ckptkit's
``metadata.json`` nor its owner record; ``<n>`` counts saves or steps, whichever the project
passed as ``checkpoint_number``, so it says nothing sure about the step. At the first launch
the newest of them is read into the trainer's model and optimizer by object-graph path
(``model/...``, ``optimizer/...``: what ``tf.train.Checkpoint(model=..., optimizer=...)``
writes), strictly: every variable must be filled. The step is the optimizer's iteration
count. Only then is the directory moved aside (``checkpoints-checkpointmanager-<time>``,
nothing deleted) and the adopted state saved as ckptkit's first checkpoint, so the next
launch resumes like any other. The data position and the best-checkpoint history start
fresh. What does not fit is refused, moving nothing, with the command that warm-starts from
it instead.
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any

import tensorflow as tf

from ckptkit import metadata, storage
from ckptkit.errors import CheckpointMismatchError
from ckptkit.ownership import OWNER_FILE, claim_checkpoint_dir
from ckptkit.transfer import RestoreReport, restore_optimizer, restore_partial

log = logging.getLogger("ckptkit")


def written_by_plain_manager(directory: str) -> str | None:
    """The newest checkpoint of ``directory`` when a plain ``tf.train.CheckpointManager``
    wrote it (checkpoints, no ckptkit bookkeeping), else None. Only complete checkpoints of
    real files count: a planted link is never read through (it is moved aside, as in any
    run directory)."""
    if not tf.io.gfile.isdir(directory):
        return None
    names = sorted(storage.listdir(directory))
    if metadata.METADATA_FILE in names or OWNER_FILE in names:
        return None
    complete = []
    for name in names:
        number = metadata.step_of(name[: -len(".index")]) if name.endswith(".index") else None
        if number is None:
            continue
        files = metadata.checkpoint_files(os.path.join(directory, f"ckpt-{number}"), names)
        data = [f for f in files if not f.endswith(".index")]
        if data and all(storage.is_real_file(f) for f in files):
            complete.append(number)
    if not complete:
        return None
    state = os.path.join(directory, metadata.STATE_FILE)
    latest = tf.train.latest_checkpoint(directory) if storage.is_real_file(state) else None
    if latest and metadata.step_of(latest) in complete:
        return latest
    return os.path.join(directory, f"ckpt-{max(complete)}")


def adopt(tr: Any, newest: str) -> RestoreReport:
    """Read ``newest`` into ``tr``'s model and optimizer, move its directory aside, and save
    the adopted state as the run's first checkpoint (see the module docstring)."""
    c = tr.settings.checkpoint
    directory = c.dir
    aside = f"{directory.rstrip('/')}-checkpointmanager-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    if tr.distribution.multi_worker:
        raise _refusal(directory, newest, aside, "adopting it under strategy.kind=multi_worker is not supported")
    try:
        report = restore_partial(tr.model, newest, strict=True)
        restore_optimizer(tr.optimizer, newest)
    except CheckpointMismatchError as exc:
        raise _refusal(directory, newest, aside, str(exc).splitlines()[0]) from exc
    iterations = getattr(tr.optimizer, "iterations", None)
    step = int(iterations.numpy()) if iterations is not None else 0
    tr.global_step.assign(step)
    tr._claims.let_go_of(directory)
    storage.rename(directory, aside)
    tr.checkpointer._forget_existing()
    tr._claims.take_checkpoint_dir(tr.run_dir, directory)
    claim_checkpoint_dir(directory, tr.run_dir)
    tr.checkpointer.save(step)
    tr.checkpointer.wait()
    log.warning(
        "%s was written by a plain tf.train.CheckpointManager: adopted %s (model and optimizer, %d variables; "
        "step %d, the optimizer's iteration count) and saved it as this run's first checkpoint. The data "
        "position and the best-checkpoint history start fresh; the old files are in %s (nothing deleted)",
        directory,
        os.path.basename(newest),
        len(report.restored),
        step,
        aside,
    )
    return report


def _refusal(directory: str, newest: str, aside: str, why: str) -> CheckpointMismatchError:
    return CheckpointMismatchError(
        f"{directory} was written by a plain tf.train.CheckpointManager, and its newest checkpoint "
        f"{os.path.basename(newest)} cannot be adopted as this run's: {why}\n"
        "Nothing was moved. To start this run from what fits of it, move it out of the run and warm-start:\n"
        f"  mv {directory} {aside}\n"
        f"  then launch with checkpoint.init_from.path={aside} checkpoint.init_from.optimizer=true "
        "(checkpoint.init_from.exclude=[...] leaves out what does not fit; init_from.optimizer needs the same "
        "trainable variables)"
    )
