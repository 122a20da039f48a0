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
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ckptkit import gfile, storage
from ckptkit.ownership import OWNER_FILE
from ckptkit.policies import CheckpointInfo

log = logging.getLogger("ckptkit")

METADATA_FILE = "metadata.json"
STATE_FILE = "checkpoint"
PREFIX = "ckpt"
FORMAT_VERSION = 1
#: Where unreadable checkpoints, and files in the way of a save, are moved (the newest sets kept).
UNREADABLE_DIR = "unreadable"
_INDEX_RE = re.compile(rf"^{PREFIX}-(\d+)\.index$")
_DATA_RE = re.compile(rf"^{PREFIX}-(\d+)\.data-\d{{5}}-of-\d{{5}}$")
# TensorFlow writes a save's shards into <prefix>_temp (or _temp_<hex> on some filesystems)
# and merges them into <prefix>.index and .data-* when the save completes.
_TEMP_RE = re.compile(rf"^{PREFIX}-(\d+)_temp(_[0-9a-f]+)?$")
#: The local tier's record of itself, and the persistent tier's of the last launch that
#: opened a local tier (ckptkit.local_tier).
LOCAL_RECORD_FILE = ".ckptkit-local.json"
LINEAGE_FILE = ".ckptkit-lineage.json"
# ckptkit's own temporaries: <bookkeeping file>.tmp-<hex> (older versions: .tmp-<pid>), and a
# checkpoint file's copy on its way from the local tier: ckpt-<step>.index.tmp-<hex>.
_OWN_TMP_RE = re.compile(
    rf"^({re.escape(METADATA_FILE)}|{STATE_FILE}|{re.escape(OWNER_FILE)}|{re.escape(LOCAL_RECORD_FILE)}"
    rf"|{re.escape(LINEAGE_FILE)}|{PREFIX}-\d+\.(index|data-\d{{5}}-of-\d{{5}}))"
    rf"{re.escape(storage.TMP_MARK)}[0-9a-f]+$"
)
# Any steps ckptkit could write: larger ones are no step of a real run (and no int64).
_MAX_STEP = 2**62


def checkpoint_prefix(directory: str, step: int) -> str:
    return os.path.join(directory, f"{PREFIX}-{step}")


def step_of(prefix: str) -> int | None:
    """The step encoded in a ckptkit checkpoint prefix, or None for another name."""
    m = _INDEX_RE.match(os.path.basename(prefix) + ".index")
    return int(m.group(1)) if m else None


def _is_file_of(name: str, base: str) -> bool:
    return name == base + ".index" or (name.startswith(base + ".data-") and bool(_DATA_RE.match(name)))


def checkpoint_files(prefix: str, names: Sequence[str] | None = None) -> list[str]:
    """The files of the checkpoint at ``prefix``: its index and data shards.

    Matched by name in a listing of the directory (``names``, else listed now): the path
    may hold glob characters, so it is never globbed.
    """
    directory, base = os.path.split(prefix)
    names = storage.listdir(directory) if names is None else names
    return [os.path.join(directory, n) for n in sorted(names) if _is_file_of(n, base)]


def is_shard_temporary(name: str) -> bool:
    """Whether ``name`` is TensorFlow's temporary shard directory of a save in progress."""
    return bool(_TEMP_RE.match(name))


def _step_in(pattern: re.Pattern[str], name: str) -> int | None:
    """The step in ``name`` when ``pattern`` (its first group the step) matches it."""
    m = pattern.match(name)
    return int(m.group(1)) if m else None


def names_in_the_way(directory: str, step: int) -> list[str]:
    """Everything already named like the files a save of ``step`` writes (stale or planted)."""
    base = f"{PREFIX}-{step}"
    return [
        os.path.join(directory, n)
        for n in sorted(storage.listdir(directory))
        if _is_file_of(n, base) or _step_in(_TEMP_RE, n) == step
    ]


def files_size(prefix: str) -> int:
    return sum(gfile.stat(f).length for f in checkpoint_files(prefix))


def fsync_checkpoint(prefix: str) -> None:
    """Flush a checkpoint's files and its directory entry before anything points at them."""
    for f in checkpoint_files(prefix):
        storage.fsync_path(f)
    storage.fsync_path(os.path.dirname(prefix) or ".")


def _finite_or_none(v):
    if isinstance(v, bool):
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _number(v, low: float, high: float) -> float | None:
    v = _finite_or_none(v)
    return v if v is not None and low <= v <= high else None


@dataclass
class _Entry:
    """One checkpoint's entry of ``metadata.json``, each field checked."""

    step: int
    time: float | None = None
    metrics: dict[str, float | None] | None = None
    size: int | None = None
    save_seconds: float | None = None
    blocking_seconds: float | None = None
    uid: str | None = None
    layer_names: dict[str, str] | None = None
    data: dict | None = None
    problems: list[str] = field(default_factory=list)


