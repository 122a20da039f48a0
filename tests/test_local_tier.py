"""The local tier (checkpoint.local_dir, ckptkit.local_tier): saves to node-local storage,
some copied to checkpoint.dir; which launches may read it; crashes in a copy; a requeue on
another host."""

import glob
import json
import logging
import os
import shutil
import signal
import time

import pytest
import tensorflow as tf
from conftest import ToyTrainer, make_cfg, steps_on_disk
from procs import ENV, result_of, run, start

from ckptkit import Checkpointer, checkpoint_files, cli, local_tier, metadata
from ckptkit.config import load_config
from ckptkit.errors import ConfigError
from ckptkit.local_tier import LocalTier, LocalTierOwnedError, judge
from ckptkit.resume import restore_newest_readable
from ckptkit.save_budget import SaveBudget

HOST = local_tier.hostname()


# --- the protocol's rules, as a table ---------------------------------------------------


@pytest.mark.parametrize(
    "record, has_checkpoints, last, verdict",
    [
        (None, False, None, "fresh"),
        (None, False, "L1", "fresh"),
        (None, True, "L1", "foreign"),  # checkpoints nobody recorded: whose?
        ({"persistent": "/other", "host": HOST, "launches": ["L1"]}, True, "L1", "foreign"),
        ({"persistent": "/p", "host": HOST, "launches": ["L1"]}, True, "L1", "mine"),
        ({"persistent": "/p", "host": HOST, "launches": ["L0", "L1"]}, True, "L0", "mine"),  # died between records
        ({"persistent": "/p", "host": HOST, "launches": ["L1"]}, True, "L2", "stale"),  # another launch went on
        ({"persistent": "/p", "host": HOST, "launches": ["L1"]}, True, None, "stale"),  # the run started afresh
        ({"persistent": "/p", "host": "elsewhere", "launches": ["L1"]}, True, "L1", "stale"),
        ({"persistent": "/p", "host": HOST, "launches": "L1"}, True, "L1", "stale"),  # damaged: never adopted
    ],
)
def test_which_launch_may_read_a_local_tier(record, has_checkpoints, last, verdict):
    assert judge(record, has_checkpoints, persistent="/p", host=HOST, last_launch=last) == verdict


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"checkpoint.persist_every_seconds": 60}, "checkpoint.persist_every_seconds"),
        ({"checkpoint.local_max_to_keep": 3}, "checkpoint.local_max_to_keep"),
        ({"checkpoint.local_dir": "gs://bucket/x"}, "checkpoint.local_dir"),
        ({"checkpoint.local_dir": "{run}/checkpoints/local"}, "checkpoint.local_dir"),
        ({"checkpoint.local_dir": "/dev/shm/x", "strategy.kind": "multi_worker"}, "checkpoint.local_dir"),
        ({"checkpoint.local_dir": "/dev/shm/x", "checkpoint.local_max_to_keep": 0}, "checkpoint.local_max_to_keep"),
        (
            {"checkpoint.local_dir": "/dev/shm/x", "checkpoint.persist_every_saves": 1.5},
            "checkpoint.persist_every_saves",
        ),
    ],
)
def test_local_tier_settings_are_refused_with_the_key(tmp_path, overrides, key):
    run_dir = tmp_path / "run"
    overrides = {k: v.format(run=run_dir) if isinstance(v, str) else v for k, v in overrides.items()}
    with pytest.raises(ConfigError) as err:
        load_config(make_cfg(run_dir, **overrides))
    assert err.value.key == key


def test_local_tier_defaults(tmp_path):
    run, _ = load_config(make_cfg(tmp_path / "run", **{"checkpoint.local_dir": "/dev/shm/x"}))
    c = run.checkpoint
    assert (c.local_max_to_keep, c.persist_every_seconds, c.persist_every_saves) == (2, 300.0, None)
    run, _ = load_config(make_cfg(tmp_path / "run", **{"checkpoint.local_dir": None}))
    assert run.checkpoint.local_dir is None


# --- copies ----------------------------------------------------------------------------


def _checkpoint(directory, step=5, mb=1):
    v = tf.Variable(tf.random.normal([mb * 2**18]))
    prefix = tf.train.Checkpoint(v=v).write(os.path.join(directory, f"ckpt-{step}"))
    return prefix, v


