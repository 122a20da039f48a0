"""The local tier: frequent saves to node-local storage, some of them copied to ``checkpoint.dir``.

With ``checkpoint.local_dir`` set, every save of the chief is written into a directory of its
own below it (``<local_dir>/<run name>-<hash of checkpoint.dir>``: runs and sweep jobs that
share one ``local_dir`` never meet), a checkpoint directory like ``checkpoint.dir`` with its
own ``metadata.json``, state file and retention (the newest ``checkpoint.local_max_to_keep``).
Some saves are also *persisted*: copied to ``checkpoint.dir`` (the persistent tier, possibly
shared or ``gs://``) in the background by one copier thread. A save that is a new best, the
last one, a signal's or one of ``checkpoint.save_at_steps`` is always persisted, and the end of
``fit()`` waits for its copy; otherwise one save every ``checkpoint.persist_every_seconds``
(or every ``checkpoint.persist_every_saves``-th) is, never while a copy is still queued.

The protocol, as what each party may assume and what it checks before it acts:

**Which launches wrote the tier.** Every launch that opens the tier gets a random launch id.
``checkpoint.dir`` holds ``.ckptkit-lineage.json``: the id of the last launch that opened
the tier. The tier holds ``.ckptkit-local.json``: the ``checkpoint.dir`` it belongs to, the
host (and boot) that wrote it, and the ids of the launches whose saves it may hold.

**When a launch reads the tier.** Only when its record names this ``checkpoint.dir``, this
host, and the launch that ``checkpoint.dir`` names as the last. Then its checkpoints join the
persistent ones as resume candidates, newest first (a step's local copy before its persistent
one). Otherwise:

- nothing there: a fresh tier;
- a record of another ``checkpoint.dir``, or checkpoints without a record: refused, naming
  it (another run's newest work may be there, and nothing says whose);
- this run's tier, but of another host or not written by the last launch (a launch on
  another node went on from the persistent tier since: these checkpoints are off the run's
  line) or ``checkpoint.resume=never``: *stale*; its checkpoints are removed, with a log line.

**The order of the records.** An opening launch writes the tier's record with [the last
launch, itself], then the lineage with itself: a crash between the two leaves a tier the next
launch still accepts (the last launch is in the list), and nothing was saved in between.
A first launch (no lineage yet) writes only itself, so a tier left by a run directory that
was deleted and started afresh is stale, never adopted.

**Copies.** Each file is copied to a temporary name in ``checkpoint.dir`` and flushed; the
fence is checked; the files are renamed into place, the data first and the index last; the
directory is flushed; then the checkpoint is recorded in ``checkpoint.dir``'s metadata (after
the fence again). Until it is recorded, its local files are pinned: the local retention never
deletes them. A crash at any instant leaves in ``checkpoint.dir`` only temporaries and data
without an index (removed by the next launch), or a complete copy not yet in the metadata
(found by its files, its metrics unknown).

**Fencing.** Every commit point of both tiers calls the run lock's check; the tier's own
directory is locked like a ``checkpoint.dir`` outside the run directory.

A clean finish (every save persisted, ``trainer.max_steps`` reached) removes the tier's
checkpoints: everything is in ``checkpoint.dir``, and ``/dev/shm`` is memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Callable, Sequence

from ckptkit import checkpoint_files, gfile, metadata, storage
from ckptkit.checkpoint_book import CheckpointBook
from ckptkit.errors import CheckpointSaveError, CkptkitError
from ckptkit.lock_records import boot_id, hostname
from ckptkit.policies import CheckpointInfo, KeepAny

log = logging.getLogger("ckptkit")

RUN_FILE = "ckptkit_run.yaml"  # ckptkit.runinfo.RUN_FILE (which imports TensorFlow)
RECORD_FILE = metadata.LOCAL_RECORD_FILE
LINEAGE_FILE = metadata.LINEAGE_FILE
DEFAULT_MAX_TO_KEEP = 2
DEFAULT_PERSIST_EVERY_SECONDS = 300.0
_SLUG_RE = re.compile(r"[^A-Za-z0-9._-]+")


class LocalTierOwnedError(CkptkitError, RuntimeError):
    """The local tier's directory holds checkpoints of another run (or of nobody known)."""


def _tf_gfile():
    import tensorflow as tf

    return tf.io.gfile


def _no_fence() -> None:
    return None


def _abs(path: str) -> str:
    return os.path.abspath(path) if storage.is_local(path) else path