def _parse_entry(raw) -> _Entry | None:
    """The checked fields of a raw entry; None when it has no usable step."""
    if not isinstance(raw, dict):
        return None
    step = raw.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= _MAX_STEP:
        return None
    e = _Entry(step=step)

    def take(key, value):
        if raw.get(key) is not None and value is None:
            e.problems.append(f"{key}={raw.get(key)!r}")
        return value

    # Times from 1970 to the year 5138: enough to rule out garbage, any real clock fits.
    e.time = take("time", _number(raw.get("time"), 0.0, 1e11))
    size = raw.get("size")
    e.size = take("size", size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None)
    e.save_seconds = take("save_seconds", _number(raw.get("save_seconds"), 0.0, 1e9))
    e.blocking_seconds = take("blocking_seconds", _number(raw.get("blocking_seconds"), 0.0, 1e9))
    uid = raw.get("uid")
    e.uid = take("uid", uid if isinstance(uid, str) and uid else None)
    names = raw.get("layer_names")
    e.layer_names = take(
        "layer_names",
        dict(names)
        if isinstance(names, dict)
        and all(isinstance(k, str) and isinstance(v, str) and "/" not in v for k, v in names.items())
        else None,
    )
    data = raw.get("data")
    e.data = take("data", dict(data) if isinstance(data, dict) and all(isinstance(k, str) for k in data) else None)
    metrics = raw.get("metrics")
    if isinstance(metrics, dict) and all(isinstance(k, str) for k in metrics):
        e.metrics = {k: _finite_or_none(v) for k, v in metrics.items()}
        bad = [
            k
            for k, v in metrics.items()
            if v is not None and e.metrics[k] is None and not (isinstance(v, float) and math.isnan(v))
        ]
        if bad:
            e.problems.append(f"metrics {', '.join(bad)}")
    else:
        take("metrics", None)
    return e


def read_document(directory: str) -> dict:
    """The parsed ``metadata.json``; {} when absent, and {} with a warning when unreadable.

    Every entry's fields are checked (see :func:`read_entries`); ``best`` holds only steps.
    """
    path = os.path.join(directory, METADATA_FILE)
    if not gfile.exists(path):
        return {}
    try:
        with gfile.open_file(path, "r") as f:
            doc = json.load(f)
        if not isinstance(doc, dict) or not isinstance(doc.get("checkpoints"), list):
            raise ValueError("no list of checkpoints")
    except (ValueError, UnicodeDecodeError) + gfile.errors() as exc:
        log.warning(
            "ignoring unreadable checkpoint metadata %s (%s); metrics of existing "
            "checkpoints are unknown until they are saved again",
            path,
            exc,
        )
        return {}
    best = doc.get("best")
    doc["best"] = [b for b in best if isinstance(b, int) and not isinstance(b, bool)] if isinstance(best, list) else []
    for key in ("best_metric", "best_mode"):
        if not isinstance(doc.get(key), (str, type(None))):
            doc[key] = None
    return doc


def read_entries(directory: str, doc: dict | None = None) -> dict[int, _Entry]:
    """Per-step checked entries of ``metadata.json``.

    Entries without a usable step are dropped, fields of the wrong type or out of range are
    treated as unknown (and rebuilt from the files); both are reported once, by file name.
    """
    doc = read_document(directory) if doc is None else doc
    out: dict[int, _Entry] = {}
    problems = []
    for raw in doc.get("checkpoints", []):
        e = _parse_entry(raw)
        if e is None:
            problems.append(f"entry {json.dumps(raw)[:80]} (no valid step)")
            continue
        if e.problems:
            problems.append(f"step {e.step}: {'; '.join(e.problems)}")
        out[e.step] = e
    if problems:
        log.warning(
            "checkpoint metadata %s has invalid values, ignored and rebuilt from the files on disk: %s",
            os.path.join(directory, METADATA_FILE),
            " | ".join(problems),
        )
    return out


def _size_and_time(directory: str, prefix: str, paths: list[str], local: bool) -> tuple[int, float] | None:
    """The bytes and the ``.index`` file's time of one checkpoint's files; None when one is a
    link (refused, with a warning) or vanished while the directory was listed."""
    if not local:
        return sum(gfile.stat(p).length for p in paths), gfile.stat(prefix + ".index").mtime
    stats = [storage.lstat(p) for p in paths]
    links = [p for p, st in zip(paths, stats, strict=True) if st is not None and not stat.S_ISREG(st.st_mode)]
    if links:
        log.warning(
            "refusing checkpoint %s: %s is a symbolic link (or no regular file); ckptkit reads and deletes "
            "only its own files inside %s",
            prefix,
            ", ".join(links),
            directory,
        )
        return None
    present = [st for st in stats if st is not None]
    if len(present) < len(stats):
        return None  # deleted while we listed
    return sum(st.st_size for st in present), present[paths.index(prefix + ".index")].st_mtime