def _ckpt_names(directory):
    return sorted(n for n in os.listdir(directory) if n.startswith("ckpt-"))


def test_a_copy_is_complete_and_readable(tmp_path):
    prefix, v = _checkpoint(tmp_path / "local")
    copied = local_tier.copy_checkpoint(prefix, str(tmp_path / "persistent"))
    assert copied == str(tmp_path / "persistent" / "ckpt-5")
    reader = tf.train.load_checkpoint(copied)
    key = next(k for k in reader.get_variable_to_shape_map() if k.startswith("v/"))
    assert (reader.get_tensor(key) == v.numpy()).all()


@pytest.mark.parametrize("fails_at", ["second_file", "fence"])
def test_a_copy_that_fails_leaves_nothing_in_the_persistent_tier(tmp_path, monkeypatch, fails_at):
    """A copy fails while the files are written (a full disk) or at the fence (the run was
    taken over): no checkpoint file, whole or partial, and no temporary stays."""
    prefix, _ = _checkpoint(tmp_path / "local")
    real, copies = shutil.copyfile, []

    def copyfile(src, dst, **kw):
        copies.append(dst)
        if fails_at == "second_file" and len(copies) == 2:
            raise OSError(28, "No space left on device")
        return real(src, dst, **kw)

    def fence():
        if fails_at == "fence":
            raise RuntimeError("taken over")

    monkeypatch.setattr(shutil, "copyfile", copyfile)
    with pytest.raises((OSError, RuntimeError)):
        local_tier.copy_checkpoint(prefix, str(tmp_path / "persistent"), fence)
    assert _ckpt_names(tmp_path / "persistent") == []
    assert _ckpt_names(tmp_path / "local") == ["ckpt-5.data-00000-of-00001", "ckpt-5.index"]


def test_what_a_killed_copy_left_is_removed_at_the_next_start(tmp_path):
    d = tmp_path / "persistent"
    d.mkdir()
    left = ["ckpt-7.index.tmp-0a1b2c", "ckpt-7.data-00000-of-00001.tmp-9f", ".ckptkit-lineage.json.tmp-77"]
    for name in left + ["ckpt-7.data-00000-of-00001", "notes.tmp-1"]:
        (d / name).write_text("x")
    removed = checkpoint_files.remove_leftovers(str(d))
    assert sorted(os.path.basename(p) for p in removed) == sorted(left + ["ckpt-7.data-00000-of-00001"])
    assert os.listdir(d) == ["notes.tmp-1"]  # not a name ckptkit writes


# --- the Checkpointer with a local tier ----------------------------------------------------


def _tiered(tmp_path, **kw):
    v = tf.Variable([0.0, 0.0])
    kw.setdefault("persist_every_saves", 2)
    kw.setdefault("persist_every_seconds", None)
    ckpt = Checkpointer(str(tmp_path / "persistent"), local_dir=str(tmp_path / "local"), v=v, **kw)
    return ckpt, v


@pytest.mark.parametrize("async_save", [True, False])
def test_saves_go_local_and_every_nth_is_copied(tmp_path, async_save):
    ckpt, v = _tiered(tmp_path, async_save=async_save, max_to_keep=None)
    for step in range(1, 8):
        v.assign([float(step), 0.0])
        ckpt.save(step, persist=True if step == 7 else None)  # the last one: always
        ckpt.wait()  # a copy still queued would put the next one off
    assert steps_on_disk(ckpt.directory) == [2, 4, 6, 7]
    assert steps_on_disk(ckpt.local.directory) == [6, 7]  # the newest 2 (local_max_to_keep)
    assert [c.step for c in metadata.scan(ckpt.directory)] == [2, 4, 6, 7]  # recorded there
    assert [os.path.dirname(c.path) for c in ckpt.checkpoints[-2:]] == [ckpt.directory] * 2  # persistent wins
    assert [(c.step, os.path.dirname(c.path) == ckpt.local.directory) for c in ckpt.resume_candidates()[:3]] == [
        (7, True),
        (7, False),
        (6, True),
    ]
    ckpt.close()


