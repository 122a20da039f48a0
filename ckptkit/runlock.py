"""One writer per run directory.

``fit()`` holds ``run_dir/.ckptkit.lock`` (created exclusively, holding pid, host and start
time) while it runs. A second launch on the same run directory is refused at once, naming
the process that holds it. A lock left by a process that died (``kill -9``) on this host is
recognised (its pid is gone) and taken over; a lock from another host is never taken over
automatically, since its process cannot be checked from here.

Locking uses the local filesystem; for a run directory on a remote filesystem (``gs://``)
ckptkit warns and runs unlocked.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Optional

from ckptkit.errors import CkptkitError

log = logging.getLogger("ckptkit")

LOCK_FILE = ".ckptkit.lock"


class RunLockedError(CkptkitError, RuntimeError):
    """Another process is training in the same run directory."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.held = False

    def _read(self) -> Optional[dict]:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "RunLock":
        if "://" in self.run_dir:
            log.warning("run directory %s is not on a local filesystem: running without the "
                        "one-writer lock", self.run_dir)
            return self
        os.makedirs(self.run_dir, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = self._read()
                if other is None:
                    continue  # released meanwhile: try again
                if other and other.get("host") == me["host"] and not pid_alive(int(other.get("pid", -1))):
                    log.warning("taking over the lock %s of process %s, which no longer runs",
                                self.path, other.get("pid"))
                    os.remove(self.path)
                    continue
                who = (f"process {other.get('pid')} on {other.get('host')}" if other
                       else "another process (unreadable lock file)")
                raise RunLockedError(
                    f"{self.run_dir} is in use by {who} (lock file {self.path}). Wait for it to "
                    "finish or stop it; if it no longer runs on that host, delete the lock file.") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RunLockedError(f"could not take the lock {self.path}; another launch is racing for it")

    def release(self) -> None:
        if self.held:
            self.held = False
            other = self._read()
            if other and other.get("pid") == os.getpid():
                os.remove(self.path)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
