"""The records of the run lock (:mod:`ckptkit.runlock`): what a claim says, who wrote it, and
whether that process is still alive as seen from here.

A claim is one JSON file ``run_dir/.ckptkit.lock.d/gen-<generation>.json``. Its writer fills
in who it is: a random ``token`` (the fencing token), the ``generation``, ``pid`` with the
process's start time (``pid_start``, so a reused pid is not taken for the holder), ``host``
and that host's ``boot_id``, the SLURM job, step, task and restart count when there are any,
the wall-clock time the claim was made (by the claimant's clock, for messages only), a
``beat`` counter the holder raises while it holds the run, and ``released``.

Records come from other machines, older versions and sometimes an adversary: every field
is checked for type and range before it is used, and a record that fails says why.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import secrets
import socket
import stat
import time
from dataclasses import dataclass
from typing import Any

#: A claim is read up to this many bytes; a longer one is not a record of ours.
MAX_RECORD_BYTES = 64 * 1024
#: Linux's largest pid (``pid_max`` can be at most 2**22); anything above is not a pid.
MAX_PID = 2**22
_CLAIM_NAME = re.compile(r"^gen-(\d{1,18})\.json$")
_TOKEN = re.compile(r"^[0-9a-f]{8,64}$")
_SLURM_FIELDS = ("slurm_job_id", "slurm_step_id", "slurm_procid", "slurm_restart_count")


def hostname() -> str:
    """This host's name as the lock records it (the simulation harness in the tests patches it)."""
    return socket.gethostname()


def _read_small(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(200).decode("ascii", "replace").strip()
    except OSError:
        return None


def boot_id() -> str | None:
    """This boot of this host (Linux); a holder recorded under another boot is gone."""
    return _read_small("/proc/sys/kernel/random/boot_id")


def process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (Linux), None if unknown or gone."""
    text = _read_small(f"/proc/{pid}/stat") if 0 < pid <= MAX_PID else None
    if not text:
        return None
    try:
        return int(text.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host."""
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid <= MAX_PID:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return isinstance(pid, int)
    return True


def slurm_identity() -> dict[str, Any]:
    """This process's SLURM job, step, task and restart count, where SLURM set them."""
    env = os.environ
    found: dict[str, Any] = {}
    for key, var in zip(
        _SLURM_FIELDS, ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_RESTART_COUNT"), strict=True
    ):
        value = env.get(var, "").strip()
        if value:
            if key == "slurm_restart_count":
                found[key] = int(value) if value.isdigit() and len(value) < 10 else 0
            else:
                found[key] = value[:64]
    if "slurm_job_id" in found:
        found.setdefault("slurm_restart_count", 0)
    return found


def new_record(generation: int) -> dict[str, Any]:
    """The record of a claim this process is about to make."""
    pid = os.getpid()
    return {
        "token": secrets.token_hex(16),
        "generation": generation,
        "pid": pid,
        "pid_start": process_start(pid),
        "host": hostname(),
        "boot_id": boot_id(),
        "claimed": time.time(),
        "beat": 0,
        "released": False,
        **slurm_identity(),
    }


def encode(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, sort_keys=True) + "\n").encode()


def claim_name(generation: int) -> str:
    return f"gen-{generation:012d}.json"


def generation_of(name: str) -> int | None:
    m = _CLAIM_NAME.match(name)
    return int(m.group(1)) if m else None


def _int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _short_str(value: Any, limit: int = 255) -> bool:
    return isinstance(value, str) and 0 < len(value) <= limit and value.isprintable()


