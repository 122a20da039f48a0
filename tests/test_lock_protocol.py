"""The run lock as a protocol (issue 27), tried over many trials by a simulation harness.

Every launch is a real process running the real lock code (tests/lock_sim.py) as if on its
own host, with a ``flock`` that is shared, node-local or absent, a wall clock skewed a day
either way, SLURM job/step/restart identities, and freezes past the lease (SIGSTOP between
two commits, as ``scontrol suspend`` would). Each holder commits every 10 ms after ``lock.check()``; the
audit of ``commits.log`` finds any write by a holder after a newer generation wrote (a double
holder, or a write after being fenced). ``CKPTKIT_LOCK_TRIALS`` sets the trials per case
(CI runs 3; the figures in issue 27's note come from 30).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ckptkit import lock_records, runlock
from ckptkit.runlock import CLAIMS_DIR, RunLock, RunLockedError, RunTakenOverError

SIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lock_sim.py")
TRIALS = int(os.environ.get("CKPTKIT_LOCK_TRIALS", "3"))
LEASE = 1.0
FLOCKS = ("shared", "node", "none")


class Launch:
    def __init__(self, run_dir, host, *, flock, hold=3.0, lease=LEASE, skew=0.0, wait_go=False, **slurm):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update({f"SLURM_{k.upper()}": str(v) for k, v in slurm.items()})
        cmd = [sys.executable, SIM, str(run_dir), "--host", host, "--flock", flock]
        cmd += ["--lease", str(lease), "--hold", str(hold), "--skew", str(skew)] + (["--wait-go"] if wait_go else [])
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        self.started = time.monotonic()
        self.lines: list[dict] = []

    def next_line(self, timeout=30.0) -> dict:
        """The next JSON line it prints (blocking: it prints when it holds or is refused)."""
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout)
            raise AssertionError(f"no output; exit {self.proc.returncode}: {self.proc.stderr.read()[-3000:]}")
        self.lines.append(json.loads(line))
        return self.lines[-1]

    def finish(self, timeout=60.0) -> list[dict]:
        out, err = self.proc.communicate(timeout=timeout)
        self.lines += [json.loads(x) for x in out.splitlines() if x.startswith("{")]
        assert self.proc.returncode in (0, 2, 3, -9), err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        return self.lines

    def outcomes(self) -> list[str]:
        return [x["outcome"] for x in self.lines]


def wait_stopped(pid: int, timeout: float = 30.0) -> None:
    """Wait until process ``pid`` is stopped (state T in /proc/<pid>/stat)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not stop")


def audit(run_dir) -> dict[int, int]:
    """Commits per generation; fails on any commit by an older generation after a newer one's."""
    path = os.path.join(run_dir, "commits.log")
    counts: dict[int, int] = {}
    newest = 0
    if not os.path.exists(path):
        return counts
    with open(path) as f:
        for n, line in enumerate(f):
            gen = int(line.split()[0])
            assert gen >= newest, f"line {n}: generation {gen} committed after generation {newest} had"
            newest = gen
            counts[gen] = counts.get(gen, 0) + 1
    return counts


def _dirs(tmp_path, name, n):
    out = []
    for i in range(n):
        d = tmp_path / f"{name}{i}"
        d.mkdir()
        out.append(d)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("flock", FLOCKS)
def test_two_live_steps_of_one_slurm_job_never_both_hold(tmp_path, flock):
    for run in _dirs(tmp_path, "t", TRIALS):
        first = Launch(run, "node-1", flock=flock, hold=3.0, job_id=42, step_id=0, procid=0)
        assert first.next_line()["outcome"] == "held"
        second = Launch(run, "node-2", flock=flock, hold=0.5, job_id=42, step_id=1, procid=0)
        refused = second.next_line()
        assert refused["outcome"] == "refused", refused
        assert "SLURM job 42 step 0 task 0" in refused["message"]
        if flock != "shared":  # the shared flock refuses at once; the claims after watching one beat
            assert "another step of the same SLURM job holds it" in refused["message"]
        assert first.finish()[-1] == {"outcome": "released", "generation": 1, "own_record_intact": True}
        second.finish()
        counts = audit(run)
        assert list(counts) == [1] and counts[1] > 50


@pytest.mark.slow
@pytest.mark.parametrize("flock", ("node", "none"))
def test_a_requeue_takes_over_at_once_and_fences_the_old_holder(tmp_path, flock):
    for run in _dirs(tmp_path, "t", TRIALS):
        old = Launch(run, "node-1", flock=flock, hold=20.0, job_id=7, restart_count=0)
        assert old.next_line()["outcome"] == "held"
        new = Launch(run, "node-2", flock=flock, hold=1.0, job_id=7, restart_count=1)
        assert new.next_line()["outcome"] == "held"
        assert time.monotonic() - new.started < LEASE + 5  # no watching: a requeue is proof
        fenced = old.next_line()
        assert fenced["outcome"] == "fenced" and "restart 1" in fenced["message"]
        assert "taken over by" in fenced["message"] and "node-2" in fenced["message"]
        assert new.finish()[-1]["own_record_intact"] is True
        old.finish()
        counts = audit(run)
        assert counts.get(2, 0) > 20


