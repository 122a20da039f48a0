"""Which run owns a checkpoint directory.

The checkpoint directory records which run owns it (``.ckptkit-owner.json``: the run's id
from ``run_dir/.ckptkit-run-id``, and its directory). A run whose ``checkpoint.dir`` is
owned by another run is refused: two runs sharing one would resume each other's
checkpoints. A run directory that moved keeps its id, and stays the owner.
"""

from __future__ import annotations

import json
import logging
import os
import secrets

from ckptkit import storage
from ckptkit.errors import CkptkitError

log = logging.getLogger("ckptkit")

RUN_ID_FILE = ".ckptkit-run-id"
OWNER_FILE = ".ckptkit-owner.json"


class CheckpointDirOwnedError(CkptkitError, RuntimeError):
    """The checkpoint directory belongs to another run."""


def run_id(run_dir: str) -> str:
    """The run's stable identity, created on first use (``run_dir/.ckptkit-run-id``)."""
    path = os.path.join(run_dir, RUN_ID_FILE)
    try:
        import tensorflow as tf

        with tf.io.gfile.GFile(path) as f:
            value = f.read().strip()
        if value:
            return value
    except Exception:  # noqa: BLE001 - absent or unreadable: a new identity
        pass
    value = secrets.token_hex(8)
    storage.atomic_write_text(path, value + "\n")
    return value


def _read_owner(checkpoint_dir: str) -> dict | None:
    import tensorflow as tf

    path = os.path.join(checkpoint_dir, OWNER_FILE)
    if not tf.io.gfile.exists(path) or storage.is_link(path):
        return None
    try:
        with tf.io.gfile.GFile(path) as f:
            owner = json.load(f)
    except (ValueError, UnicodeDecodeError):
        log.warning("ignoring the unreadable owner record %s", path)
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("run_id"), str) else None


def claim_checkpoint_dir(checkpoint_dir: str, run_dir: str) -> None:
    """Record ``run_dir``'s run as the owner of ``checkpoint_dir``; refuse another run's.

    A checkpoint directory without an owner record (written by an older ckptkit, or by a
    ``Checkpointer`` of your own) is adopted, with a log line.
    """
    import tensorflow as tf

    me = os.path.abspath(run_dir) if storage.is_local(run_dir) else run_dir
    owner = _read_owner(checkpoint_dir)
    has_id = tf.io.gfile.exists(os.path.join(run_dir, RUN_ID_FILE))
    if owner is not None and not has_id and owner.get("run_dir") == me:
        storage.atomic_write_text(os.path.join(run_dir, RUN_ID_FILE), owner["run_id"] + "\n")
    mine = run_id(run_dir)
    if owner is not None and owner["run_id"] != mine:
        raise CheckpointDirOwnedError(
            f"checkpoint.dir {checkpoint_dir} belongs to another run ({owner.get('run_dir')}, "
            f"recorded in {os.path.join(checkpoint_dir, OWNER_FILE)}); this run is {me}. Two runs "
            "sharing a checkpoint directory would resume each other's checkpoints: give this run "
            "its own checkpoint.dir (the default is ${run_dir}/checkpoints), or launch the other "
            "run's run_dir to continue it."
        )
    if owner is None or owner.get("run_dir") != me:
        if (
            owner is None
            and tf.io.gfile.isdir(checkpoint_dir)
            and any(n.startswith("ckpt-") for n in storage.listdir(checkpoint_dir))
        ):
            log.info("checkpoint directory %s has no owner record: adopting it for run %s", checkpoint_dir, me)
        tf.io.gfile.makedirs(checkpoint_dir)
        storage.atomic_write_text(
            os.path.join(checkpoint_dir, OWNER_FILE), json.dumps({"run_id": mine, "run_dir": me}) + "\n"
        )