def test_a_local_checkpoint_is_never_deleted_before_its_copy_is_recorded(tmp_path, monkeypatch):
    """local_max_to_keep=1 with copies slower than saves: every checkpoint asked to persist
    reaches the persistent tier although newer saves push it out of the local newest-1."""
    real = local_tier.copy_checkpoint
    monkeypatch.setattr(local_tier, "copy_checkpoint", lambda *a: (__import__("time").sleep(0.3), real(*a))[1])
    ckpt, v = _tiered(tmp_path, local_max_to_keep=1, persist_every_saves=None, max_to_keep=None)
    for step in range(1, 5):
        ckpt.save(step, persist=step in (1, 2))
    ckpt.wait()
    assert steps_on_disk(ckpt.directory) == [1, 2]
    assert steps_on_disk(ckpt.local.directory) == [4]
    ckpt.close()


def test_a_step_asked_to_persist_twice_is_copied_once(tmp_path, monkeypatch):
    """The rule copies a save, then the final save lands on the same step while that copy
    is still on its way: one copy, nothing moved aside as "in the way"."""
    real = local_tier.copy_checkpoint
    monkeypatch.setattr(local_tier, "copy_checkpoint", lambda *a: (__import__("time").sleep(0.3), real(*a))[1])
    ckpt, v = _tiered(tmp_path, persist_every_saves=1, async_save=False)
    ckpt.save(1)
    ckpt.save(1, persist=True)
    ckpt.wait()
    assert steps_on_disk(ckpt.directory) == [1]
    assert not os.path.exists(os.path.join(ckpt.directory, "unreadable"))
    ckpt.close()


def test_an_unreadable_local_checkpoint_falls_back_to_its_persistent_copy(tmp_path, caplog):
    ckpt, v = _tiered(tmp_path)
    v.assign([4.0, 2.0])
    ckpt.save(4, persist=True)
    ckpt.wait()
    ckpt.close()
    local = metadata.checkpoint_files(os.path.join(ckpt.local.directory, "ckpt-4"))
    data = next(f for f in local if ".data-" in f)
    with open(data, "r+b") as f:
        f.truncate(3)
    again, v2 = _tiered(tmp_path)
    assert again.open_local_tier() == "mine"
    with caplog.at_level(logging.WARNING, logger="ckptkit"):
        info = restore_newest_readable(again)
    assert info.path == os.path.join(again.directory, "ckpt-4")
    assert list(v2.numpy()) == [4.0, 2.0]
    assert "moved the unreadable local checkpoint" in caplog.text
    assert steps_on_disk(again.local.directory) == [] and steps_on_disk(again.directory) == [4]


def test_a_tier_of_another_checkpoint_dir_or_of_nobody_is_refused(tmp_path):
    tier = LocalTier(str(tmp_path / "local" / "t"), str(tmp_path / "persistent"))
    _checkpoint(tier.directory)
    with pytest.raises(LocalTierOwnedError, match="no run ckptkit recorded"):
        tier.open()
    record = {"persistent": str(tmp_path / "other"), "host": HOST, "launches": ["L1"]}
    (tmp_path / "local" / "t" / local_tier.RECORD_FILE).write_text(json.dumps(record))
    with pytest.raises(LocalTierOwnedError, match=f"another checkpoint.dir \\({tmp_path / 'other'}\\)"):
        tier.open()
    assert _ckpt_names(tier.directory) == ["ckpt-5.data-00000-of-00001", "ckpt-5.index"]  # nothing touched


def test_a_link_planted_where_the_tier_goes_is_refused_and_nothing_written_through_it(tmp_path):
    """/dev/shm is every user's: a link at the tier's (predictable) name must not carry a
    run's checkpoints, or its removal of stale ones, into another directory."""
    victim = tmp_path / "victim"
    victim.mkdir()
    persistent = str(tmp_path / "persistent")
    os.makedirs(tmp_path / "local")
    os.symlink(victim, local_tier.tier_dir(str(tmp_path / "local"), persistent))
    ckpt, _ = _tiered(tmp_path)
    with pytest.raises(LocalTierOwnedError, match="is a symbolic link"):
        ckpt.save(1)
    assert os.listdir(victim) == []
    fresh, _ = _tiered(tmp_path / "fresh")
    fresh.save(1)
    fresh.wait()
    assert os.stat(fresh.local.directory).st_mode & 0o777 == 0o700  # this user's alone
    fresh.close()


