"""The run directory cannot be turned against its owner (issue 15): each fault injected for
real (truncated files a crash leaves, real symlinks, real racing processes, real signals in
every phase of fit(), real tmpfs), each one a class of inputs rather than one example."""

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import tensorflow as tf
from conftest import Net, ToyTrainer, make_cfg, small_tmpfs, steps_on_disk
from procs import ENV, TOY_RUN, run, start, wait_for_line

import ckptkit
from ckptkit import export as export_lib
from ckptkit import lock_records, metadata, runlock
from ckptkit.controller import Controller
from ckptkit.runlock import CLAIMS_DIR, LOCK_FILE, RunLock, RunLockedError


def _read_all(prefix):
    reader = tf.train.load_checkpoint(str(prefix))
    for key, dtype in reader.get_variable_to_dtype_map().items():
        if dtype != tf.variant:
            reader.get_tensor(key)


def _listed(d):
    return [c["step"] for c in json.loads((d / "metadata.json").read_text())["checkpoints"]]


def _tree(path):
    """Every file under ``path`` with its content: to prove nothing there changed."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = fh.read()
    return out


# --- 1. an unreadable checkpoint never counts, never holds a slot, is saved again -------


def _crash_state(d, step, how):
    """What a kill -9 during the save of ``step`` leaves, made from the newest checkpoint:
    a torn index, a torn data shard, or an index whose data shard was never renamed in."""
    src = metadata.scan(str(d))[-1].path
    for f in metadata.checkpoint_files(src):
        shutil.copyfile(f, f.replace(os.path.basename(src), f"ckpt-{step}"))
    index, data = d / f"ckpt-{step}.index", d / f"ckpt-{step}.data-00000-of-00001"
    if how == "torn index":
        index.write_bytes(index.read_bytes()[: len(index.read_bytes()) // 3])
    elif how == "torn data":
        data.write_bytes(data.read_bytes()[: len(data.read_bytes()) // 2])
    else:
        data.unlink()


@pytest.mark.parametrize("how", ["torn index", "torn data", "missing data"])
def test_an_unreadable_newest_checkpoint_is_moved_aside_and_saved_again(tmp_path, how, caplog):
    run = tmp_path / "run"
    d = run / "checkpoints"

    def cfg(n):
        return make_cfg(
            run,
            **{
                "trainer.max_steps": n,
                "checkpoint.max_to_keep": 1,
                "checkpoint.save_every_steps": 10,
                "trainer.eval_every_steps": None,
            },
        )

    ToyTrainer(cfg(20)).fit()
    _crash_state(d, 30, how)
    with caplog.at_level("WARNING", logger="ckptkit"):
        first = ToyTrainer(cfg(23)).fit()  # falls back to 20, saves 23 (a SIGTERM, a best, a timed save)
    assert first.resumed_from == 20 and first.step == 23
    assert "moved the unreadable checkpoint" in caplog.text and "ckpt-30" in caplog.text
    assert steps_on_disk(d) == [23] and _listed(d) == [23]  # 30 holds no slot, 23 was kept
    aside = [p.name for p in (d / "unreadable").rglob("ckpt-30*")]
    assert "ckpt-30.index" in aside  # moved, not deleted
    assert ToyTrainer(cfg(23)).fit().resumed_from == 23  # the run is resumable
    second = ToyTrainer(cfg(30)).fit()
    assert second.resumed_from == 23 and second.step == 30
    _read_all(d / "ckpt-30")  # step 30 was written again, for real
    third = ToyTrainer(cfg(30)).fit()
    assert third.resumed_from == 30 and third.steps_run == 0


def test_nothing_readable_moves_nothing(tmp_path):
    run = tmp_path / "run"
    cfg = make_cfg(run, **{"trainer.max_steps": 10, "checkpoint.save_every_steps": 5})
    ToyTrainer(cfg).fit()
    for f in (run / "checkpoints").glob("ckpt-*.index"):
        f.write_bytes(f.read_bytes()[:10])
    with pytest.raises(ckptkit.CheckpointUnreadableError, match="none of the 2"):
        ToyTrainer(cfg).fit()
    assert steps_on_disk(run / "checkpoints") == [5, 10]
    assert not (run / "checkpoints" / "unreadable").exists()


def _flaky_reads(monkeypatch, fails: int, error):
    """Make the next ``fails`` reads of a checkpoint fail as TensorFlow reports a storage error
    (issue 30): ``error(path)`` builds the exception TensorFlow raises for that errno."""
    from ckptkit import checkpoint_restore

    real, calls = checkpoint_restore._read, []
    monkeypatch.setattr(checkpoint_restore, "READ_RETRY_DELAYS", (0.01, 0.02, 0.03))

    def read(checkpoint, path):
        calls.append(path)
        if len(calls) <= fails:
            raise error(path)
        return real(checkpoint, path)

    monkeypatch.setattr(checkpoint_restore, "_read", read)
    return calls


# How TensorFlow reports each errno on a read: errno -> error class (tsl's ErrnoToCode), with
# strerror kept in the message; the checkpoint reader wraps an index it cannot open as DataLoss.
STORAGE_ERRORS = {
    "EIO": lambda p: tf.errors.UnknownError(None, None, f"{p}.index; Input/output error"),
    "EACCES": lambda p: tf.errors.DataLossError(
        None, None, f"Unable to open table file {p}.index: PERMISSION_DENIED: {p}.index; Permission denied"
    ),
    "ESTALE": lambda p: tf.errors.AbortedError(None, None, f"{p}.data-00000-of-00001; Stale file handle"),
    "EAGAIN": lambda p: tf.errors.UnavailableError(None, None, f"{p}.index; Resource temporarily unavailable"),
}


@pytest.mark.parametrize("errno_name", sorted(STORAGE_ERRORS))
def test_a_passing_storage_error_is_retried_not_taken_for_corruption(tmp_path, monkeypatch, caplog, errno_name):
    """An NFS hiccup, an expired ticket, a backup holding the file: one failed read of the
    good newest checkpoint is retried; nothing moves aside and no step is trained again."""
    run = tmp_path / "run"
    cfg = make_cfg(run, **{"trainer.max_steps": 20, "checkpoint.save_every_steps": 10})
    ToyTrainer(cfg).fit()
    before = _tree(run / "checkpoints")
    calls = _flaky_reads(monkeypatch, 1, STORAGE_ERRORS[errno_name])
    with caplog.at_level("WARNING", logger="ckptkit"):
        result = ToyTrainer(cfg).fit()
    assert result.resumed_from == 20 and result.steps_run == 0
    assert len(calls) == 2 and calls[0].endswith("ckpt-20")
    assert "retrying in" in caplog.text and "moved" not in caplog.text
    assert not (run / "checkpoints" / "unreadable").exists()
    after = _tree(run / "checkpoints")
    assert {k for k in after if k.startswith("ckpt-")} == {k for k in before if k.startswith("ckpt-")}


@pytest.mark.parametrize("errno_name", ["EIO", "EACCES"])
def test_a_lasting_storage_error_stops_the_launch_moving_nothing(tmp_path, monkeypatch, errno_name):
    run = tmp_path / "run"
    cfg = make_cfg(run, **{"trainer.max_steps": 20, "checkpoint.save_every_steps": 10})
    ToyTrainer(cfg).fit()
    before = _tree(run / "checkpoints")
    calls = _flaky_reads(monkeypatch, 99, STORAGE_ERRORS[errno_name])
    with pytest.raises(ckptkit.CheckpointReadError) as err:
        ToyTrainer(cfg).fit()
    message = str(err.value)
    assert f"cannot read checkpoint {run / 'checkpoints' / 'ckpt-20'}:" in message
    assert {"EIO": "Input/output error", "EACCES": "Permission denied"}[errno_name] in message
    assert "tried 4 times" in message and "nothing was moved" in message
    assert len(calls) == 4 and set(calls) == {str(run / "checkpoints" / "ckpt-20")}  # no fallback to ckpt-10
    assert _tree(run / "checkpoints") == before
    monkeypatch.undo()  # the storage is back
    assert ToyTrainer(cfg).fit().resumed_from == 20


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file without permissions")
def test_a_real_permission_error_moves_nothing(tmp_path, monkeypatch):
    from ckptkit import checkpoint_restore

    monkeypatch.setattr(checkpoint_restore, "READ_RETRY_DELAYS", (0.01,))
    run = tmp_path / "run"
    cfg = make_cfg(run, **{"trainer.max_steps": 20, "checkpoint.save_every_steps": 10})
    ToyTrainer(cfg).fit()
    index = run / "checkpoints" / "ckpt-20.index"
    index.chmod(0)
    try:
        with pytest.raises(ckptkit.CheckpointReadError, match="Permission denied"):
            ToyTrainer(cfg).fit()
    finally:
        index.chmod(0o644)
    assert steps_on_disk(run / "checkpoints") == [10, 20]
    assert ToyTrainer(cfg).fit().resumed_from == 20


def test_unreadable_keeps_the_newest_sets_and_ls_shows_its_size(tmp_path, capsys):
    from ckptkit import checkpoint_files, cli

    run = tmp_path / "run"
    ToyTrainer(make_cfg(run, **{"trainer.max_steps": 5, "checkpoint.save_every_steps": 5})).fit()
    d = run / "checkpoints"
    for i in range(5):
        junk = d / f"ckpt-{100 + i}.index"
        junk.write_bytes(b"x" * 1000)
        checkpoint_files.move_aside(str(d), [str(junk)])
        time.sleep(0.01)
    sets = checkpoint_files.unreadable_sets(str(d))
    assert len(sets) == checkpoint_files.KEEP_UNREADABLE == 3
    assert sorted(p.name for p in (d / "unreadable").rglob("ckpt-*")) == [
        "ckpt-102.index",
        "ckpt-103.index",
        "ckpt-104.index",
    ]
    (d / "unreadable" / "notes").mkdir()  # not ckptkit's: never counted, never removed
    assert cli.main(["ls", str(run)]) == 0
    out = capsys.readouterr().out
    assert "unreadable: 3 set(s) of files moved aside, 2.9 KB" in out
    assert (d / "unreadable" / "notes").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["metadata.json", "checkpoint"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_kill_9_at_each_rename_of_a_save_and_the_state_file_agrees_at_the_next_start(tmp_path, name, when):
    """kill -9 right before or after the rename of metadata.json or of TensorFlow's state file
    in the second save (issue 30): the next launch makes the state file name the newest
    complete checkpoint before it restores anything, and the run resumes from it."""
    d = tmp_path / "checkpoints"
    args = ["trainer.max_steps=15", "trainer.eval_every_steps=null", "checkpoint.save_every_steps=5"]
    killed = start(tmp_path, *args, env=dict(ENV, TOY_KILL_AT=f"{name}:{when}:2"))
    out = killed.communicate(timeout=300)[0]
    assert killed.returncode == -signal.SIGKILL, out[-3000:]
    newest = steps_on_disk(d)[-1]
    assert newest == 10  # TensorFlow's files of step 10 were complete before either rename
    paused = start(tmp_path, *args, env=dict(ENV, TOY_PAUSE="restore:60"))
    try:
        wait_for_line(paused, "PAUSE restore")
        assert tf.train.latest_checkpoint(str(d)) == str(d / "ckpt-10")
        state = tf.train.get_checkpoint_state(str(d))
        assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == ["ckpt-5", "ckpt-10"]
    finally:
        paused.kill()
        paused.wait()
    if (name, when) == ("metadata.json", "after"):  # the case the state file got wrong: it resumes
        code, out = run(tmp_path, *args)
        assert code == 0, out[-3000:]
        assert json.loads(out.split("RESULT ", 1)[1].splitlines()[0])["resumed_from"] == 10


# --- 2. glob characters in a path ------------------------------------------------------


@pytest.mark.parametrize(
    "name, sibling",
    [
        ("model.hidden=[128,64]", "model.hidden=1"),  # a Hydra sweep over a list
        ("run*", "runX"),
        ("r?n", "ran"),
        ("with space [a-z]", "with space q"),
        ("ünïcødé*", "ünïcødéX"),
    ],
)
def test_glob_characters_in_the_directory_never_touch_a_sibling(tmp_path, name, sibling):
    mine, other = tmp_path / name / "ckpts", tmp_path / sibling / "ckpts"
    theirs = ckptkit.Checkpointer(str(other), max_to_keep=5, async_save=False, model=Net())
    for step in (1, 2, 3):
        theirs.save(step)
    before = _tree(tmp_path / sibling)
    ckpt = ckptkit.Checkpointer(str(mine), max_to_keep=1, async_save=True, model=Net())
    for step in (1, 2, 3):
        ckpt.save(step)
    ckpt.wait()
    assert _tree(tmp_path / sibling) == before
    assert steps_on_disk(mine) == [3]  # its own max_to_keep held
    entry = json.loads((mine / "metadata.json").read_text())["checkpoints"][0]
    assert entry["size"] == sum(os.path.getsize(mine / f) for f in os.listdir(mine) if f.startswith("ckpt-3."))
    assert entry["size"] > 0
    reopened = ckptkit.Checkpointer(str(mine), model=Net())
    assert [c.step for c in reopened.checkpoints] == [3] and reopened.restore_latest() == 3


# --- 3. symlinks planted in a run directory --------------------------------------------


def test_planted_symlinks_are_never_written_through_or_emptied(tmp_path):
    outside = tmp_path / "outside"
    (outside / "victim_dir").mkdir(parents=True)
    (outside / "victim_dir" / "precious.txt").write_text("keep me")
    (outside / "victim_file").write_text("keep me too")
    # a directory that looks like one of ckptkit's exports
    fake = outside / "looks_like_an_export"
    (fake / "assets.extra").mkdir(parents=True)
    (fake / "saved_model.pb").write_text("x")
    (fake / "assets.extra" / export_lib.EXPORT_INFO).write_text(json.dumps({"step": 1}))
    before = _tree(outside)

    run = tmp_path / "run"
    ckpts, export = run / "checkpoints", run / "export"
    ckpts.mkdir(parents=True)
    export.mkdir()
    os.symlink(outside / "victim_file", ckpts / "ckpt-10.index")
    os.symlink(outside / "victim_dir", ckpts / "ckpt-10_temp")
    os.symlink(outside / "victim_file", ckpts / "ckpt-20.data-00000-of-00001")
    os.symlink(outside / "victim_file", ckpts / f"metadata.json.tmp-{os.getpid()}")
    os.symlink(outside / "victim_file", ckpts / f"checkpoint.tmp-{os.getpid()}")
    os.symlink(outside / "victim_dir", export / ".tmp-1-999999")  # old naming, dead pid
    os.symlink(outside / "victim_dir", export / ".tmp-999999-abcdef")  # new naming, dead pid
    os.symlink(fake, export / "1")
    cfg = make_cfg(
        run,
        **{
            "trainer.max_steps": 20,
            "checkpoint.save_every_steps": 10,
            "trainer.eval_every_steps": 10,
            "export.enabled": True,
            "export.verify": False,
            "export.max_to_keep": 1,
        },
    )
    result = ToyTrainer(cfg).fit()
    assert _tree(outside) == before
    assert result.step == 20 and steps_on_disk(ckpts) == [10, 20]
    for step in (10, 20):
        assert not os.path.islink(ckpts / f"ckpt-{step}.index")
        _read_all(ckpts / f"ckpt-{step}")
    assert result.export_path == str(export / "2")  # the link named 1 is not taken for ours
    assert os.path.islink(export / "1") and os.path.islink(export / ".tmp-999999-abcdef")
    moved = {p.name for p in (ckpts / "unreadable").rglob("*") if p.is_symlink()}
    assert {"ckpt-10.index", "ckpt-10_temp", "ckpt-20.data-00000-of-00001"} <= moved


def test_a_planted_worker_directory_link_is_moved_aside_not_written_through(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    d = tmp_path / "ckpts"
    d.mkdir()
    os.symlink(outside, d / ".worker-1")
    ckpt = ckptkit.Checkpointer(str(d), worker_dir=str(d / ".worker-1"), async_save=False, model=Net())
    ckpt.save(5)
    assert _tree(outside) == {"keep": b"keep"}
    assert not (d / ".worker-1").exists() and list((d / "unreadable").rglob(".worker-1"))


# --- 4. the lock ---------------------------------------------------------------------


def _race(run_dir, barrier, results):
    barrier.wait()
    try:
        lock = RunLock(run_dir).acquire()
        results.put("won")
        time.sleep(0.5)  # hold it while the other one tries
        lock.release()
    except RunLockedError:
        results.put("refused")


def _claim_of(run_dir, generation, **fields):
    """Plant a claim (as another launch would have made it) in ``run_dir``."""
    record = {**lock_records.new_record(generation), **fields}
    claims = run_dir / CLAIMS_DIR
    claims.mkdir(parents=True, exist_ok=True)
    (claims / lock_records.claim_name(generation)).write_bytes(lock_records.encode(record))
    return record


def test_racing_launches_take_a_dead_holders_lock_exactly_once(tmp_path):
    ctx = multiprocessing.get_context("fork")
    outcomes = []
    for trial in range(8):
        run_dir = tmp_path / f"t{trial}"
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        _claim_of(run_dir, 1, pid=dead.pid, pid_start=None)
        barrier, results = ctx.Barrier(3), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(str(run_dir), barrier, results)) for _ in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        outcomes.append(sorted(results.get(timeout=5) for _ in procs))
    assert all(o == ["refused", "refused", "won"] for o in outcomes), outcomes


@pytest.mark.parametrize(
    "content", ["", "{", "null", '{"pid": "x"}', "\0\0\0", '{"host": "h"}', '{"pid": 1180591620717411303424}']
)
def test_an_old_lock_file_of_any_content_is_only_a_flock_target(tmp_path, content):
    """(issue 27) ``.ckptkit.lock`` is no record any more (the claims are): whatever an older
    version or anyone left in it, a launch neither parses nor trusts it."""
    (tmp_path / LOCK_FILE).write_text(content)
    lock = RunLock(str(tmp_path)).acquire()
    assert lock.record["pid"] == os.getpid()
    lock.release()


def test_a_held_lock_is_refused_in_the_same_and_another_process(tmp_path):
    lock = RunLock(str(tmp_path)).acquire()
    with pytest.raises(RunLockedError, match=f"process {os.getpid()}"):
        RunLock(str(tmp_path)).acquire()
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(1), ctx.Queue()
    p = ctx.Process(target=_race, args=(str(tmp_path), barrier, results))
    p.start()
    p.join(30)
    assert results.get(timeout=5) == "refused"
    lock.release()


class _Beating:
    """A live holder on another host: rewrites its claim every 50 ms (its beat)."""

    def __init__(self, run_dir, **fields):
        self.record = _claim_of(run_dir, 1, host="node-alive", pid=12345, **fields)
        self.path = run_dir / CLAIMS_DIR / lock_records.claim_name(1)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)
        self.thread.start()

    def _beat(self):
        while not self.stop.wait(0.05):
            self.record["beat"] += 1
            tmp = self.path.with_suffix(".tmp")
            tmp.write_bytes(lock_records.encode(self.record))
            os.replace(tmp, self.path)

    def end(self):
        self.stop.set()
        self.thread.join()


def test_a_lock_from_another_host_is_a_lease_watched_here(tmp_path, monkeypatch, caplog):
    """(issue 18, item 2; issue 27, item 4) A dead node's lock is taken over once it has not
    changed for the lease, watched on this host's monotonic clock; a live one is refused."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    live = _Beating(tmp_path)
    with pytest.raises(RunLockedError, match=r"node-alive.*its holder is alive"):
        RunLock(str(tmp_path), lease_seconds=0.5).acquire()
    live.end()
    then = time.time() + 86400  # its file times a day ahead: no protection
    os.utime(live.path, (then, then))
    with caplog.at_level("WARNING", logger="ckptkit"):
        lock = RunLock(str(tmp_path), lease_seconds=0.5).acquire()
    assert "did not change for 0.5 s as watched from here" in caplog.text
    assert lock.record["generation"] == 2
    lock.release()