def problem(record: Any, generation: int) -> str | None:
    """What is wrong with a parsed claim of ``generation``, None when it is a valid record."""
    if not isinstance(record, dict):
        return f"not a JSON object but {type(record).__name__}"
    checks = [
        ("token", isinstance(record.get("token"), str) and bool(_TOKEN.match(record["token"]))),
        ("generation", record.get("generation") == generation and _int_in(record.get("generation"), 1, 10**18)),
        ("pid", _int_in(record.get("pid"), 1, MAX_PID)),
        ("host", _short_str(record.get("host"))),
        ("beat", _int_in(record.get("beat"), 0, 2**62)),
        ("released", isinstance(record.get("released"), bool)),
        (
            "claimed",
            isinstance(record.get("claimed"), (int, float))
            and not isinstance(record.get("claimed"), bool)
            and math.isfinite(record["claimed"]),
        ),
        ("pid_start", record.get("pid_start") is None or _int_in(record.get("pid_start"), 0, 2**62)),
        ("boot_id", record.get("boot_id") is None or _short_str(record.get("boot_id"), 64)),
        ("slurm_restart_count", _int_in(record.get("slurm_restart_count", 0), 0, 10**9)),
    ]
    checks += [(k, _short_str(record[k], 64)) for k in _SLURM_FIELDS[:3] if k in record]
    bad = [name for name, ok in checks if not ok]
    if bad:
        return "bad or missing field(s) " + ", ".join(bad)
    return None


@dataclass(frozen=True)
class Claim:
    """One claim file as read now: its bytes and inode (for watching it change) and its record."""

    generation: int
    path: str
    raw: bytes
    inode: tuple[int, int]
    record: dict[str, Any] | None
    problem: str | None

    @property
    def token(self) -> str | None:
        return None if self.record is None else self.record["token"]

    @property
    def released(self) -> bool:
        return self.record is not None and self.record["released"]

    def same_as(self, other: Claim) -> bool:
        """Unchanged since ``other`` was read (every beat replaces the file: a new inode)."""
        return self.raw == other.raw and self.inode == other.inode


def read_claim(path: str, generation: int) -> Claim | None:
    """The claim at ``path``, None when it does not exist (a link is read as a bad record)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        return Claim(generation, path, b"", (0, 0), None, f"cannot be opened ({exc.strerror or exc})")
    try:
        st = os.fstat(fd)
        raw = os.read(fd, MAX_RECORD_BYTES + 1) if stat.S_ISREG(st.st_mode) else b""
    finally:
        os.close(fd)
    inode = (st.st_dev, st.st_ino)
    if len(raw) > MAX_RECORD_BYTES:
        return Claim(generation, path, raw, inode, None, f"larger than {MAX_RECORD_BYTES} bytes")
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return Claim(generation, path, raw, inode, None, "not JSON" if raw.strip() else "empty")
    why = problem(record, generation)
    return Claim(generation, path, raw, inode, None if why else record, why)


def _when(stamp: float) -> str:
    try:
        return datetime.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return "an unrepresentable time"


def describe(claim: Claim | None) -> str:
    """Who made ``claim``, in words: process, host, SLURM job/step/task, when (by its clock)."""
    if claim is None:
        return "nobody (no claim)"
    r = claim.record
    if r is None:
        return f"an unknown process (its lock record {claim.path} is unusable: {claim.problem})"
    text = f"process {r['pid']} on {r['host']}"
    if "slurm_job_id" in r:
        parts = [f"SLURM job {r['slurm_job_id']}"]
        if "slurm_step_id" in r:
            parts.append(f"step {r['slurm_step_id']}")
        if "slurm_procid" in r:
            parts.append(f"task {r['slurm_procid']}")
        parts.append(f"restart {r.get('slurm_restart_count', 0)}")
        text += f" ({' '.join(parts)})"
    return f"{text}, which claimed it at {_when(r['claimed'])} by its own clock (lock generation {r['generation']})"


def alive_here(record: dict[str, Any]) -> bool | None:
    """Whether ``record``'s process is alive, when that can be told from here: True or False
    on its own host (same boot), None on another host."""
    if record["host"] != hostname():
        return None
    mine = boot_id()
    if record.get("boot_id") and mine and record["boot_id"] != mine:
        return False  # its host rebooted since: the process is gone
    if not pid_alive(record["pid"]):
        return False
    started = record.get("pid_start")
    now = process_start(record["pid"])
    return started is None or now is None or started == now
