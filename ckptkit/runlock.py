"""One writer per run directory, and one run per checkpoint directory.

``fit()`` holds ``run_dir/.ckptkit.lock`` while it runs. The lock is an ``flock`` on that
file (atomic; the kernel drops it when the holder dies, ``kill -9`` included), and the file
is the record: pid, host and start time of the holder, for the message a second launch
gets. Take-over of a stale lock is therefore atomic: of two launches racing for it, exactly
one gets the ``flock``. A lock file that is empty or cannot be parsed (a crash or a full
disk at the lock write) is stale when nobody holds its ``flock``. After locking, the holder
checks that the file it locked is still the one at the path (a releasing holder unlinks
it), else it tries again.

A lock record from another host cannot be checked by pid, so the lock is a lease: its
holder refreshes the file's modification time at least every 30 s (a daemon thread), and a
lock from another host not refreshed for ``lease_seconds`` (``checkpoint.lock_lease_seconds``,
120 s by default) is stale: its node died, was fenced or lost the filesystem. A lock taken
under the same ``SLURM_JOB_ID`` as this launch (a requeue of the same job, usually on another
node) is taken over at once. Every take-over is logged.

Where ``flock`` is not supported (some network filesystems) the lock falls back to the
record alone, with a warning; for a run directory on a remote filesystem (``gs://``)
ckptkit warns and runs unlocked.

The checkpoint directory records which run owns it (``.ckptkit-owner.json``: the run's id
from ``run_dir/.ckptkit-run-id``, and its directory). A run whose ``checkpoint.dir`` is
owned by another run is refused: two runs sharing one would resume each other's
checkpoints. A run directory that moved keeps its id, and stays the owner.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import socket
import threading
import time

from ckptkit import storage
from ckptkit.errors import CkptkitError

try:
    import fcntl

    has_flock = True
except ImportError:  # not on Windows
    has_flock = False

log = logging.getLogger("ckptkit")

LOCK_FILE = ".ckptkit.lock"
RUN_ID_FILE = ".ckptkit-run-id"
OWNER_FILE = ".ckptkit-owner.json"


class RunLockedError(CkptkitError, RuntimeError):
    """Another process is training in the same run directory."""


class CheckpointDirOwnedError(CkptkitError, RuntimeError):
    """The checkpoint directory belongs to another run."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _parse(text: str) -> dict | None:
    """The lock record, or None when it is empty or malformed."""
    try:
        record = json.loads(text)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("pid"), int):
        return None
    return record


class RunLock:
    def __init__(self, run_dir: str, *, lease_seconds: float = 120.0):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.lease_seconds = float(lease_seconds)
        self.held = False
        self._fd: int | None = None
        self._stop_refresh = threading.Event()
        self._refresher: threading.Thread | None = None

    def _describe(self, record: dict | None) -> str:
        if record is None:
            return "another process (its lock record is not written yet or unreadable)"
        return f"process {record.get('pid')} on {record.get('host')}"

    def _refuse(self, record: dict | None) -> RunLockedError:
        return RunLockedError(
            f"{self.run_dir} is in use by {self._describe(record)} (lock file {self.path}). Wait "
            "for it to finish or stop it; if it no longer runs on that host, delete the lock file."
        )

    def acquire(self) -> RunLock:
        if not storage.is_local(self.run_dir):
            log.warning(
                "run directory %s is not on a local filesystem: running without the one-writer lock", self.run_dir
            )
            return self
        os.makedirs(self.run_dir, exist_ok=True)
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            locked = False
            try:
                locked = self._try_lock(fd)
            finally:
                if not locked:
                    os.close(fd)
            if locked:
                self._fd, self.held = fd, True
                self._start_refresh(fd)
                return self
            time.sleep(0.01)  # the file was replaced or released meanwhile: look again
        raise RunLockedError(f"could not take the lock {self.path}; other launches keep racing for it")

    def _try_lock(self, fd: int) -> bool:
        """Lock ``fd``; True when this process now holds the run (record written)."""
        locked = False
        if has_flock:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                raise self._refuse(_parse(os.pread(fd, 4096, 0).decode("utf-8", "replace"))) from None
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                log.warning(
                    "the filesystem of %s does not support flock: the lock relies on its record alone", self.run_dir
                )
        st, here = os.fstat(fd), storage.lstat(self.path)
        if here is None or (here.st_ino, here.st_dev) != (st.st_ino, st.st_dev):
            return False  # unlinked by its releasing holder after we opened it
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        job = os.environ.get("SLURM_JOB_ID")
        if job:
            me["slurm_job_id"] = job
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        other = _parse(text)
        why = "which no longer holds it"
        if other is not None and other.get("host") != me["host"]:
            age = time.time() - st.st_mtime
            if job and other.get("slurm_job_id") == job:
                why = f"an earlier run of the same SLURM job {job} (requeued)"
            elif age > self.lease_seconds:
                why = (
                    f"whose lease expired: not refreshed for {age:.0f} s "
                    f"(checkpoint.lock_lease_seconds={self.lease_seconds:g})"
                )
            else:
                raise RunLockedError(
                    f"{self.run_dir} is in use by {self._describe(other)} (lock file {self.path}, "
                    f"refreshed {age:.0f} s ago). A lock from another host is taken over once it "
                    f"has not been refreshed for checkpoint.lock_lease_seconds="
                    f"{self.lease_seconds:g} s, or at once by a requeue of the same SLURM job."
                )
        elif other is not None and not locked and pid_alive(int(other["pid"])):
            raise self._refuse(other)
        if other is not None or text.strip():
            log.warning(
                "taking over the lock %s of %s, %s",
                self.path,
                self._describe(other) if other else "a process (unreadable lock record)",
                why,
            )
        data = json.dumps(me).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        return True

    def _start_refresh(self, fd: int) -> None:
        """Touch the lock file ``fd`` every ``min(30, lease/4)`` s while it is held (the lease)."""
        period = min(30.0, self.lease_seconds / 4)
        stop = self._stop_refresh

        def refresh():
            while not stop.wait(period):
                try:
                    os.utime(fd)
                except OSError as exc:  # the run goes on; a peer may take the lock later
                    log.warning("cannot refresh the run lock %s: %s", self.path, exc)

        self._refresher = threading.Thread(target=refresh, daemon=True, name="ckptkit-lock-lease")
        self._refresher.start()

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        self._stop_refresh.set()
        if self._refresher is not None:
            self._refresher.join(timeout=5)
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            st, here = os.fstat(fd), storage.lstat(self.path)
            if here is not None and (here.st_ino, here.st_dev) == (st.st_ino, st.st_dev):
                os.remove(self.path)  # still holding the flock: nobody took it meanwhile
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


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
