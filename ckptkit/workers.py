"""What the workers of a multi-worker run agree on, and what one says when a peer is lost.

Every worker must restore the same checkpoint (:func:`check_restored_alike`, one small
all-reduce after the restore), and a collective that fails because a peer died ends the run
with ``trainer.exit_code_peer_lost`` and a message naming the peer and the newest checkpoint
on disk (:func:`peer_lost`). The agreement on each save and stop is in the outer loop
(:mod:`ckptkit.controller`), through :meth:`ckptkit.distribute.Distribution.agree`.
"""

from __future__ import annotations

import re
from typing import Any

from ckptkit import metadata
from ckptkit.errors import CheckpointMismatchError
from ckptkit.policies import CheckpointInfo
from ckptkit.preemption import PeerLost


def peer_lost(tr: Any, exc: Exception) -> PeerLost:
    """A collective failed under multi_worker: a peer died or became unreachable. The
    strategy cannot save without it; the last checkpoint is where the run resumes."""
    me = tr.distribution.task.split()[-1]
    message = getattr(exc, "message", None) or str(exc)
    tasks = sorted(
        {f"{job} {task}" for job, task in re.findall(r"/job:(\w+)/(?:replica:\d+/)?task:(\d+)", message) if task != me}
    )
    # TensorFlow's first line is "Graph execution error:"; the reason is further down
    reason = next(
        (
            line.strip()
            for line in message.splitlines()
            if "task:" in line or "unhealthy" in line or "connect" in line.lower()
        ),
        message.splitlines()[0] if message else type(exc).__name__,
    )
    latest = newest_on_disk(tr)
    t = tr.settings.trainer
    return PeerLost(
        t.exit_code_peer_lost if t.exit_code_peer_lost is not None else t.exit_code_preempted,
        f"{tr.distribution.task} lost contact with "
        f"{', '.join(tasks) if tasks else 'another worker'} ({type(exc).__name__}: "
        f"{reason[:300]}); a multi-worker "
        "run cannot save without every worker. "
        + (f"The last checkpoint is {latest.path} (step {latest.step}): " if latest else "")
        + "start every worker again to resume from it.",
    )


def newest_on_disk(tr: Any) -> CheckpointInfo | None:
    """The newest checkpoint in the checkpoint directory as it is now (a non-chief's own
    list is the chief's at launch)."""
    if "checkpointer" not in vars(tr):
        return None
    try:
        found = metadata.scan(tr.checkpointer.directory)
    except Exception:  # noqa: BLE001 - unreadable now: what this process knew
        return tr.checkpointer.latest
    return found[-1] if found else None


def check_restored_alike(tr: Any, resumed_from: int | None) -> None:
    """Every worker of a multi-worker run must have restored the same checkpoint: one
    that did not see the chief's files (a node-local run_dir, NFS attribute caching)
    would start elsewhere, and the all-reduces would silently mix the two states."""
    dist = tr.distribution
    if not dist.multi_worker:
        return
    info = tr.checkpointer.find(resumed_from) if resumed_from is not None else None
    uid = int(info.uid[:15], 16) if info is not None and info.uid else 0
    mine = [int(tr.global_step.numpy()), -1 if resumed_from is None else resumed_from, uid]
    rows = dist.gather_ints(mine)
    if all(row == rows[0] for row in rows):
        return

    def said(task, row):
        step, frm, u = row
        where = "nothing (a fresh start)" if frm < 0 else f"step {frm} (checkpoint id {u:x})"
        return f"worker {task} restored {where}, at step {step}"

    where = (
        f"the chief writes its checkpoints to {tr.checkpointer.directory}"
        if dist.is_chief
        else f"{dist.task} reads the chief's checkpoints from {tr.checkpointer.directory}"
    )
    raise CheckpointMismatchError(
        "the workers did not restore the same state: "
        + "; ".join(said(i, r) for i, r in enumerate(rows))
        + f". Here {where}: every worker must see that very directory (a shared filesystem, "
        "the same path on every host); nothing was trained."
    )