@pytest.mark.parametrize("why", ["other host", "resume=never", "launch without a tier"])
def test_a_stale_tier_is_cleared_and_not_read(tmp_path, monkeypatch, caplog, why):
    first, v = _tiered(tmp_path)
    first.save(3)
    first.wait()
    first.close()
    assert steps_on_disk(first.local.directory) == [3] and steps_on_disk(first.directory) == []
    if why == "other host":
        monkeypatch.setattr(local_tier, "hostname", lambda: "node-b")
    if why == "launch without a tier":  # e.g. $SLURM_TMPDIR unset on the node of a requeue
        Checkpointer(first.directory, v=v).open_local_tier()
    again, _ = _tiered(tmp_path)
    with caplog.at_level(logging.WARNING, logger="ckptkit"):
        verdict = again.open_local_tier(discard=why == "resume=never")
    assert verdict == ("mine" if why == "resume=never" else "stale")
    assert steps_on_disk(again.local.directory) == [] and again.checkpoints == []
    assert "steps 3" in caplog.text and ("node-b" in caplog.text or why != "other host")


def test_a_copy_refused_by_the_fence_publishes_nothing(tmp_path):
    taken = []

    def fence():
        if taken:
            raise RuntimeError("another launch took this run over")

    ckpt, v = _tiered(tmp_path, fence=fence, async_save=False)
    ckpt.save(1)
    taken.append(True)
    with pytest.raises(RuntimeError, match="took this run over"):
        ckpt.save(2, persist=True)
        ckpt.wait()
    assert steps_on_disk(ckpt.directory) == []
    ckpt.close()


# --- the Trainer with a local tier ------------------------------------------------------------


def test_a_finished_run_has_everything_persisted_and_an_empty_local_tier(tmp_path):
    cfg = make_cfg(
        tmp_path / "run",
        **{
            "trainer.max_steps": 40,
            "checkpoint.save_every_steps": 5,
            "checkpoint.best.metric": "score",
            "checkpoint.best.mode": "max",
            "data.score_peak": 20,  # the score is best at step 20, then worse
            "checkpoint.local_dir": str(tmp_path / "local"),
            "checkpoint.persist_every_seconds": 3600,
        },
    )
    tr = ToyTrainer(cfg)
    result = tr.fit()
    d = str(tmp_path / "run" / "checkpoints")
    assert result.best_step == 20 and result.best_checkpoint == os.path.join(d, "ckpt-20")
    assert 20 in steps_on_disk(d) and 40 in steps_on_disk(d)
    assert 35 not in steps_on_disk(d)  # a periodic save, not copied within the hour
    assert steps_on_disk(tr.checkpointer.local.directory) == []


def test_a_launch_without_the_local_tier_says_what_it_leaves_behind(tmp_path, caplog):
    """A run that crashed with steps 5-20 in its local tier only, launched again without
    checkpoint.local_dir: it starts from checkpoint.dir (empty) and says which newer steps it
    leaves behind, and how to resume from them."""
    settings = {"trainer.max_steps": 40, "trainer.eval_every_steps": None, "checkpoint.save_every_steps": 5}
    tiered = {"checkpoint.local_dir": str(tmp_path / "local"), "checkpoint.persist_every_seconds": 3600}
    tr = ToyTrainer(make_cfg(tmp_path / "run", **settings, **tiered))
    tr.build()
    inner, calls = tr._train_fn, []

    def crashing(n):
        calls.append(n)
        if len(calls) > 4:
            raise RuntimeError("the node went away")
        return inner(n)

    tr._train_fn = crashing
    with pytest.raises(RuntimeError, match="went away"):
        tr.fit()
    assert steps_on_disk(tr.checkpointer.local.directory) == [15, 20]
    with caplog.at_level(logging.WARNING, logger="ckptkit"):
        result = ToyTrainer(make_cfg(tmp_path / "run", **settings)).fit()
    assert result.resumed_from is None
    assert "saved up to step 20 in its local tier" in caplog.text
    assert f"checkpoint.local_dir={tmp_path / 'local'} to resume from it" in caplog.text