def scan(directory: str, *, doc: dict | None = None) -> list[CheckpointInfo]:
    """The complete checkpoints in ``directory``, oldest first, with their metadata.

    A checkpoint counts once its ``.index`` file exists (TensorFlow writes it last). A
    metadata entry whose files vanished is dropped; a checkpoint without an entry appears
    with unknown metrics and its file time. Sizes are what is on disk. The directory is
    listed once and each file stat'ed once: linear in the number of files.
    """
    if not gfile.isdir(directory):
        return []
    meta = read_entries(directory, doc)
    names = storage.listdir(directory)
    _report_incomplete(directory, names)
    files: dict[int, list[str]] = {}
    indexed = set()
    for name in names:
        m = _INDEX_RE.match(name) or _DATA_RE.match(name)
        if m:
            step = int(m.group(1))
            files.setdefault(step, []).append(name)
            if name.endswith(".index"):
                indexed.add(step)
    local = storage.is_local(directory)
    found = []
    for step in sorted(indexed):
        prefix = checkpoint_prefix(directory, step)
        sized = _size_and_time(directory, prefix, [os.path.join(directory, n) for n in files[step]], local)
        if sized is None:
            continue
        size, mtime = sized
        entry = meta.get(step) or _Entry(step=step)
        found.append(
            CheckpointInfo(
                step=step,
                path=prefix,
                time=entry.time if entry.time is not None else mtime,
                metrics=entry.metrics,
                size=size,
                save_seconds=entry.save_seconds,
                blocking_seconds=entry.blocking_seconds,
                uid=entry.uid,
                layer_names=entry.layer_names,
                data=entry.data,
                recorded_size=entry.size,
            )
        )
    return found


def _unfinished(names: Sequence[str]) -> list[str]:
    """The names, among ``names``, of what saves that never completed leave: TensorFlow's
    ``ckpt-<step>_temp`` shard directories and data shards of a step without an index."""
    indexed = {int(m.group(1)) for m in map(_INDEX_RE.match, names) if m}
    return sorted(
        n
        for n in names
        if ((data_step := _step_in(_DATA_RE, n)) is not None and data_step not in indexed) or _TEMP_RE.match(n)
    )


def leftovers(directory: str) -> list[str]:
    """What saves that never completed left behind (see :func:`_unfinished`), and ckptkit's
    own temporary bookkeeping files. Only names ckptkit's saves create."""
    names = storage.listdir(directory)
    ours = _unfinished(names) + [n for n in names if _OWN_TMP_RE.match(n)]
    return [os.path.join(directory, n) for n in sorted(ours)]


def _report_incomplete(directory: str, names: Sequence[str]) -> None:
    """Warn about the remains of saves that never completed (a crash mid-write)."""
    orphans = _unfinished(names)
    if orphans:
        log.warning(
            "ignoring incomplete checkpoint files in %s (a save that did not finish; no .index): %s",
            directory,
            ", ".join(orphans),
        )


def write_metadata(
    directory: str,
    checkpoints: Sequence[CheckpointInfo],
    *,
    best: Sequence[int],
    best_metric: str | None,
    best_mode: str,
) -> None:
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
                "size": c.recorded_size if c.recorded_size is not None else c.size,  # as saved
                "uid": c.uid,
                **({"layer_names": dict(c.layer_names)} if c.layer_names else {}),
                **({"data": dict(c.data)} if c.data else {}),
                "metrics": None if c.metrics is None else {k: _finite_or_none(v) for k, v in c.metrics.items()},
            }
            for c in sorted(checkpoints, key=lambda c: c.step)
        ],
    }
    storage.atomic_write_text(os.path.join(directory, METADATA_FILE), json.dumps(doc, indent=1) + "\n")


def state_file_text(checkpoints: Sequence[CheckpointInfo]) -> str | None:
    """What TensorFlow's ``checkpoint`` state file holds for ``checkpoints`` (None: none)."""
    ordered = sorted(checkpoints, key=lambda c: c.step)
    if not ordered:
        return None
    lines = [f'model_checkpoint_path: "{os.path.basename(ordered[-1].path)}"']
    lines += [f'all_model_checkpoint_paths: "{os.path.basename(c.path)}"' for c in ordered]
    lines += [f"all_model_checkpoint_timestamps: {c.time!r}" for c in ordered]
    return "\n".join(lines) + "\n"


def write_state_file(directory: str, checkpoints: Sequence[CheckpointInfo]) -> None:
    """TensorFlow's ``checkpoint`` state file, with paths relative to ``directory``."""
    text = state_file_text(checkpoints)
    if text is not None:
        storage.atomic_write_text(os.path.join(directory, STATE_FILE), text)
