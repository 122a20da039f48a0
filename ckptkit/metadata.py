"""The bookkeeping files of a checkpoint directory.

``metadata.json`` holds, for every checkpoint ckptkit keeps, its step, wall time, save
duration, size and eval metrics, and which checkpoints are best. ``checkpoint`` is
TensorFlow's own state file, kept so that ``tf.train.latest_checkpoint(dir)`` and
``tf.train.CheckpointManager(dir)`` see the same checkpoints ckptkit does.

Both are written to a temporary name and renamed into place, so a reader sees the old file
or the new one, never half of one. The files on disk are the truth: :func:`scan` reconciles
the metadata with the checkpoints that really exist.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from typing import Dict, List, Optional, Sequence

import tensorflow as tf

from ckptkit.policies import CheckpointInfo

log = logging.getLogger("ckptkit")

METADATA_FILE = "metadata.json"
STATE_FILE = "checkpoint"
PREFIX = "ckpt"
FORMAT_VERSION = 1
_INDEX_RE = re.compile(rf"^{PREFIX}-(\d+)\.index$")


def checkpoint_prefix(directory: str, step: int) -> str:
    return os.path.join(directory, f"{PREFIX}-{step}")


def step_of(prefix: str) -> Optional[int]:
    """The step encoded in a ckptkit checkpoint prefix, or None for another name."""
    m = _INDEX_RE.match(os.path.basename(prefix) + ".index")
    return int(m.group(1)) if m else None


def checkpoint_files(prefix: str) -> List[str]:
    """The files of the checkpoint at ``prefix``: its index and data shards."""
    return tf.io.gfile.glob(prefix + ".index") + tf.io.gfile.glob(prefix + ".data-?????-of-?????")


def files_size(prefix: str) -> int:
    return sum(tf.io.gfile.stat(f).length for f in checkpoint_files(prefix))


def _is_local(path: str) -> bool:
    return "://" not in path


def fsync_path(path: str) -> None:
    """Flush a local file or directory to disk (no-op for remote filesystems)."""
    if not _is_local(path):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_checkpoint(prefix: str) -> None:
    """Flush a checkpoint's files and its directory entry before anything points at them."""
    for f in checkpoint_files(prefix):
        fsync_path(f)
    fsync_path(os.path.dirname(prefix) or ".")


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, flushed, renamed into place."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(text)
    fsync_path(tmp)
    tf.io.gfile.rename(tmp, path, overwrite=True)
    fsync_path(os.path.dirname(path) or ".")


def symlinked_files(prefix: str) -> List[str]:
    """Files of the checkpoint at ``prefix`` that are symbolic links (refused by ckptkit)."""
    if not _is_local(prefix):
        return []
    return [f for f in checkpoint_files(prefix) if os.path.islink(f)]


def _finite_or_none(v):
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def read_document(directory: str) -> dict:
    """The parsed ``metadata.json``; {} when absent, and {} with a warning when unreadable."""
    path = os.path.join(directory, METADATA_FILE)
    if not tf.io.gfile.exists(path):
        return {}
    try:
        with tf.io.gfile.GFile(path, "r") as f:
            doc = json.load(f)
        if not isinstance(doc, dict) or not isinstance(doc.get("checkpoints"), list):
            raise ValueError("no list of checkpoints")
        for entry in doc["checkpoints"]:
            int(entry["step"])
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable checkpoint metadata %s (%s); metrics of existing "
                    "checkpoints are unknown until they are saved again", path, exc)
        return {}
    return doc


def read_metadata(directory: str) -> Dict[int, dict]:
    """Per-step entries of ``metadata.json`` (see read_document)."""
    return {int(e["step"]): e for e in read_document(directory).get("checkpoints", [])}


def scan(directory: str) -> List[CheckpointInfo]:
    """The complete checkpoints in ``directory``, oldest first, with their metadata.

    A checkpoint counts once its ``.index`` file exists (TensorFlow writes it last). A
    metadata entry whose files vanished is dropped; a checkpoint without an entry appears
    with unknown metrics and its file time.
    """
    if not tf.io.gfile.isdir(directory):
        return []
    meta = read_metadata(directory)
    names = [n.rstrip("/") for n in tf.io.gfile.listdir(directory)]
    _report_incomplete(directory, names)
    found = []
    for name in names:
        m = _INDEX_RE.match(name)
        if not m:
            continue
        step = int(m.group(1))
        prefix = checkpoint_prefix(directory, step)
        links = symlinked_files(prefix)
        if links:
            log.warning("refusing checkpoint %s: %s is a symbolic link; ckptkit reads and deletes "
                        "only its own files inside %s", prefix, ", ".join(links), directory)
            continue
        entry = meta.get(step, {})
        when = entry.get("time")
        if when is None:
            when = tf.io.gfile.stat(prefix + ".index").mtime_nsec / 1e9
        metrics = entry.get("metrics")
        found.append(CheckpointInfo(
            step=step,
            path=prefix,
            time=float(when),
            metrics=dict(metrics) if isinstance(metrics, dict) else None,
            size=entry.get("size"),
            save_seconds=entry.get("save_seconds"),
            blocking_seconds=entry.get("blocking_seconds"),
        ))
    return sorted(found, key=lambda c: c.step)


_DATA_RE = re.compile(rf"^{PREFIX}-(\d+)\.data-\d{{5}}-of-\d{{5}}$")
_TEMP_RE = re.compile(rf"^{PREFIX}-(\d+)_temp$")


def _report_incomplete(directory: str, names: Sequence[str]) -> None:
    """Warn about the remains of saves that never completed (a crash mid-write)."""
    indexed = {int(m.group(1)) for m in map(_INDEX_RE.match, names) if m}
    orphans = sorted({n for n in names
                      if (_DATA_RE.match(n) and int(_DATA_RE.match(n).group(1)) not in indexed)
                      or _TEMP_RE.match(n)})
    if orphans:
        log.warning("ignoring incomplete checkpoint files in %s (a save that did not finish; "
                    "no .index): %s", directory, ", ".join(orphans))


def write_metadata(directory: str, checkpoints: Sequence[CheckpointInfo], *,
                   best: Sequence[int], best_metric: Optional[str], best_mode: str) -> None:
    doc = {
        "format": FORMAT_VERSION,
        "updated": time.time(),
        "latest": max((c.step for c in checkpoints), default=None),
        "best_metric": best_metric,
        "best_mode": best_mode,
        "best": list(best),
        "checkpoints": [
            {
                "step": c.step,
                "path": os.path.basename(c.path),
                "time": c.time,
                "save_seconds": c.save_seconds,
                "blocking_seconds": c.blocking_seconds,
                "size": c.size,
                "metrics": None if c.metrics is None
                else {k: _finite_or_none(v) for k, v in c.metrics.items()},
            }
            for c in sorted(checkpoints, key=lambda c: c.step)
        ],
    }
    atomic_write_text(os.path.join(directory, METADATA_FILE), json.dumps(doc, indent=1) + "\n")


def write_state_file(directory: str, checkpoints: Sequence[CheckpointInfo]) -> None:
    """TensorFlow's ``checkpoint`` state file, with paths relative to ``directory``."""
    ordered = sorted(checkpoints, key=lambda c: c.step)
    if not ordered:
        return
    lines = [f'model_checkpoint_path: "{os.path.basename(ordered[-1].path)}"']
    lines += [f'all_model_checkpoint_paths: "{os.path.basename(c.path)}"' for c in ordered]
    lines += [f"all_model_checkpoint_timestamps: {c.time!r}" for c in ordered]
    atomic_write_text(os.path.join(directory, STATE_FILE), "\n".join(lines) + "\n")