def test_a_slurm_requeue_takes_over_at_once_and_a_second_step_is_refused(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    live = _Beating(tmp_path, slurm_job_id="4242", slurm_step_id="0", slurm_restart_count=1)
    with pytest.raises(RunLockedError, match="another step of the same SLURM job holds it") as err:
        RunLock(str(tmp_path), lease_seconds=0.5).acquire()
    assert "SLURM job 4242 step 0" in str(err.value)
    live.end()
    live = _Beating(tmp_path, slurm_job_id="4242", slurm_restart_count=0)  # the job before its requeue
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="ckptkit"):
        lock = RunLock(str(tmp_path), lease_seconds=60).acquire()
    assert time.monotonic() - started < 5
    assert "this is restart 1 of SLURM job 4242, it was restart 0 (a requeue)" in caplog.text
    live.end()
    lock.release()


def test_fit_takes_over_an_expired_lease_from_the_config(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    run = tmp_path / "run"
    live = _Beating(run)
    cfg = make_cfg(run, **{"trainer.max_steps": 5})
    cfg["checkpoint"]["lock_lease_seconds"] = 1
    with pytest.raises(RunLockedError, match="lock_lease_seconds=1 s"):
        ToyTrainer(cfg).fit()
    live.end()
    assert ToyTrainer(cfg).fit().step == 5
    cfg["checkpoint"]["lock_lease_seconds"] = 0
    with pytest.raises(ckptkit.ConfigError, match="lock_lease_seconds"):
        ToyTrainer(cfg)


def test_a_run_taken_over_stops_before_its_next_commit(tmp_path, monkeypatch):
    """(issue 27, item 1) Another launch claims the run while fit() trains: the next commit
    point raises RunTakenOverError, and nothing more is written to the checkpoints."""
    run = tmp_path / "run"
    cfg = make_cfg(run, **{"trainer.max_steps": 400, "checkpoint.save_every_steps": 10})
    trainer = ToyTrainer(cfg)
    original = Controller.save

    def save_then_be_taken_over(controller, step, metrics, **kw):
        path = original(controller, step, metrics, **kw)
        if step == 20:
            trainer.checkpointer.wait()
            gen = runlock.claims_in(str(run))[-1]
            _claim_of(run, gen + 1, host="node-2", pid=999)
        return path

    monkeypatch.setattr(Controller, "save", save_then_be_taken_over)
    with pytest.raises(ckptkit.RunTakenOverError, match="taken over by process 999 on node-2"):
        trainer.fit()
    assert steps_on_disk(run / "checkpoints") == [10, 20]
    assert not runlock.current_claim(str(run)).released  # the new holder's claim is left alone


# --- 5. an export is reused only for the very checkpoint it came from --------------------


def test_a_fresh_start_never_gets_the_old_runs_export(tmp_path, caplog):
    run = tmp_path / "run"
    cfg = make_cfg(run, **{"trainer.max_steps": 10, "export.enabled": True, "export.verify": False})
    old = ToyTrainer(cfg).fit()
    assert old.export_path == str(run / "export" / "1")
    cfg["checkpoint"]["resume"] = "never"
    cfg["optim"]["lr"] = 0.05
    new = ToyTrainer(cfg).fit()
    assert (run / "checkpoints" / ".ckptkit-owner.json").exists()  # claimed again at once
    assert new.export_path == str(run / "export" / "2")
    uid = {c.step: c.uid for c in metadata.scan(str(run / "checkpoints"))}[10]
    assert uid and export_lib.read_export_info(new.export_path)["checkpoint_uid"] == uid
    cfg["checkpoint"]["resume"] = "auto"
    with caplog.at_level("INFO", logger="ckptkit"):
        again = ToyTrainer(cfg).fit()
    assert again.export_path == new.export_path
    assert "reusing export 2 (same checkpoint, same signatures)" in caplog.text


# --- 6. one run per checkpoint directory -----------------------------------------------


def test_a_second_run_on_the_same_checkpoint_dir_is_refused(tmp_path):
    shared = tmp_path / "shared-ckpts"
    a = make_cfg(tmp_path / "a", **{"trainer.max_steps": 10, "checkpoint.dir": str(shared)})
    ToyTrainer(a).fit()
    b = make_cfg(tmp_path / "b", **{"trainer.max_steps": 10, "checkpoint.dir": str(shared), "optim.lr": 0.1})
    for resume in ("auto", "never"):
        b["checkpoint"]["resume"] = resume
        with pytest.raises(ckptkit.CheckpointDirOwnedError) as err:
            ToyTrainer(b).fit()
        assert str(tmp_path / "a") in str(err.value) and str(tmp_path / "b") in str(err.value)
    assert steps_on_disk(shared) == [10]
    a["trainer"]["max_steps"] = 15
    assert ToyTrainer(a).fit().resumed_from == 10  # the owner goes on


def test_a_checkpoint_dir_outside_the_run_is_locked_too(tmp_path):
    shared = tmp_path / "shared-ckpts"
    held = RunLock(str(shared)).acquire()  # another run's launch is in it right now
    try:
        cfg = make_cfg(tmp_path / "b", **{"trainer.max_steps": 5, "checkpoint.dir": str(shared)})
        with pytest.raises(RunLockedError, match=str(shared)):
            ToyTrainer(cfg).fit()
    finally:
        held.release()
    cfg["checkpoint"]["resume"] = "never"
    assert ToyTrainer(cfg).fit().step == 5
    ToyTrainer(cfg).fit()  # moves the first aside, locks and claims the fresh directory
    assert runlock.current_claim(str(shared)).released and (shared / ".ckptkit-owner.json").exists()


def test_a_moved_run_directory_still_owns_its_checkpoints(tmp_path):
    cfg = make_cfg(tmp_path / "a", **{"trainer.max_steps": 10})
    ToyTrainer(cfg).fit()
    os.rename(tmp_path / "a", tmp_path / "moved")
    moved = make_cfg(tmp_path / "moved", **{"trainer.max_steps": 15})
    result = ToyTrainer(moved).fit()
    assert result.resumed_from == 10 and result.step == 15


# --- 7. non-finite weights are never saved ----------------------------------------------


class PoisonedUpdate(ToyTrainer):
    """At step ``data.poison_at`` the gradient is infinite while the loss (computed before
    the update) is finite: only the weights show it."""

    def train_step(self, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(y, self.model(x), from_logits=True))
        grads = tape.gradient(loss, self.model.trainable_variables)
        scale = tf.where(self.global_step + 1 == self.cfg.data.poison_at, float("inf"), 1.0)
        self.optimizer.apply_gradients(zip([g * scale for g in grads], self.model.trainable_variables, strict=True))
        return {"loss": loss}


@pytest.mark.parametrize("async_save", [True, False])
def test_nan_weights_are_never_saved_and_the_run_stays_resumable(tmp_path, async_save):
    cfg = make_cfg(
        tmp_path / "run",
        **{
            "trainer.max_steps": 30,
            "trainer.steps_per_loop": 5,
            "checkpoint.save_every_steps": 5,
            "trainer.eval_every_steps": None,
            "data.poison_at": 10,
            "checkpoint.async_save": async_save,
        },
    )
    with pytest.raises(FloatingPointError) as err:
        PoisonedUpdate(cfg).fit()
    message = str(err.value)
    assert "non-finite values at step 10" in message and "nothing was saved at step 10" in message
    assert "last good checkpoint is" in message and "ckpt-5 (step 5)" in message
    assert steps_on_disk(tmp_path / "run" / "checkpoints") == [5]
    cfg["data"]["poison_at"] = -1
    result = ToyTrainer(cfg).fit()  # resumable from the last finite checkpoint
    assert result.resumed_from == 5 and result.step == 30


# --- 8. signals in every phase of fit() -------------------------------------------------


def _launch(run_dir, phase, *overrides, pause=3):
    return start(run_dir, *overrides, env=dict(ENV, TOY_PAUSE=f"{phase}:{pause}"))


def _signal_at_pause(proc, phase, signum):
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f"PAUSE {phase}"):
            time.sleep(0.3)
            proc.send_signal(signum)
            break
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert f"PAUSE {phase}" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    return proc.returncode, out


