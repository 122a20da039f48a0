"""Hydra callbacks for ckptkit runs (``hydra.callbacks`` in the config).

``StopJobsOnSignal``: a sweep whose launcher runs the jobs in other processes (the joblib
launcher) is one process waiting for others. SIGTERM or SIGINT to it would end it at once
(exit -15) and leave its jobs training on, orphaned, holding their run locks. With this
callback the sweep process instead stops the sweep, as a protocol:

1. It writes ``<sweep dir>/.ckptkit-sweep-stopping``. A job of this sweep checks for it right
   after it takes its run lock, so a job that the launcher starts after the stop (a queued
   job handed to a freed worker) exits 75 at once, saying the sweep is stopping, and trains
   nothing. The next launch of the sweep removes the file.
2. It finds the running jobs by their run locks under the sweep directory (the current
   claim, not released, of a live process of this host that descends from the sweep) and
   tracks each by its run directory and lock token, not by pid: a joblib worker runs job
   after job under one pid. Each job it finds gets SIGTERM, once: the job saves the step it
   reached and releases its lock.
3. It waits until no job of the sweep holds a lock for ``quiet_seconds``, at most
   ``max_wait_seconds`` (300 s by default; ``hydra.callbacks.stop_jobs.max_wait_seconds``).
   At the bound it names the jobs still running and exits. A second SIGTERM or Ctrl-C
   escalates: the jobs get the signal that makes them exit at once, without a save (a second
   SIGINT; every checkpoint already on disk stays valid), and the sweep exits.

It exits 75 (run the same command again to continue), or 130 after a second Ctrl-C. The
launchers that run jobs in this process (the basic one) or on other machines (submitit) are
left alone: there the job itself gets the signal.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from typing import Any

from hydra.experimental.callback import Callback

from ckptkit import lock_records
from ckptkit.runlock import CLAIMS_DIR, current_claim

log = logging.getLogger("ckptkit")

# ckptkit.preemption's exit codes, without importing TensorFlow into the sweep's process
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130
#: Written into the sweep directory when the sweep stops; a job that finds it does not train.
STOPPING_FILE = ".ckptkit-sweep-stopping"


def _ppid(pid: int) -> int:
    """The parent of process ``pid`` (from /proc), 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _descends_from(pid: int, ancestor: int) -> bool:
    for _ in range(64):
        if pid == ancestor:
            return True
        pid = _ppid(pid)
        if pid <= 1:
            return False
    return False


def _children() -> set[int]:
    """This process's child processes (from /proc)."""
    me = os.getpid()
    return {int(name) for name in os.listdir("/proc") if name.isdigit() and _ppid(int(name)) == me}


def running_jobs(root: str, depth: int = 4) -> dict[tuple[str, str], int]:
    """The jobs of this process's tree that hold a run lock under ``root``: (run directory,
    lock token) -> pid."""
    found: dict[tuple[str, str], int] = {}
    for directory, subdirs, _files in os.walk(root):
        if directory[len(root) :].count(os.sep) >= depth:
            subdirs[:] = []
        if CLAIMS_DIR not in subdirs:
            subdirs[:] = [d for d in subdirs if d not in ("checkpoints", "export", "logs")]
            continue
        subdirs[:] = [d for d in subdirs if d not in ("checkpoints", "export", "logs", CLAIMS_DIR)]
        claim = current_claim(directory)
        record = None if claim is None else claim.record
        if record is None or record["released"] or not lock_records.alive_here(record):
            continue
        pid = record["pid"]
        if pid != os.getpid() and _descends_from(pid, os.getpid()):
            found[(directory, record["token"])] = pid
    return found


