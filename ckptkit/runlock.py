"""One writer per run directory: the run lock, as a protocol with a fencing token.

``fit()`` holds the run directory's lock while it runs. What each party may assume and what
it checks before it acts:

**The record.** The lock is a sequence of *claims*, one file per generation in
``run_dir/.ckptkit.lock.d/`` (``gen-000000000007.json``; :mod:`ckptkit.lock_records` says
what a record holds). The claim of the highest generation is the current one; its
``token`` is the holder's fencing token. Generations only grow: a claim is never
renumbered, a release marks its claim ``released`` and leaves it there, and a holder prunes
only claims two or more generations below its own.

**Claiming is atomic without ``flock``.** A launch writes its record to a temporary file and
hard-links it to the next generation's name: ``link`` fails when the name exists, so of any
number of launches racing for one generation exactly one gets it, and its record is complete
the moment it appears. (Where the filesystem has no hard links, ``O_CREAT | O_EXCL`` makes
the same claim, and a reader that meets a record being written waits for it.) A launch that
loses the race is refused at once, naming the winner.

**When the current claim may be taken over.** Never while its holder is provably alive. It
is taken over at once when it is released, when its record is unusable, when it was made on
this host (same boot) by a process that is gone (pid and process start time), or by an
earlier run of this SLURM job (a requeue: this launch's ``SLURM_RESTART_COUNT`` is higher).
Otherwise, which covers another host and a second step of the same SLURM job, the launch
*watches* the claim: the holder rewrites it every ``min(10 s, lease / 6)`` (``beat``), so a
claim that does not change for ``checkpoint.lock_lease_seconds`` as measured on this host's
monotonic clock belongs to a holder that stopped, died or lost the filesystem, and is
taken over; a claim that changes while watched is refused. No file time is compared with
any clock, so a skewed clock (a day ahead or behind, here or there) changes nothing.

**Fencing.** A holder checks, before each commit point (a checkpoint's files, the metadata
and state files, retention deletes and moves, an export's publish), that no higher
generation exists and that its claim still carries its token (:meth:`RunLock.check`). Its
beat thread makes the same check. Once fenced it writes nothing more (not even its own
release) and stops with :class:`RunTakenOverError`, naming who took the run over and when.

**flock** on ``run_dir/.ckptkit.lock`` is kept as a fast path: a launch that finds it held
(by a live process of this node, or of any node where ``flock`` is cluster-wide) is refused
at once. Getting it proves nothing across hosts (Lustre's ``localflock``, NFS with
``local_lock=flock``), and where it is not supported the claims alone decide. The file
itself is never removed, so no launch can lock an unlinked file.

For a run directory on a remote filesystem (``gs://``) ckptkit warns and runs unlocked.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable

from ckptkit import lock_records as records
from ckptkit import storage
from ckptkit.errors import CkptkitError
from ckptkit.lock_records import Claim, describe, pid_alive  # noqa: F401 - pid_alive: export.py
from ckptkit.ownership import (  # noqa: F401 - their old home
    OWNER_FILE,
    RUN_ID_FILE,
    CheckpointDirOwnedError,
    claim_checkpoint_dir,
    run_id,
)

try:
    import fcntl

    has_flock = True
except ImportError:  # not on Windows
    has_flock = False

log = logging.getLogger("ckptkit")

LOCK_FILE = ".ckptkit.lock"
CLAIMS_DIR = ".ckptkit.lock.d"
#: How long a record that is being written (or is unusable) is watched before it is taken over.
UNUSABLE_GRACE_SECONDS = 2.0

#: The clock that staleness is measured on (the simulation harness in the tests may replace it).
monotonic: Callable[[], float] = time.monotonic


class _LookAgain(Exception):
    """The current claim changed while it was judged: judge the new one."""


class RunLockedError(CkptkitError, RuntimeError):
    """Another process is training in the same run directory."""


class RunTakenOverError(CkptkitError, RuntimeError):
    """Another launch took this run over while this one held it: this one stops, writing nothing."""


def flock_exclusive(fd: int, path: str) -> str:
    """``flock`` ``fd`` (the file ``path``) without waiting: "held", "busy" or "unsupported".

    The simulation harness in the tests replaces it to model a node-local or absent flock."""
    if not has_flock:
        return "unsupported"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return "busy"
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return "unsupported"
        raise
    return "held"


def _unlink(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def claims_in(run_dir: str) -> list[int]:
    """The generations of the claims in ``run_dir``, oldest first."""
    names = storage.listdir(os.path.join(run_dir, CLAIMS_DIR))
    return sorted(g for g in (records.generation_of(n) for n in names) if g is not None)


def current_claim(run_dir: str) -> Claim | None:
    """The claim of the highest generation in ``run_dir`` (None when there is none)."""
    for _ in range(5):
        gens = claims_in(run_dir)
        if not gens:
            return None
        claim = records.read_claim(os.path.join(run_dir, CLAIMS_DIR, records.claim_name(gens[-1])), gens[-1])
        if claim is not None:
            return claim
    return None  # pruned five times while we read: a storm; the caller looks again


class RunLock:
    """The lock of one directory (see the module docstring)."""

    def __init__(self, run_dir: str, *, lease_seconds: float = 120.0):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.claims_dir = os.path.join(run_dir, CLAIMS_DIR)
        self.lease_seconds = float(lease_seconds)
        self.beat_seconds = min(10.0, self.lease_seconds / 6)
        self.held = False
        self.record: dict | None = None  # this launch's claim while it holds the run
        self._fd: int | None = None
        self._fenced: RunTakenOverError | None = None
        self._mutex = threading.Lock()  # beats, checks and the release, one at a time
        self._stop_beat = threading.Event()
        self._beater: threading.Thread | None = None

    # --- acquiring ---------------------------------------------------------------------

    def acquire(self) -> RunLock:
        if not storage.is_local(self.run_dir):
            log.warning(
                "run directory %s is not on a local filesystem: running without the one-writer lock", self.run_dir
            )
            return self
        os.makedirs(self.claims_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            mode = flock_exclusive(fd, self.path)
            if mode == "busy":
                raise self._refusal(current_claim(self.run_dir), f"it holds the flock of {self.path}")
            if mode == "unsupported":
                log.warning(
                    "the filesystem of %s does not support flock: the run lock relies on its claims alone",
                    self.run_dir,
                )
            self._claim()
        except BaseException:
            os.close(fd)
            raise
        self._fd, self.held = fd, True
        self._start_beat()
        return self

    def _refusal(self, claim: Claim | None, why: str) -> RunLockedError:
        return RunLockedError(
            f"{self.run_dir} is in use by {describe(claim)}: {why}. Wait for it to finish or stop it. "
            f"Its lock is taken over once its holder is gone: at once on the same host or for a "
            f"requeue of the same SLURM job, else when it has not changed for "
            f"checkpoint.lock_lease_seconds={self.lease_seconds:g} s (lock records in {self.claims_dir})."
        )

    def _claim(self) -> None:
        for _ in range(50):
            current = current_claim(self.run_dir)
            try:
                why = None if current is None else self._why_take_over(current)
            except _LookAgain:
                continue
            generation = 1 if current is None else current.generation + 1
            record = records.new_record(generation)
            if self._create(generation, record):
                self.record = record
                if why:
                    log.warning("took over the run lock of %s from %s: %s", self.run_dir, describe(current), why)
                self._prune(generation)
                self._check_now()  # nobody claimed past us meanwhile
                return
            newer = current_claim(self.run_dir)
            if newer is not None and newer.record is not None and not newer.released:
                raise self._refusal(newer, "it claimed the run a moment ago")
        raise RunLockedError(f"could not take the lock of {self.run_dir}: other launches keep racing for it")

    def _why_take_over(self, claim: Claim) -> str | None:
        """Why ``claim`` may be taken over (None: it was released); raises when its holder lives."""
        if claim.record is None:
            if self._watch(claim, min(UNUSABLE_GRACE_SECONDS, self.lease_seconds)) is not None:
                raise _LookAgain  # it was being written, or replaced: judge what is there now
            return f"its lock record {claim.path} is unusable ({claim.problem})"
        record = claim.record
        if record["released"]:
            return None
        alive = records.alive_here(record)
        if alive:
            raise self._refusal(claim, "that process is running on this host")
        if alive is False:
            return "that process is gone (checked on its own host)"
        mine = records.slurm_identity()
        same_job = "slurm_job_id" in mine and record.get("slurm_job_id") == mine["slurm_job_id"]
        if same_job and mine["slurm_restart_count"] > record.get("slurm_restart_count", 0):
            return (
                f"this is restart {mine['slurm_restart_count']} of SLURM job {mine['slurm_job_id']}, "
                f"it was restart {record.get('slurm_restart_count', 0)} (a requeue)"
            )
        log.warning(
            "run directory %s is claimed by %s; watching its lock for up to %g s "
            "(checkpoint.lock_lease_seconds) to tell whether it is still alive",
            self.run_dir,
            describe(claim),
            self.lease_seconds,
        )
        changed = self._watch(claim, self.lease_seconds)
        if changed is not None:
            if changed.generation != claim.generation or changed.record is None or changed.released:
                raise _LookAgain
            what = "another step of the same SLURM job holds it" if same_job else "its holder is alive"
            raise self._refusal(changed, f"{what}: its lock changed while this launch watched it")
        return (
            f"its lock did not change for {self.lease_seconds:g} s as watched from here "
            f"(checkpoint.lock_lease_seconds): its holder stopped, died or lost the filesystem"
        )

    def _watch(self, claim: Claim, seconds: float) -> Claim | None:
        """Watch ``claim`` for ``seconds`` of this host's monotonic clock: the current claim
        once anything changed, None if nothing did (_LookAgain if every claim vanished)."""
        deadline = monotonic() + seconds
        pause = max(0.01, min(0.5, self.beat_seconds / 4))
        while monotonic() < deadline:
            time.sleep(min(pause, max(0.0, deadline - monotonic())))
            now = current_claim(self.run_dir)
            if now is None:
                raise _LookAgain  # removed while watched: judge the directory afresh
            if now.generation != claim.generation or not now.same_as(claim):
                return now
        return None

    def _create(self, generation: int, record: dict) -> bool:
        """Claim ``generation`` atomically; False when another launch has it."""
        path = os.path.join(self.claims_dir, records.claim_name(generation))
        tmp = os.path.join(self.claims_dir, f".tmp-{secrets.token_hex(8)}")
        storage.write_new(tmp, records.encode(record))
        try:
            storage.fsync_path(tmp)
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
                raise
            try:  # no hard links here: an exclusive create, whose record a reader may see half-written
                storage.write_new(path, records.encode(record))
            except FileExistsError:
                return False
            storage.fsync_path(path)
        finally:
            _unlink(tmp)
        storage.fsync_path(self.claims_dir)
        return True

    def _prune(self, generation: int) -> None:
        """Remove claims two or more generations below ``generation`` (and nothing else)."""
        for g in claims_in(self.run_dir):
            if g < generation - 1:
                try:
                    os.remove(os.path.join(self.claims_dir, records.claim_name(g)))
                except OSError:
                    pass

    # --- holding -----------------------------------------------------------------------

    def _own_path(self) -> str:
        assert self.record is not None
        return os.path.join(self.claims_dir, records.claim_name(self.record["generation"]))

    def _taken_over(self) -> str | None:
        """Why this launch no longer holds the run, None while it does."""
        assert self.record is not None
        gens = claims_in(self.run_dir)
        mine = self.record["generation"]
        if gens and gens[-1] > mine:
            newest = current_claim(self.run_dir)
            return f"it was taken over by {describe(newest)}"
        own = records.read_claim(self._own_path(), mine)
        if own is None:
            return f"its lock record {self._own_path()} was removed"
        if own.token != self.record["token"]:
            return f"its lock record {self._own_path()} now belongs to {describe(own)}"
        return None

    def _check_now(self) -> None:
        reason, error = None, None
        for attempt in range(3):
            try:
                reason = self._taken_over()
                break
            except OSError as exc:  # a storage hiccup: look again, then stop rather than guess
                error = exc
                time.sleep(0.1 * (attempt + 1))
        else:
            raise CkptkitError(
                f"cannot read the run lock in {self.claims_dir} ({error}): stopping rather than writing "
                "without knowing whether this launch still holds the run. Run the same command again."
            )
        if reason is not None:
            self._fenced = RunTakenOverError(
                f"this launch no longer holds {self.run_dir}: {reason}. It stops here and writes "
                f"nothing more; the other launch continues the run (lock records in {self.claims_dir})."
            )
            self._stop_beat.set()
            raise self._fenced

    def check(self) -> None:
        """Raise :class:`RunTakenOverError` unless this launch still holds the run (a commit
        point calls it right before it writes)."""
        if self._fenced is not None:
            raise self._fenced
        if not self.held or self.record is None:
            return
        with self._mutex:
            self._check_now()

    @property
    def fenced(self) -> RunTakenOverError | None:
        """The error, once the beat thread or a check found the run taken over."""
        return self._fenced

    def _start_beat(self) -> None:
        stop = self._stop_beat

        def beat():
            while not stop.wait(self.beat_seconds):
                try:
                    with self._mutex:
                        if stop.is_set():
                            return
                        self._check_now()
                        self._rewrite(beat=True)
                except RunTakenOverError as exc:
                    log.error("%s", exc)
                    return
                except (OSError, CkptkitError) as exc:  # the run goes on; a peer may take it later
                    log.warning("cannot refresh the run lock %s: %s", self.claims_dir, exc)

        self._beater = threading.Thread(target=beat, daemon=True, name="ckptkit-lock-beat")
        self._beater.start()

    def _rewrite(self, *, beat: bool = False, released: bool = False) -> None:
        """Replace this launch's own claim (a new inode: watchers see it change)."""
        assert self.record is not None
        if beat:
            self.record["beat"] += 1
        if released:
            self.record["released"] = True
        path = self._own_path()
        tmp = os.path.join(self.claims_dir, f".tmp-{secrets.token_hex(8)}")
        try:
            storage.write_new(tmp, records.encode(self.record))
        except OSError as exc:
            if not (released and storage.disk_full(exc)):
                raise
            self._release_in_place(path)
            return
        try:
            os.replace(tmp, path)
        except BaseException:
            _unlink(tmp)
            raise

    def _release_in_place(self, path: str) -> None:
        """Mark the claim released on a full disk: the record is overwritten in its own
        blocks (padded with spaces, which JSON ignores, to its old length), which needs no
        free space. Without it a launch in this process would find its own claim held."""
        assert self.record is not None
        data = records.encode(self.record)
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            old = os.fstat(fd).st_size
            if len(data) > old:
                raise OSError(errno.ENOSPC, "the released record does not fit in the old one's place", path)
            os.pwrite(fd, data + b" " * (old - len(data)), 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    def release(self) -> None:
        """Mark this launch's claim released, only while it is still its own."""
        if not self.held:
            return
        self.held = False
        self._stop_beat.set()
        if self._beater is not None:
            self._beater.join(timeout=5)
        fd, self._fd = self._fd, None
        try:
            with self._mutex:
                if self._fenced is None and self.record is not None and self._taken_over() is None:
                    self._rewrite(released=True)
        except OSError as exc:
            log.warning("cannot release the run lock %s: %s (the next launch takes it over)", self.claims_dir, exc)
        finally:
            if fd is not None:
                os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