@pytest.mark.slow
@pytest.mark.parametrize("flock", FLOCKS)
def test_a_holder_frozen_past_the_lease_is_fenced_and_removes_nothing(tmp_path, flock):
    for run in _dirs(tmp_path, "t", TRIALS):
        first = Launch(run, "node-1", flock=flock, hold=30.0)
        assert first.next_line()["outcome"] == "held"
        time.sleep(0.2)
        first.proc.send_signal(signal.SIGUSR1)  # it freezes itself between two commits
        wait_stopped(first.proc.pid)
        second = Launch(run, "node-2", flock=flock, hold=3.0)
        got = second.next_line()
        if flock == "shared":  # a frozen process still holds a cluster-wide flock: it is alive
            assert got["outcome"] == "refused" and "holds the flock" in got["message"]
            first.proc.send_signal(signal.SIGCONT)
            first.proc.kill()
            first.finish()
            second.finish()
            audit(run)
            continue
        assert got["outcome"] == "held" and got["generation"] == 2
        assert time.monotonic() - second.started >= LEASE * 0.9  # it watched the lease out
        first.proc.send_signal(signal.SIGCONT)
        fenced = first.next_line()
        assert fenced["outcome"] == "fenced" and "node-2" in fenced["message"], fenced
        third = Launch(run, "node-3", flock=flock, hold=0.2)
        refused = third.next_line()
        assert refused["outcome"] == "refused" and "its holder is alive" in refused["message"], refused
        assert second.finish()[-1]["own_record_intact"] is True  # the fenced one's release left it alone
        first.finish()
        third.finish()
        counts = audit(run)
        assert counts.get(2, 0) > 50


@pytest.mark.slow
@pytest.mark.parametrize("skew", [86400.0, -86400.0])
@pytest.mark.parametrize("flock", ("node", "none"))
def test_clock_skew_neither_protects_a_dead_lock_nor_exposes_a_live_one(tmp_path, flock, skew):
    for run in _dirs(tmp_path, "t", TRIALS):
        live = Launch(run, "skewed", flock=flock, hold=2.5, skew=skew)
        assert live.next_line()["outcome"] == "held"
        other = Launch(run, "node-2", flock=flock, hold=0.2)
        assert other.next_line()["outcome"] == "refused"  # it beats: alive, whatever its clock
        assert live.finish()[-1]["own_record_intact"] is True
        other.finish()
    for run in _dirs(tmp_path, "dead", TRIALS):
        dead = Launch(run, "skewed", flock=flock, hold=60.0, skew=skew)
        assert dead.next_line()["outcome"] == "held"
        time.sleep(0.3)
        dead.proc.kill()  # its node died: nobody on node-2 can check its pid
        dead.finish()
        claim = runlock.current_claim(str(run))
        assert claim is not None and abs(os.stat(claim.path).st_mtime - time.time() - skew) < 60
        taker = Launch(run, "node-2", flock=flock, hold=0.2)
        assert taker.next_line()["outcome"] == "held"
        assert time.monotonic() - taker.started < LEASE + 10
        taker.finish()


@pytest.mark.slow
@pytest.mark.parametrize("flock", FLOCKS)
@pytest.mark.parametrize("before", ["empty", "released", "dead-here"])
def test_simultaneous_launches_exactly_one_holds(tmp_path, flock, before):
    runs = _dirs(tmp_path, "t", TRIALS)
    for run in runs:
        if before != "empty":
            prev = Launch(run, "node-1", flock="none", hold=0.05)
            assert prev.next_line()["outcome"] == "held"
            if before == "dead-here":
                prev.proc.kill()
            prev.finish()
    races = [[Launch(run, f"node-{i}", flock=flock, hold=5.0, wait_go=True) for i in range(3)] for run in runs]
    for launches in races:  # every process has imported ckptkit and waits
        for x in launches:
            assert x.next_line()["outcome"] == "ready"
    for launches in races:  # go, all at once
        for x in launches:
            x.proc.stdin.write("\n")
            x.proc.stdin.flush()
    for run, launches in zip(runs, races, strict=True):
        outcomes = sorted(x.next_line(timeout=60)["outcome"] for x in launches)
        assert outcomes == ["held", "refused", "refused"], (before, outcomes)
        for x in launches:
            x.finish()
        audit(run)


# --- records of any shape, in this process ------------------------------------------------


def _plant(run_dir, generation, content: bytes):
    d = run_dir / CLAIMS_DIR
    d.mkdir(exist_ok=True)
    (d / lock_records.claim_name(generation)).write_bytes(content)