def tier_dir(local_dir: str, persistent: str) -> str:
    """The directory of ``persistent``'s local tier below ``local_dir``: the checkpoint
    directory's parent's name (the run directory's, by default) and a hash of its absolute path."""
    where = _abs(persistent)
    slug = _SLUG_RE.sub("_", os.path.basename(os.path.dirname(where.rstrip("/"))) or "run")[:64]
    return os.path.join(local_dir, f"{slug}-{hashlib.sha256(where.encode()).hexdigest()[:12]}")


def _read_json(path: str) -> dict | None:
    """A small JSON record of ours: None when absent, a link, or unreadable (with a warning)."""
    if not gfile.exists(path) or storage.is_link(path):
        return None
    try:
        with gfile.open_file(path) as f:  # without TensorFlow for a local path (ckptkit ls)
            value = json.load(f)
    except (ValueError, UnicodeDecodeError) + gfile.errors():
        log.warning("ignoring the unreadable record %s", path)
        return None
    return value if isinstance(value, dict) else None


def read_lineage(persistent: str) -> str | None:
    """The id of the last launch that opened ``persistent``'s local tier."""
    launch = (_read_json(os.path.join(persistent, LINEAGE_FILE)) or {}).get("launch")
    return launch if isinstance(launch, str) else None


def write_lineage(persistent: str, launch: str, fence: Callable[[], None] = _no_fence) -> None:
    fence()
    _tf_gfile().makedirs(persistent)
    record = {"launch": launch, "host": hostname(), "time": time.time()}
    storage.atomic_write_text(os.path.join(persistent, LINEAGE_FILE), json.dumps(record) + "\n")


def end_lineage(persistent: str, fence: Callable[[], None] = _no_fence) -> None:
    """A launch without a local tier: where an earlier launch had one, no local tier written
    before now is on the run's line any more (the lineage names a launch no tier lists)."""
    if read_lineage(persistent) is not None:
        write_lineage(persistent, secrets.token_hex(8), fence)


def judge(record: dict | None, has_checkpoints: bool, *, persistent: str, host: str, last_launch: str | None) -> str:
    """``fresh``, ``mine`` (read its checkpoints), ``stale`` (remove them) or ``foreign`` (refuse)."""
    if record is None:
        return "foreign" if has_checkpoints else "fresh"
    if record.get("persistent") != _abs(persistent):
        return "foreign"
    launches = record.get("launches")
    ok = isinstance(launches, list) and last_launch is not None and last_launch in launches
    return "mine" if ok and record.get("host") == host else "stale"


def recorded_tier(persistent: str, run_dirs: Sequence[str]) -> tuple[str, list[int], str] | None:
    """The local tier on this host of the run's last accepted launch, as its record (in the
    first of ``run_dirs`` that has one) names it: (directory, its steps, :func:`judge`'s
    verdict); None when that launch had no ``checkpoint.local_dir``."""
    import yaml

    for run_dir in run_dirs:
        try:  # read as YAML, without TensorFlow (ckptkit ls); resume checked the record already
            with gfile.open_file(os.path.join(run_dir, RUN_FILE)) as f:
                record = yaml.safe_load(f)
        except Exception:  # noqa: BLE001 - not a run directory
            continue
        if not isinstance(record, dict):
            continue
        local_dir = ((record.get("config") or {}).get("checkpoint") or {}).get("local_dir")
        if not local_dir:
            return None
        directory = tier_dir(str(local_dir), persistent)
        found = metadata.scan(directory) if storage.is_real_dir(directory) else []
        record_of_tier = _read_json(os.path.join(directory, RECORD_FILE))
        last = read_lineage(persistent)
        verdict = judge(record_of_tier, bool(found), persistent=persistent, host=hostname(), last_launch=last)
        return directory, [c.step for c in found], verdict
    return None


def describe(persistent: str, run_dirs: Sequence[str]) -> str | None:
    """One line on the run's local tier on this host, for ``ckptkit ls``."""
    tier = recorded_tier(persistent, run_dirs)
    if tier is None:
        return None
    directory, steps, verdict = tier
    what = {
        "mine": "a relaunch here resumes from its newest if it is newer than the above",
        "stale": "stale: the next launch here removes them",
        "foreign": "not this run's: a launch here is refused",
        "fresh": "",
    }[verdict]
    return f"local tier on this host, {directory}: " + (
        f"steps {', '.join(map(str, steps))} ({what})" if steps else "no checkpoint"
    )