BASE = [
    "trainer.max_steps=10",
    "trainer.eval_every_steps=null",
    "checkpoint.save_every_steps=5",
    "trainer.steps_per_loop=5",
]


@pytest.mark.slow
@pytest.mark.parametrize("phase, signum", [("build", signal.SIGTERM), ("restore", signal.SIGINT)])
def test_a_signal_before_training_exits_75_and_loses_nothing(tmp_path, phase, signum):
    if phase == "restore":
        code, out = (
            subprocess.run(
                [sys.executable, TOY_RUN, str(tmp_path), "trainer.max_steps=5", *BASE[1:]],
                env=ENV,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            ).returncode,
            "",
        )
        assert code == 0
    code, out = _signal_at_pause(_launch(tmp_path, phase, *BASE), phase, signum)
    assert code == ckptkit.EXIT_PREEMPTED, out[-3000:]
    assert f"stopped by {signal.Signals(signum).name}" in out and "before training" in out
    expected = [5] if phase == "restore" else []
    assert (steps_on_disk(tmp_path / "checkpoints") if expected else []) == expected
    code, out = (
        subprocess.run(
            [sys.executable, TOY_RUN, str(tmp_path), *BASE],
            env=ENV,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        ).returncode,
        None,
    )
    assert code == 0 and steps_on_disk(tmp_path / "checkpoints")[-1] == 10