def test_auto_counts_a_copy_to_checkpoint_dir_as_part_of_its_save(tmp_path, monkeypatch):
    """save_every_seconds=auto with a local tier: a save that is copied is written, for auto,
    until its copy is recorded (the calls during the copy are measured as beside a writer),
    and the copy's time goes to TensorBoard."""
    real = local_tier.copy_checkpoint
    monkeypatch.setattr(local_tier, "copy_checkpoint", lambda *a: (time.sleep(0.4), real(*a))[1])
    written = []
    real_written = SaveBudget.save_written

    def save_written(self, step, seconds):
        written.append((step, seconds))
        return real_written(self, step, seconds)

    monkeypatch.setattr(SaveBudget, "save_written", save_written)
    tr = ToyTrainer(
        make_cfg(
            tmp_path / "run",
            **{
                "trainer.max_steps": 400,
                "trainer.eval_every_steps": None,
                "checkpoint.save_every_steps": None,
                "checkpoint.save_every_seconds": "auto",
                "checkpoint.local_dir": str(tmp_path / "local"),
                "checkpoint.persist_every_saves": 1,
            },
        )
    )
    tr.build()
    inner = tr._train_fn
    tr._train_fn = lambda n: (time.sleep(0.02), inner(n))[1]  # about 1.6 s of training
    tr.fit()
    copied = [seconds for _, seconds in written if seconds is not None and seconds >= 0.4]
    assert copied, written  # the first save's copy, measured with the save
    events = glob.glob(str(tmp_path / "run" / "logs" / "checkpoint" / "events.*"))
    tags = {v.tag for e in events for ev in tf.compat.v1.train.summary_iterator(e) for v in ev.summary.value}
    assert "checkpoint/copy_seconds" in tags


COMMON = [
    "trainer.max_steps=60",
    "trainer.steps_per_loop=1",
    "trainer.log_every_steps=2",
    "trainer.eval_every_steps=null",
    "checkpoint.save_every_steps=2",
    "checkpoint.lock_lease_seconds=1",
    "data.step_sleep=0.02",
    "trainer.deterministic=true",
]


def _tiered_run(local):
    """COMMON with a local tier: every 3rd save is copied to checkpoint.dir."""
    return [*COMMON, f"checkpoint.local_dir={local}", "checkpoint.persist_every_saves=3"]