GOOD = {"token": "ab" * 16, "generation": 3, "pid": 1, "host": "elsewhere", "beat": 0, "released": False, "claimed": 0}


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{",
        b"null",
        b"\0\xff\xfe" * 50,
        json.dumps({**GOOD, "pid": 2**70}).encode(),
        json.dumps({**GOOD, "pid": "12"}).encode(),
        json.dumps({**GOOD, "generation": 4}).encode(),
        json.dumps({**GOOD, "host": "x" * 10_000}).encode(),
        json.dumps({**GOOD, "claimed": 1e400}).encode().replace(b"Infinity", b"1e999"),
        json.dumps({**GOOD, "token": None}).encode(),
        b"[" * 100_000,
        b" " * (lock_records.MAX_RECORD_BYTES + 10),
    ],
)
def test_a_record_of_any_shape_is_taken_over_naming_the_file(tmp_path, content, caplog):
    _plant(tmp_path, 3, content)
    with caplog.at_level("WARNING", logger="ckptkit"):
        lock = RunLock(str(tmp_path), lease_seconds=0.3).acquire()
    assert lock.record is not None and lock.record["generation"] == 4
    assert "gen-000000000003.json is unusable" in caplog.text
    lock.release()


def test_a_link_or_directory_as_a_claim_is_unusable_not_followed(tmp_path, caplog):
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({**GOOD, "generation": 1}))
    (tmp_path / "run" / CLAIMS_DIR).mkdir(parents=True)
    os.symlink(outside, tmp_path / "run" / CLAIMS_DIR / lock_records.claim_name(1))
    (tmp_path / "run" / CLAIMS_DIR / lock_records.claim_name(2)).mkdir()
    with caplog.at_level("WARNING", logger="ckptkit"):
        lock = RunLock(str(tmp_path / "run"), lease_seconds=0.3).acquire()
    assert lock.record["generation"] == 3 and "is unusable" in caplog.text
    lock.release()
    assert json.loads(outside.read_text())["generation"] == 1  # never written through


def test_a_held_lock_is_refused_in_the_same_process_at_once(tmp_path):
    lock = RunLock(str(tmp_path)).acquire()
    started = time.monotonic()
    with pytest.raises(RunLockedError, match=f"process {os.getpid()} on "):
        RunLock(str(tmp_path)).acquire()
    assert time.monotonic() - started < 1
    lock.release()


def test_release_marks_the_claim_and_the_generation_only_grows(tmp_path):
    for expected in (1, 2, 3, 4):
        lock = RunLock(str(tmp_path)).acquire()
        assert lock.record["generation"] == expected
        lock.check()
        lock.release()
        claim = runlock.current_claim(str(tmp_path))
        assert claim.released and claim.generation == expected
    assert runlock.claims_in(str(tmp_path)) == [3, 4]  # older generations pruned
    assert (tmp_path / runlock.LOCK_FILE).exists()  # the flock file is never unlinked


def test_a_fenced_holder_stops_and_never_releases_the_new_claim(tmp_path, monkeypatch):
    old = RunLock(str(tmp_path), lease_seconds=60).acquire()
    old._stop_beat.set()
    # another host took it over (as after a freeze past the lease)
    monkeypatch.setattr(lock_records, "hostname", lambda: "node-2")
    monkeypatch.setattr(runlock, "flock_exclusive", lambda fd, path: "unsupported")
    monkeypatch.setattr(old, "held", True)
    new_record = lock_records.new_record(2)
    (tmp_path / CLAIMS_DIR / lock_records.claim_name(2)).write_bytes(lock_records.encode(new_record))
    with pytest.raises(RunTakenOverError, match="taken over by process .* on node-2"):
        old.check()
    with pytest.raises(RunTakenOverError):
        old.check()  # and stays fenced
    old.release()
    now = runlock.current_claim(str(tmp_path))
    assert now.token == new_record["token"] and not now.released


def test_the_holder_beats_while_it_holds(tmp_path):
    lock = RunLock(str(tmp_path), lease_seconds=0.6).acquire()
    first = runlock.current_claim(str(tmp_path))
    time.sleep(0.5)
    later = runlock.current_claim(str(tmp_path))
    assert later.record["beat"] > first.record["beat"] and later.token == first.token
    lock.release()


@pytest.mark.parametrize("value, want", [("3", 3), ("", 0), ("x", 0), ("99999999999999999999", 0)])
def test_a_restart_count_of_any_shape_is_a_number(monkeypatch, value, want):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_RESTART_COUNT", value)
    assert lock_records.slurm_identity()["slurm_restart_count"] == want


def test_claims_removed_while_watched_are_judged_afresh(tmp_path, monkeypatch):
    """A foreign claim that someone deletes while this launch watches it: the launch takes
    the now empty directory instead of refusing an alive holder that is not there."""
    record = {**lock_records.new_record(1), "host": "elsewhere", "pid": 4242}
    claims = tmp_path / CLAIMS_DIR
    claims.mkdir()
    path = claims / lock_records.claim_name(1)
    path.write_bytes(lock_records.encode(record))
    real_sleep = time.sleep

    def sleep_then_remove(seconds):
        real_sleep(seconds)
        if path.exists():
            path.unlink()

    monkeypatch.setattr(runlock.time, "sleep", sleep_then_remove)
    lock = RunLock(str(tmp_path), lease_seconds=5).acquire()
    assert lock.record["generation"] == 1 and lock.record["host"] != "elsewhere"
    lock.release()
