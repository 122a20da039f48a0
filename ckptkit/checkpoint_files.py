"""The file operations of a checkpoint directory beyond TensorFlow's own writes: moving
aside what stands in a save's way or cannot be read (``unreadable/<time>/``, the newest
sets kept), removing what interrupted saves left, and saying what a failed write means (a full
disk: the bytes free and needed). Each takes the directory's fence (the run lock's check).
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import secrets
from collections.abc import Callable, Mapping
from typing import Any

from ckptkit import metadata, storage

log = logging.getLogger("ckptkit")


def _no_fence() -> None:
    return None


#: How many sets of files moved into ``unreadable/`` are kept: the newest; older sets are
#: deleted, with a log line, when another one moves in.
KEEP_UNREADABLE = 3
_STAMP_RE = re.compile(r"^\d{8}-\d{6}(-\d{6})?-[0-9a-f]{6}$")  # older sets lack the microseconds


def move_aside(directory: str, paths: list[str], fence: Callable[[], None] = _no_fence) -> str:
    """Move ``paths`` (links as links) into a fresh ``<directory>/unreadable/<time>/``; then
    only the newest :data:`KEEP_UNREADABLE` such sets stay."""
    stamp = f"{datetime.datetime.now():%Y%m%d-%H%M%S-%f}-{secrets.token_hex(3)}"  # sorts by time
    into = os.path.join(directory, metadata.UNREADABLE_DIR, stamp)
    fence()
    for p in paths:
        storage.move_aside(p, into)
    prune_unreadable(directory, fence)
    return into


def unreadable_sets(directory: str) -> list[str]:
    """The sets in ``<directory>/unreadable/``, oldest first (only ckptkit's own: named by
    time, real directories)."""
    top = os.path.join(directory, metadata.UNREADABLE_DIR)
    if not storage.is_real_dir(top):
        return []
    names = sorted(n for n in storage.listdir(top) if _STAMP_RE.match(n))
    return [os.path.join(top, n) for n in names if storage.is_real_dir(os.path.join(top, n))]


def prune_unreadable(directory: str, fence: Callable[[], None] = _no_fence) -> list[str]:
    old = unreadable_sets(directory)[:-KEEP_UNREADABLE]
    if old:
        fence()
        for path in old:
            storage.remove_tree(path)
        log.info(
            "deleted %d older set(s) of files moved aside (%s); %s keeps the newest %d",
            len(old),
            ", ".join(os.path.basename(p) for p in old),
            os.path.join(directory, metadata.UNREADABLE_DIR),
            KEEP_UNREADABLE,
        )
    return old


def tree_size(top: str) -> int:
    """Bytes of the real files under ``top`` (links not followed)."""
    total = 0
    for directory, _, names in os.walk(top) if storage.is_local(top) else ():
        for n in names:
            st = storage.lstat(os.path.join(directory, n))
            total += st.st_size if st is not None and not os.path.islink(os.path.join(directory, n)) else 0
    return total


def clear_the_way(directory: str, step: int, fence: Callable[[], None] = _no_fence) -> None:
    """Move aside whatever already bears the names a save of ``step`` writes (a planted
    link, an unreadable checkpoint's remains): TensorFlow would write through a link."""
    in_the_way = metadata.names_in_the_way(directory, step)
    if not in_the_way:
        return
    into = move_aside(directory, in_the_way, fence)
    log.warning(
        "moved %s aside to %s: they were in the way of the save of step %d (nothing deleted)",
        ", ".join(os.path.basename(p) for p in in_the_way),
        into,
        step,
    )


def remove_leftovers(directory: str, fence: Callable[[], None] = _no_fence) -> list[str]:
    """Delete what saves interrupted by a crash left in ``directory`` (TensorFlow's
    ``ckpt-<step>_temp/`` shards, data shards of a step without index, ckptkit's own
    temporary files): only those names, and only real files and directories, never links."""
    fence()
    removed = [p for p in metadata.leftovers(directory) if storage.remove_tree(p) or storage.remove_file(p)]
    if removed:
        log.info(
            "removed what interrupted saves left in %s: %s",
            directory,
            ", ".join(os.path.basename(p) for p in removed),
        )
    return removed


def failure(directory: str, prefix: str, exc: object, needed: int | None) -> str:
    """What went wrong writing ``prefix``, with the space situation when the disk is full
    (``needed``: about how many bytes one checkpoint takes)."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    step = metadata.step_of(prefix)
    for path in metadata.names_in_the_way(os.path.dirname(prefix), step) if step is not None else []:
        if metadata.is_shard_temporary(os.path.basename(path)):
            storage.remove_tree(path)  # TensorFlow's partial shards of this save: useless now
    _remove_torn_index(prefix)
    if storage.disk_full(exc):
        return full_disk(directory, needed)
    return text


def _remove_torn_index(prefix: str) -> None:
    """A save that failed while TensorFlow merged its index (a full disk) can leave a torn
    ``.index`` under the final name, which the next launch would take for a checkpoint. An
    index that parses marks complete data (written before it): kept, and found by the next
    launch; one that does not is removed with its data files (this save's own: nothing was
    in the way of its names, see :func:`clear_the_way`)."""
    import tensorflow as tf

    index = prefix + ".index"
    if not storage.is_real_file(index):
        return
    try:
        tf.train.load_checkpoint(prefix)
        return
    except Exception:  # noqa: BLE001 - torn, truncated: not a checkpoint
        pass
    removed = [f for f in metadata.checkpoint_files(prefix) if storage.remove_file(f)]
    log.warning("removed the torn files of the failed save %s: %s", prefix, ", ".join(map(os.path.basename, removed)))


def full_disk(directory: str, needed: int | None, writing: str | None = None) -> str:
    """One line for a full disk: the directory, the bytes free (after what the failed write
    left was removed) and the bytes one checkpoint needs; what to do."""
    free = storage.free_bytes(directory)
    have = f"{free} bytes free" if free is not None else "its free space unknown"
    if not needed:
        need = ""
    elif free is None or free < needed:
        need = f", about {needed} bytes needed for one checkpoint"
    else:  # the estimate fell short of what the save wrote: say no more than is known
        need = f"; one checkpoint needs more than that (its variables and data position alone take {needed} bytes)"
    return (
        f"the disk holding {directory} is full ({have}{need})"
        + (f" while writing {os.path.basename(writing)}" if writing else "")
        + "; free space and launch again: the run resumes from its last complete checkpoint"
    )


def agree_state_file(directory: str, checkpoints: list, fence: Callable[[], None] = _no_fence) -> bool:
    """Rewrite TensorFlow's ``checkpoint`` state file when it does not list ``checkpoints``
    (what ``metadata.json`` and the files say): a kill between the rename of
    ``metadata.json`` and that of the state file leaves it naming an older checkpoint, and
    tools that read it (``tf.train.latest_checkpoint``, TensorBoard) would see the wrong
    latest until the next save. Returns whether it was rewritten."""
    want = metadata.state_file_text(checkpoints)
    if want is None:
        return False
    path = os.path.join(directory, metadata.STATE_FILE)
    have = None
    if storage.is_real_file(path):  # a link is replaced, never read through
        try:
            have = storage.read_text(path)
        except Exception:  # noqa: BLE001 - unreadable: rewritten
            have = None
    if have == want:
        return False
    fence()
    metadata.write_state_file(directory, checkpoints)
    log.info(
        "rewrote the checkpoint state file %s to name %s, the newest checkpoint (it %s)",
        path,
        os.path.basename(max(checkpoints, key=lambda c: c.step).path),
        "was missing or unreadable" if have is None else "named other checkpoints: a save was cut short",
    )
    return True


def check_state_file(directory: str) -> None:
    """Warn when TensorFlow's ``checkpoint`` state file cannot be parsed (ckptkit finds
    checkpoints by their files, and rewrites it at the next save)."""
    import tensorflow as tf

    state_file = os.path.join(directory, metadata.STATE_FILE)
    if not tf.io.gfile.exists(state_file):
        return
    try:
        tf.train.get_checkpoint_state(directory)
    except Exception as exc:  # noqa: BLE001 - any parse error: report, then rewrite
        log.warning(
            "ignoring unreadable checkpoint state file %s (%s); ckptkit finds "
            "checkpoints by their files, and rewrites it at the next save",
            state_file,
            str(exc).splitlines()[0][:200],
        )


def variables_size(trackables: Mapping[str, Any]) -> int:
    """Bytes of the variables a checkpoint holds: TensorFlow's and Keras 3's (which are no
    ``tf.Variable``), of the model, the optimizer (slots included) and every other object."""
    import tensorflow as tf

    seen, total = set(), 0
    for obj in trackables.values():
        variables = [obj] if isinstance(obj, tf.Variable) else list(getattr(obj, "variables", []) or [])
        for v in variables:
            v = getattr(v, "value", v) if not isinstance(v, tf.Variable) else v  # a Keras variable's
            if id(v) in seen or not isinstance(v, tf.Variable) or not v.shape.is_fully_defined():
                continue
            seen.add(id(v))
            if v.dtype.is_numpy_compatible and v.dtype != tf.string:
                total += v.shape.num_elements() * v.dtype.size
    return total


def write_bookkeeping(directory: str, book: Any, *, best_metric, best_mode, fence: Callable[[], None] = _no_fence):
    """Write ``metadata.json`` and the state file for the checkpoints ``book`` keeps, then
    delete the files of those it drops (each step after the fence)."""
    import tensorflow as tf

    plan = book.settle()
    fence()
    tf.io.gfile.makedirs(directory)
    metadata.write_metadata(directory, plan.kept, best=plan.best, best_metric=best_metric, best_mode=best_mode)
    fence()
    metadata.write_state_file(directory, plan.kept)
    if not plan.dropped:
        return
    fence()
    names = storage.listdir(directory)
    for c in plan.dropped:
        for f in metadata.checkpoint_files(c.path, names):
            storage.remove_file(f)
        book.forget(c.step)
        log.info("deleted checkpoint %s (step %d) by retention", c.path, c.step)