@pytest.mark.slow
@pytest.mark.parametrize(
    "phase, signum",
    [
        ("final_eval", signal.SIGTERM),
        ("final_save", signal.SIGTERM),
        ("final_save", signal.SIGHUP),
        ("export", signal.SIGTERM),
    ],
)
def test_a_signal_after_the_last_step_saves_it_exits_0_and_says_the_export_was_skipped(tmp_path, phase, signum):
    args = [*BASE, "export.enabled=true", "export.verify=false", "checkpoint.async_save=true"]
    if phase == "final_eval":
        args[1] = "trainer.eval_every_steps=10"
    code, out = _signal_at_pause(_launch(tmp_path, phase, *args), phase, signum)
    assert code == 0, out[-3000:]
    assert "after training finished at step 10" in out and "export was skipped" in out
    assert steps_on_disk(tmp_path / "checkpoints")[-1] == 10
    _read_all(tmp_path / "checkpoints" / "ckpt-10")
    assert _listed(tmp_path / "checkpoints")[-1] == 10
    assert not [n for n in os.listdir(tmp_path / "export")] if (tmp_path / "export").exists() else True
    code, out = run(tmp_path, *args)
    assert code == 0 and "already finished" in out
    assert export_lib.versions(str(tmp_path / "export")) == [1]