def _killed_after(run_dir, local, step, env=None):
    """Launch, SIGKILL once the local save of ``step`` is logged; return the output."""
    proc = start(run_dir, *_tiered_run(local), env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if f"/ckpt-{step} (step {step}" in line and "saved checkpoint" in line:
            break
    proc.kill()
    out = "".join(lines) + proc.communicate(timeout=60)[0]
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    return out


@pytest.mark.slow
def test_kill_9_resumes_from_the_local_tier_and_a_requeue_elsewhere_from_the_persistent(tmp_path):
    """kill -9 after the local save of step 14: the same host resumes from it (every 3rd
    save reached checkpoint.dir: step 12 at most). Killed again at 22, a requeue on another
    node resumes from checkpoint.dir's newest; back on the first node, its tier is stale (off
    the run's line) and removed. The run ends bit-identical to one uninterrupted run without
    a local tier."""
    code, out = run(tmp_path / "straight", *COMMON)
    assert code == 0, out[-3000:]
    straight = result_of(out)
    run_dir, node_a, node_b = tmp_path / "run", tmp_path / "node-a", tmp_path / "node-b"
    d = str(run_dir / "checkpoints")
    _killed_after(run_dir, node_a, 14)
    assert max(steps_on_disk(d)) < 14
    out = _killed_after(run_dir, node_a, 22)
    assert f"resumed from {node_a}" in out and "at step 14" in out
    persisted = max(steps_on_disk(d))
    assert 14 < persisted < 22
    proc = start(run_dir, *_tiered_run(node_b), "trainer.max_steps=40", env=dict(ENV, TOY_HOST="b"))
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    assert result_of(out)["resumed_from"] == persisted and "stale" not in out  # node b's tier is fresh
    code, out = run(run_dir, *_tiered_run(node_a))
    assert code == 0, out[-3000:]
    assert "removed the stale local tier" in out and "steps 20, 22" in out
    final = result_of(out)
    assert final["resumed_from"] == 40 and final["step"] == 60
    assert (final["model"], final["optimizer"]) == (straight["model"], straight["optimizer"])


@pytest.mark.slow
@pytest.mark.parametrize("when, k", [("before", 1), ("before", 2), ("after", 2)])
def test_kill_9_in_a_copy_leaves_a_persistent_tier_another_node_resumes_from(tmp_path, when, k):
    """kill -9 inside the first copy to checkpoint.dir (temporaries written; data renamed,
    not the index; both renamed, not yet recorded): a requeue on another node finds only
    complete checkpoints there, and no temporary stays after its start."""
    run_dir = tmp_path / "run"
    d = run_dir / "checkpoints"
    proc = start(run_dir, *_tiered_run(tmp_path / "a"), env=dict(ENV, TOY_KILL_AT_COPY=f"{when}:{k}"))
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    copied = when == "after"  # the index is in place: a complete copy, not yet recorded
    assert steps_on_disk(d) == ([6] if copied else [])  # the 3rd save is the first copied
    assert any(".tmp-" in n for n in os.listdir(d)) == (not copied)
    proc = start(run_dir, *_tiered_run(tmp_path / "b"), env=dict(ENV, TOY_HOST="b"))
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    assert result_of(out)["resumed_from"] == (6 if copied else None)
    assert not [n for n in os.listdir(d) if ".tmp-" in n]


@pytest.mark.slow
def test_sigterm_copies_the_signal_save_to_checkpoint_dir_before_exiting(tmp_path, capsys):
    """With no periodic copy due (one an hour), SIGTERM's save still reaches checkpoint.dir
    before the process exits 75: a requeue on any node resumes from the step reached."""
    run_dir = tmp_path / "run"
    proc = start(run_dir, *COMMON, f"checkpoint.local_dir={tmp_path / 'a'}", "checkpoint.persist_every_seconds=3600")
    for line in proc.stdout:
        if "saved checkpoint" in line and "(step 6," in line:
            break
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, out[-3000:]
    reached = [int(line.split("step ")[1].split("/")[0]) for line in out.splitlines() if "] step " in line]
    on_disk = steps_on_disk(run_dir / "checkpoints")
    assert on_disk and on_disk[-1] >= max(reached, default=0) and on_disk[-1] >= 6
    assert "copied checkpoint" in out
    assert cli.main(["ls", str(run_dir)]) == 0  # the local tier stays for a relaunch here, and ls says so
    listed = capsys.readouterr().out
    assert f"local tier on this host, {tmp_path / 'a'}" in listed and "a relaunch here resumes" in listed


@pytest.mark.slow
def test_a_final_save_whose_copy_a_crash_cut_short_is_copied_by_the_next_launch(tmp_path):
    """kill -9 in the copy of the last save (the only copy due): the relaunch on the same node
    resumes from the local step 20, has nothing to train, and copies step 20 to
    checkpoint.dir before it removes the tier, so no node ever loses the finished run."""
    run_dir, local = tmp_path / "run", tmp_path / "a"
    args = [
        "trainer.max_steps=20",
        "trainer.eval_every_steps=null",
        "checkpoint.save_every_steps=5",
        f"checkpoint.local_dir={local}",
        "checkpoint.persist_every_seconds=3600",
    ]
    proc = start(run_dir, *args, env=dict(ENV, TOY_KILL_AT_COPY="before:1"))
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    assert steps_on_disk(run_dir / "checkpoints") == []
    code, out = run(run_dir, *args)
    assert code == 0, out[-3000:]
    assert result_of(out)["resumed_from"] == 20 and "already finished" in out
    assert steps_on_disk(run_dir / "checkpoints") == [20]
    tier = local_tier.tier_dir(str(local), str(run_dir / "checkpoints"))
    assert steps_on_disk(tier) == []


@pytest.mark.slow
def test_a_signal_right_after_a_resume_from_the_local_tier_copies_that_step_first(tmp_path):
    """Resumed from a local step that checkpoint.dir does not have, the launch is stopped by
    SIGTERM while it restores, before it trains: it exits 75 with that step in
    checkpoint.dir, so a requeue on any node resumes from it."""
    run_dir, node_a = tmp_path / "run", tmp_path / "node-a"
    _killed_after(run_dir, node_a, 14)
    assert 14 not in steps_on_disk(run_dir / "checkpoints")
    proc = start(run_dir, *_tiered_run(node_a), env=dict(ENV, TOY_PAUSE="restore:3"))
    for line in proc.stdout:
        if line.startswith("PAUSE restore"):
            proc.send_signal(signal.SIGTERM)
            break
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, out[-3000:]
    assert max(steps_on_disk(run_dir / "checkpoints")) == 14