def warn_if_left_behind(persistent: str, run_dir: str, newest: int | None) -> None:
    """A launch without ``checkpoint.local_dir`` after one with it: say so when the tier the
    last launch left on this host holds newer steps than ``persistent``'s newest, which this
    launch does not resume from (and which its start makes stale)."""
    tier = recorded_tier(persistent, [run_dir])
    if tier is None or tier[2] != "mine" or not tier[1] or (newest is not None and max(tier[1]) <= newest):
        return
    log.warning(
        "the last launch saved up to step %d in its local tier %s, newer than checkpoint.dir's %s; this launch has "
        "no checkpoint.local_dir, so it resumes from checkpoint.dir and that tier becomes stale (launch with "
        "checkpoint.local_dir=%s to resume from it)",
        max(tier[1]),
        tier[0],
        "newest, step " + str(newest) if newest is not None else "(none)",
        os.path.dirname(tier[0]),
    )


def copy_checkpoint(prefix: str, into: str, fence: Callable[[], None] = _no_fence) -> str:
    """Copy the checkpoint at ``prefix`` into the directory ``into`` (see the module's
    "Copies"); returns the new prefix."""
    files = metadata.checkpoint_files(prefix)
    if not any(f.endswith(".index") for f in files):
        raise FileNotFoundError(f"{prefix}.index does not exist: nothing to copy")
    _tf_gfile().makedirs(into)
    step = metadata.step_of(prefix)
    if step is not None:
        checkpoint_files.clear_the_way(into, step, fence)
    files.sort(key=lambda f: f.endswith(".index"))  # the index last: it marks a complete copy
    temporaries: list[tuple[str, str]] = []
    try:
        for f in files:
            target = os.path.join(into, os.path.basename(f))
            tmp = storage.temporary_name(target)
            temporaries.append((tmp, target))
            if storage.is_local(tmp):
                shutil.copyfile(f, tmp, follow_symlinks=False)
            else:
                _tf_gfile().copy(f, tmp, overwrite=True)
            storage.fsync_path(tmp)
        fence()
        for tmp, target in temporaries:
            _tf_gfile().rename(tmp, target, overwrite=True)
    except BaseException:
        for tmp, _ in temporaries:
            storage.remove_file(tmp)
        raise
    storage.fsync_path(into)
    return os.path.join(into, os.path.basename(prefix))


def _stale_reason(record: dict | None, discard: bool) -> str:
    if discard:
        return "checkpoint.resume=never"
    if record is None:
        return "no record"
    if record.get("host") != hostname():
        return f"written on host {record.get('host')}, and this is {hostname()}"
    return "written by a launch that is not the run's last: another launch went on from checkpoint.dir since"


def make_place(directory: str) -> None:
    """Create the tier's directory, readable by this user alone (``/dev/shm`` and node-local
    scratch are shared by every user of the node); refuse one that is a symbolic link or
    belongs to another user: its checkpoints would be written, read or removed elsewhere."""
    st = storage.lstat(directory)
    if st is None:
        os.makedirs(os.path.dirname(directory) or ".", exist_ok=True)
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:  # another launch made it between the two: judged below
            pass
        st = storage.lstat(directory)
    if st is None or not stat.S_ISDIR(st.st_mode):
        what = "a symbolic link" if st is not None and stat.S_ISLNK(st.st_mode) else "not a directory"
        raise LocalTierOwnedError(
            f"the local tier {directory} is {what}: ckptkit writes its checkpoints only into a directory of its own"
        )
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise LocalTierOwnedError(
            f"the local tier {directory} belongs to another user (uid {st.st_uid}): give this run another "
            "checkpoint.local_dir"
        )


def below(local_dir: str | None, persistent: str, **settings) -> LocalTier | None:
    """The local tier of ``persistent`` below ``local_dir`` (:func:`tier_dir`); None without one."""
    return LocalTier(tier_dir(str(local_dir), persistent), persistent, **settings) if local_dir else None


class _KeepPinned:
    """Retention: the checkpoints whose copy to the persistent tier is not recorded yet."""

    def __init__(self, pinned: set[int]):
        self.pinned = pinned

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> frozenset[int]:
        return frozenset(c.step for c in checkpoints if c.step in self.pinned)