def _children(pid):
    out = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            out.append((int(entry), cmdline))
    return out


@pytest.mark.slow
def test_ctrl_c_during_the_export_check_skips_the_export_cleanly(tmp_path):
    """Ctrl-C reaches the whole foreground process group while the session-loader check runs
    in its child process: the run exits 0 (training is saved), says the export was skipped,
    leaves no version and no temporary, and no check process behind."""
    args = [*BASE, "export.enabled=true", "checkpoint.async_save=true"]
    proc = subprocess.Popen(
        [sys.executable, TOY_RUN, str(tmp_path), *args],
        env=ENV,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline, check = time.time() + 240, []
    while time.time() < deadline and proc.poll() is None and not check:
        check = [c for c in _children(proc.pid) if "serving_check.py" in c[1]]
        time.sleep(0.05)
    assert check, "the export check never started"
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "export was skipped" in out and "Traceback" not in out, out[-3000:]
    assert export_lib.versions(str(tmp_path / "export")) == []
    assert os.listdir(tmp_path / "export") == []
    assert not os.path.exists(f"/proc/{check[0][0]}") or "zombie" in open(f"/proc/{check[0][0]}/status").read()


# --- 9. bookkeeping that is valid JSON but wrong; damaged TensorBoard files -------------

BAD_ENTRIES = {
    "time yesterday": {"time": "yesterday"},
    "time huge": {"time": 1e300},
    "time negative": {"time": -5},
    "negative step": {"step": -10},
    "step as string": {"step": "10"},
    "step as float": {"step": 10.5},
    "step as bool": {"step": True},
    "size as string": {"size": "big"},
    "metrics as list": {"metrics": [1, 2]},
    "metric as string": {"metrics": {"accuracy": "high"}},
    "uid as number": {"uid": 7},
    "entry not an object": None,
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    ToyTrainer(make_cfg(run, **{"trainer.max_steps": 10, "checkpoint.save_every_steps": 5})).fit()
    return run


@pytest.mark.parametrize("variant", sorted(BAD_ENTRIES) + ["step with no files", "best as string"])
def test_wrong_bookkeeping_is_reported_and_rebuilt(finished_run, tmp_path, variant, capsys, caplog):
    from ckptkit import cli

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    d = run / "checkpoints"
    doc = json.loads((d / "metadata.json").read_text())
    if variant == "step with no files":
        doc["checkpoints"].append(dict(doc["checkpoints"][-1], step=99))
    elif variant == "best as string":
        doc["best"] = "yesterday"
    elif BAD_ENTRIES[variant] is None:
        doc["checkpoints"][-1] = "ckpt-10"
    else:
        doc["checkpoints"][-1].update(BAD_ENTRIES[variant])
    (d / "metadata.json").write_text(json.dumps(doc))
    with caplog.at_level("WARNING", logger="ckptkit"):
        assert cli.main(["ls", str(run)]) == 0
    out = capsys.readouterr().out
    assert "ckptkit: error" not in out and out.count("\n") >= 4
    if variant not in ("step with no files", "best as string"):
        assert "metadata.json" in caplog.text and "invalid values" in caplog.text
    assert [c.step for c in metadata.scan(str(d))] == [5, 10]
    cfg = make_cfg(run, **{"trainer.max_steps": 15, "checkpoint.save_every_steps": 5})
    assert ToyTrainer(cfg).fit().resumed_from == 10
    assert _listed(d) == [5, 10, 15]
    rebuilt = json.loads((d / "metadata.json").read_text())["checkpoints"]
    assert all(isinstance(e["time"], float) and e["size"] > 0 for e in rebuilt)


@pytest.mark.parametrize("damage", ["torn", "bit flip"])
def test_a_damaged_event_file_never_blocks_resume(finished_run, tmp_path, damage, caplog):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    event = next((run / "logs" / "train").glob("events.out.tfevents.*"))
    raw = bytearray(event.read_bytes())
    if damage == "torn":
        raw = raw[: len(raw) - 7]
    else:
        raw[len(raw) // 2] ^= 0x40
    event.write_bytes(bytes(raw))
    cfg = make_cfg(run, **{"trainer.max_steps": 15, "checkpoint.save_every_steps": 5})
    with caplog.at_level("WARNING", logger="ckptkit"):
        assert ToyTrainer(cfg).fit().resumed_from == 10
    assert str(event) in caplog.text and "damaged" in caplog.text
    list(tf.data.TFRecordDataset(str(event)))  # readable again, the readable prefix kept


# --- 10. leftovers of crashed saves, and a linear scan -----------------------------------


def test_the_leftovers_of_crashed_saves_are_removed_and_nothing_else(tmp_path):
    run = tmp_path / "run"
    cfg = make_cfg(run, **{"trainer.max_steps": 10, "checkpoint.save_every_steps": 5})
    ToyTrainer(cfg).fit()
    d = run / "checkpoints"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    (d / "ckpt-15_temp").mkdir()
    (d / "ckpt-15_temp" / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"\0" * 2**20)
    (d / "ckpt-15_temp_0123abcd").mkdir()
    (d / "ckpt-15.data-00000-of-00001").write_bytes(b"\0" * 100)
    (d / "metadata.json.tmp-12345").write_text("{")
    (d / "checkpoint.tmp-4f3e2a1b0c9d8e7f").write_text("x")
    (d / ".ckptkit-owner.json.tmp-00aa11bb22cc33dd").write_text("{")
    os.symlink(outside, d / "ckpt-16_temp")
    mine = ["notes.txt", "metadata.json.bak", "ckpt-15.index.bak", "checkpoint.tmp-notours"]
    for name in mine:
        (d / name).write_text("user's")
    cfg["trainer"]["max_steps"] = 12
    ToyTrainer(cfg).fit()
    names = set(os.listdir(d))
    assert not names & {
        "ckpt-15_temp",
        "ckpt-15_temp_0123abcd",
        "ckpt-15.data-00000-of-00001",
        "metadata.json.tmp-12345",
        "checkpoint.tmp-4f3e2a1b0c9d8e7f",
        ".ckptkit-owner.json.tmp-00aa11bb22cc33dd",
    }
    assert set(mine) <= names and os.path.islink(d / "ckpt-16_temp")
    assert (outside / "keep").read_text() == "keep"
    assert steps_on_disk(d) == [5, 10, 12] or steps_on_disk(d) == [10, 12]


def test_scanning_lists_the_directory_once(tmp_path, monkeypatch):
    from ckptkit import cli

    d = tmp_path / "many"
    d.mkdir()
    for step in range(1, 3001):
        (d / f"ckpt-{step}.index").write_bytes(b"i")
        (d / f"ckpt-{step}.data-00000-of-00001").write_bytes(b"dd")
    from ckptkit import gfile

    calls = []
    real = gfile.listdir
    monkeypatch.setattr(gfile, "listdir", lambda p: (calls.append(p), real(p))[1])
    found = metadata.scan(str(d))
    assert len(found) == 3000 and found[-1].size == 3 and len(calls) == 1
    calls.clear()
    assert cli.main(["ls", str(d)]) == 0
    assert len(calls) <= 2


# --- 11. verify reads, it never runs what it verifies -----------------------------------


def test_verify_never_runs_an_untrusted_saved_model(tmp_path, capsys):
    from ckptkit import cli

    target = tmp_path / "victim.txt"
    target.write_text("original")

    class Writes(tf.saved_model.experimental.TrackableResource):
        def _create_resource(self):
            return tf.raw_ops.VarHandleOp(dtype=tf.float32, shape=[], shared_name="")

        def _initialize(self):
            return tf.io.write_file(str(target), "overwritten by the model's initializer")

    root = tf.Module()
    root.evil = Writes()
    root.v = tf.Variable([1.0, 2.0])
    root.f = tf.function(lambda x: x * root.v, input_signature=[tf.TensorSpec([2], tf.float32)])
    target.write_text("original")  # creating the resource ran it here once
    tf.saved_model.save(root, str(tmp_path / "sm"), signatures={"serving_default": root.f})
    target.write_text("original")
    assert cli.main(["verify", str(tmp_path / "sm")]) == 0
    out = capsys.readouterr().out
    assert target.read_text() == "original"
    assert "signature 'serving_default'" in out and "variable tensors read" in out
    assert "nothing of the model was run" in out
    assert cli.main(["verify", "--load", str(tmp_path / "sm")]) == 0  # the explicit flag runs it
    assert target.read_text() != "original"


def test_export_says_which_file_it_imports(tmp_path, monkeypatch, capsys):
    from ckptkit import cli

    run = tmp_path / "run"
    ToyTrainer(make_cfg(run, **{"trainer.max_steps": 5, "export.verify": False})).fit()
    assert cli.main(["export", str(run)]) == 0
    err = capsys.readouterr().err
    assert "importing trainer ToyTrainer from" in err and "conftest" in err
    with pytest.raises(SystemExit):
        cli.main(["export", "--help"])
    assert "IMPORTS AND RUNS" in capsys.readouterr().out


@pytest.mark.parametrize("record", ["- just\n- a list\n", "", "not: [closed\n"])
def test_export_of_a_damaged_run_record_says_which_file(tmp_path, capsys, record):
    from ckptkit import cli

    run = tmp_path / "run"
    run.mkdir()
    (run / "ckptkit_run.yaml").write_text(record)
    assert cli.main(["export", str(run)]) == 1
    err = capsys.readouterr().err
    assert "ckptkit_run.yaml" in err and "Traceback" not in err


# --- 12. smaller ones -------------------------------------------------------------------


class EmptyData(ToyTrainer):
    def train_dataset(self):
        ds = super().train_dataset()
        return ds.take(0) if self.cfg.data.empty == "known" else ds.filter(lambda x, y: False)


@pytest.mark.parametrize("empty", ["known", "filtered"])
def test_an_empty_training_dataset_says_so(tmp_path, empty):
    cfg = make_cfg(tmp_path / "run", **{"data.empty": empty})
    with pytest.raises(ckptkit.DataPipelineError, match=r"train_dataset\(\) yield"):
        EmptyData(cfg).fit()


def test_periodic_saves_use_a_clock_that_cannot_step_back(tmp_path, monkeypatch):
    assert ckptkit.Trainer.clock is time.monotonic
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 3600)  # NTP stepped the wall clock back
    cfg = make_cfg(
        tmp_path / "run",
        **{
            "trainer.max_steps": 40,
            "trainer.steps_per_loop": 1,
            "checkpoint.save_every_steps": None,
            "checkpoint.max_to_keep": None,
            "checkpoint.save_every_seconds": 1e-9,
            "trainer.eval_every_steps": None,
        },
    )
    ToyTrainer(cfg).fit()
    assert len(steps_on_disk(tmp_path / "run" / "checkpoints")) == 40


def test_full_disk_before_the_first_save_estimates_the_bytes_needed(tmp_path):
    with small_tmpfs(tmp_path / "small", "1m") as small:
        free = os.statvfs(small).f_bavail * os.statvfs(small).f_frsize
        (small / "filler").write_bytes(b"\0" * (free - 8192))
        ckpt = ckptkit.Checkpointer(str(small / "c"), async_save=False, model=Net(4, 256, 3))
        with pytest.raises(ckptkit.CheckpointSaveError) as err:
            ckpt.save(1)
        message = str(err.value)
        assert "about ? bytes" not in message
        needed = int(message.split("about ")[1].split(" bytes needed")[0])
        assert needed == (4 * 256 + 256 + 256 * 3 + 3) * 4 + 4096  # the variables, 4 kB for index and graph


class Batched(ToyTrainer):
    def train_dataset(self):
        from conftest import toy_data

        x, y = toy_data()
        return (
            tf.data.Dataset.from_tensor_slices((x, y))
            .shuffle(96, seed=1)
            .batch(self.cfg.data.batch, drop_remainder=True)
        )


def test_a_changed_data_pipeline_is_named_on_resume(tmp_path):
    cfg = make_cfg(tmp_path / "run", **{"trainer.max_steps": 10, "data.batch": 16})
    Batched(cfg).fit()
    cfg["data"]["batch"] = 8
    cfg["trainer"]["max_steps"] = 20
    with pytest.raises(ckptkit.DataPipelineError) as err:
        Batched(cfg).fit()
    message = str(err.value)
    assert "pipeline changed" in message and "ckpt-10" in message and "data.batch: 16 -> 8" in message
    assert steps_on_disk(tmp_path / "run" / "checkpoints") == [10]  # nothing moved or lost