def sweep_stopping(sweep_dir: str) -> str | None:
    """The stop notice of the sweep in ``sweep_dir``, in words, or None when it runs on."""
    path = os.path.join(sweep_dir, STOPPING_FILE)
    try:
        with open(path, "rb") as f:
            raw = f.read(4096)
    except OSError:
        return None
    try:
        notice = json.loads(raw)
        return f"{notice['signal']} at {time.strftime('%H:%M:%S', time.localtime(float(notice['time'])))}"
    except (ValueError, KeyError, TypeError, OverflowError, OSError):
        return f"see {path}"


def _signal_job(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


class StopJobsOnSignal(Callback):
    """See the module docstring. In a config: ``hydra.callbacks.stop_jobs._target_:
    ckptkit.hydra_callbacks.StopJobsOnSignal``."""

    def __init__(self, poll_seconds: float = 0.5, quiet_seconds: float = 2.0, max_wait_seconds: float = 300.0) -> None:
        self.poll_seconds, self.quiet_seconds = float(poll_seconds), float(quiet_seconds)
        self.max_wait_seconds = float(max_wait_seconds)
        self._stopping = False
        self._asked: dict[tuple[str, str], int] = {}

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        root = os.path.abspath(str(config.hydra.sweep.dir))
        try:
            os.remove(os.path.join(root, STOPPING_FILE))  # this launch of the sweep runs
        except FileNotFoundError:
            pass
        target = str(config.hydra.launcher.get("_target_", ""))
        if target.endswith("BasicLauncher") or "submitit" in target:
            return
        if threading.current_thread() is not threading.main_thread():
            return
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, lambda signum, _frame: self._stop_jobs(root, signum))

    def _escalate(self, signum: int) -> None:
        running = running_jobs(self._root)
        log.error(
            "second %s: the sweep's %d running job(s) exit now without saving; every checkpoint "
            "already on disk stays valid",
            signal.Signals(signum).name,
            len(running),
        )
        for pid in set(running.values()):
            _signal_job(pid, signal.SIGINT)
            _signal_job(pid, signal.SIGINT)  # a job's second Ctrl-C: it exits at once
        self._exit(EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_PREEMPTED)

    def _exit(self, code: int) -> None:
        for pid in _children():  # the launcher's workers: idle now, or told to stop
            _signal_job(pid, signal.SIGTERM)
        for handler in logging.getLogger().handlers + log.handlers:
            handler.flush()
        os._exit(code)

    def _stop_jobs(self, root: str, signum: int) -> None:
        if self._stopping:
            self._escalate(signum)
            return
        self._stopping, self._root = True, root
        name = signal.Signals(signum).name
        log.warning("%s received by the sweep: no new job starts; its running jobs save and stop", name)
        os.makedirs(root, exist_ok=True)
        notice = os.path.join(root, STOPPING_FILE)
        with open(notice + ".tmp", "w") as f:
            json.dump({"signal": name, "time": time.time(), "pid": os.getpid()}, f)
        os.replace(notice + ".tmp", notice)
        # SIGTERM, also for a Ctrl-C: the jobs in the terminal's process group already got
        # that SIGINT, and a second SIGINT would make them exit without saving.
        deadline = time.monotonic() + self.max_wait_seconds
        quiet_since = None
        while True:
            jobs = running_jobs(root)
            for key, pid in jobs.items():
                if key not in self._asked:
                    _signal_job(pid, signal.SIGTERM)
                    self._asked[key] = pid
            if jobs:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= self.quiet_seconds:
                break
            if time.monotonic() >= deadline:
                log.error(
                    "%d job(s) of the sweep still run after max_wait_seconds=%g s: %s; exiting "
                    "without them (each saves when it stops; a second SIGTERM makes them exit now)",
                    len(jobs),
                    self.max_wait_seconds,
                    ", ".join(f"{d} (pid {pid})" for (d, _t), pid in sorted(jobs.items())),
                )
                self._exit(EXIT_PREEMPTED)
            time.sleep(self.poll_seconds)
        log.warning(
            "the sweep's %d running job(s) saved and stopped; run the same command again to continue",
            len(self._asked),
        )
        self._exit(EXIT_PREEMPTED)