class LocalTier:
    """One run's local tier: its directory, book, persist rule and copier (see the module)."""

    def __init__(
        self,
        directory: str,
        persistent: str,
        *,
        max_to_keep: int = DEFAULT_MAX_TO_KEEP,
        persist_every_seconds: float | None = DEFAULT_PERSIST_EVERY_SECONDS,
        persist_every_saves: int | None = None,
        fence: Callable[[], None] = _no_fence,
    ):
        if not storage.is_local(directory):
            raise ValueError(f"the local tier {directory} must be a local path (node-local disk or /dev/shm)")
        self.directory = str(directory)
        self.persistent = str(persistent)
        self.fence = fence
        self.every_seconds = persist_every_seconds
        self.every_saves = persist_every_saves
        self.book = CheckpointBook(max_to_keep=max_to_keep)
        self._pinned: set[int] = set()
        self.book.retention = KeepAny((*self.book.retention.policies, _KeepPinned(self._pinned)))
        self._lock = threading.Lock()
        self.opened = False
        self.launch: str | None = None
        self._last_persist = time.monotonic()
        self._saves_since_persist = 0
        self.copier = Copier()
        self._copied: list[tuple[int, float]] = []  # (step, seconds) of the copies since drain_copied()

    # --- opening ---------------------------------------------------------------------------

    def open(self, *, discard: bool = False) -> str:
        """Judge the tier (see the module's protocol), adopt or clear it, and record this
        launch in both tiers; returns the verdict. Idempotent."""
        if self.opened:
            return "open"
        make_place(self.directory)
        record = _read_json(os.path.join(self.directory, RECORD_FILE))
        last = read_lineage(self.persistent)
        found = metadata.scan(self.directory) if storage.is_real_dir(self.directory) else []
        verdict = judge(record, bool(found), persistent=self.persistent, host=hostname(), last_launch=last)
        if verdict == "foreign":
            owner = (record or {}).get("persistent")
            raise LocalTierOwnedError(
                f"the local tier {self.directory} holds checkpoints of "
                + (f"another checkpoint.dir ({owner})" if owner else "no run ckptkit recorded")
                + f", not of {_abs(self.persistent)}: they may be another run's newest work. Move them away, or "
                "give this run another checkpoint.local_dir"
            )
        if verdict == "stale" or (discard and found):
            self._clear(found, _stale_reason(record, discard))
            found = []
        self.fence()
        self.launch = secrets.token_hex(8)
        launches = ([last] if last and verdict == "mine" else []) + [self.launch]
        mine = {"persistent": _abs(self.persistent), "host": hostname(), "boot": boot_id(), "launches": launches}
        storage.atomic_write_text(os.path.join(self.directory, RECORD_FILE), json.dumps(mine) + "\n")
        write_lineage(self.persistent, self.launch, self.fence)
        if verdict == "mine":
            checkpoint_files.remove_leftovers(self.directory, self.fence)
            for c in found:
                self.book.add(c)
        self._last_persist = time.monotonic()
        self.opened = True
        return verdict

    def _clear(self, found: list[CheckpointInfo], why: str) -> None:
        """Remove a stale tier's checkpoints and bookkeeping (only names ckptkit writes)."""
        self._remove_files(found)
        for p in metadata.leftovers(self.directory):
            storage.remove_tree(p) or storage.remove_file(p)
        for name in (metadata.METADATA_FILE, metadata.STATE_FILE):
            storage.remove_file(os.path.join(self.directory, name))
        if found:
            log.warning(
                "removed the stale local tier %s (%s): %d checkpoint(s), steps %s; resuming from checkpoint.dir %s",
                self.directory,
                why,
                len(found),
                ", ".join(str(c.step) for c in found),
                self.persistent,
            )

    # --- saving ----------------------------------------------------------------------------

    def persist_due(self, forced: bool) -> bool:
        """Whether the save being started now also goes to the persistent tier."""
        with self._lock:
            self._saves_since_persist += 1
            due = forced or (
                not self.copier.busy
                and (
                    (self.every_seconds is not None and time.monotonic() - self._last_persist >= self.every_seconds)
                    or (self.every_saves is not None and self._saves_since_persist >= self.every_saves)
                )
            )
            if due:
                self._last_persist = time.monotonic()
                self._saves_since_persist = 0
            return due

    def persist(
        self,
        step: int,
        record: Callable[[CheckpointInfo], None],
        report: Callable[[BaseException], None],
    ) -> None:
        """Copy the checkpoint of ``step`` to the persistent tier in the background: pinned
        here until ``record`` (the persistent tier's bookkeeping) took its copy; an error goes
        to ``report``. A step already on its way (or there) is not copied again."""
        with self._lock:
            if step in self._pinned:
                return
            self._pinned.add(step)

        def copy() -> None:
            info = self.book.get(step)
            try:
                if info is None:
                    return  # moved aside as unreadable since
                began = time.time()
                prefix = copy_checkpoint(info.path, self.persistent, self.fence)
                record(dataclasses.replace(info, path=prefix, size=metadata.files_size(prefix)))
                seconds = time.time() - began
                log.info("copied checkpoint %s to %s (step %d, %.2fs)", info.path, self.persistent, step, seconds)
                with self._lock:
                    self._copied.append((step, seconds))
                self.unpin(step)
                self.write_bookkeeping()
            except CkptkitError as exc:  # the fence, or a message of ours
                report(exc)
            except Exception as exc:  # noqa: BLE001 - surfaced in the training thread
                report(copy_failure(info.path if info else str(step), self.persistent, exc))

        self.copier.submit(copy)

    def copying(self, step: int) -> bool:
        """Whether the checkpoint of ``step`` is on its way to the persistent tier."""
        with self._lock:
            return step in self._pinned

    def drain_copied(self) -> list[tuple[int, float]]:
        """(step, seconds) of the copies recorded in the persistent tier since the last call."""
        with self._lock:
            done, self._copied = self._copied, []
        return done

    def unpin(self, step: int) -> None:
        with self._lock:
            self._pinned.discard(step)

    def holds(self, path: str) -> bool:
        return os.path.dirname(path) == self.directory

    def record(self, info: CheckpointInfo) -> None:
        self.book.add(info)
        self.write_bookkeeping()

    def write_bookkeeping(self) -> None:
        with self._lock:
            checkpoint_files.write_bookkeeping(
                self.directory, self.book, best_metric=None, best_mode="min", fence=self.fence
            )

    def set_aside(self, info: CheckpointInfo, reason: str) -> str:
        self.book.forget(info.step)
        self.unpin(info.step)
        into = checkpoint_files.move_aside(self.directory, metadata.checkpoint_files(info.path), self.fence)
        log.warning("moved the unreadable local checkpoint %s aside to %s (%s)", info.path, into, reason)
        self.write_bookkeeping()
        return into

    def _remove_files(self, checkpoints: list[CheckpointInfo]) -> None:
        """Delete the files of ``checkpoints`` here (after the fence; the directory listed once)."""
        self.fence()
        names = storage.listdir(self.directory)
        for c in checkpoints:
            for f in metadata.checkpoint_files(c.path, names):
                storage.remove_file(f)

    def remove_all(self) -> None:
        """After a clean finish with everything persisted: the tier's checkpoints go."""
        found = self.book.all()
        if not found or self._pinned:
            return
        self._remove_files(found)
        for c in found:
            self.book.forget(c.step)
        self.write_bookkeeping()
        log.info(
            "removed the local tier's %d checkpoint(s) from %s: the run is complete in %s",
            len(found),
            self.directory,
            self.persistent,
        )


class Copier:
    """One background thread that runs copy jobs in order (each job reports its own errors)."""

    def __init__(self) -> None:
        self._jobs: list[Callable[[], None]] = []
        self._cond = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        self._stop = False

    @property
    def busy(self) -> bool:
        with self._cond:
            return bool(self._jobs) or self._running

    def submit(self, job: Callable[[], None]) -> None:
        with self._cond:
            self._jobs.append(job)
            self._stop = False
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="ckptkit-copier", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stop:
                    self._cond.wait()
                if not self._jobs:
                    return
                job = self._jobs.pop(0)
                self._running = True
            try:
                job()  # reports its own errors
            finally:
                with self._cond:
                    self._running = False
                    self._cond.notify_all()

    def drain(self) -> None:
        """Wait until every job submitted so far has run."""
        with self._cond:
            while self._jobs or self._running:
                self._cond.wait()

    def stop(self) -> None:
        """End the thread once the job in progress is done (queued jobs are dropped)."""
        with self._cond:
            self._jobs.clear()
            self._stop = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._thread = None


def copy_failure(prefix: str, into: str, exc: BaseException) -> CheckpointSaveError:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if storage.disk_full(exc):
        text = checkpoint_files.full_disk(
            into, metadata.files_size(prefix) if gfile.exists(prefix + ".index") else None
        )
    err = CheckpointSaveError(f"copying checkpoint {prefix} to the persistent tier {into} failed: {text}")
    err.__cause__ = exc
    return err
