"""Faults and hostile input: full disk, files outside the directory, two writers, fsync
order, bad values; and a property test of retention over random saves, crashes, restarts."""

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from conftest import Net, ToyTrainer, make_cfg, small_tmpfs, steps_on_disk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptkit
from ckptkit import runlock, storage
from ckptkit.policies import KeepAny, KeepBest, KeepNewest
from ckptkit.runlock import LOCK_FILE


@pytest.mark.parametrize("async_save", [False, True])
def test_full_disk_fails_clearly_loses_nothing_and_resumes(tmp_path, async_save):
    with small_tmpfs(tmp_path / "small", "1m") as small:
        cfg = make_cfg(
            tmp_path / "run",
            **{
                "model.hidden": 256,
                "trainer.max_steps": 60,
                "trainer.eval_every_steps": None,
                "checkpoint.save_every_steps": 5,
                "checkpoint.max_to_keep": None,
                "checkpoint.async_save": async_save,
                "checkpoint.dir": str(small / "ckpts"),
            },
        )
        free = os.statvfs(small).f_bavail * os.statvfs(small).f_frsize
        (small / "filler").write_bytes(b"\0" * (free - 150_000))  # room for two or three checkpoints
        with pytest.raises(ckptkit.CheckpointSaveError) as err:
            ToyTrainer(cfg).fit()
        message = str(err.value)
        assert str(small / "ckpts") in message and "is full" in message and "bytes free" in message
        ckpts = small / "ckpts"
        on_disk = steps_on_disk(ckpts)
        assert on_disk and on_disk == [5 * (i + 1) for i in range(len(on_disk))]
        listed = [c["step"] for c in json.loads((ckpts / "metadata.json").read_text())["checkpoints"]]
        assert listed == on_disk  # the metadata describes exactly the files on disk
        for step in on_disk:  # and every one of them is complete and readable
            reader = tf.train.load_checkpoint(str(ckpts / f"ckpt-{step}"))
            for key, dtype in reader.get_variable_to_dtype_map().items():
                if dtype != tf.variant:
                    reader.get_tensor(key)
        assert not [n for n in os.listdir(ckpts) if n.endswith("_temp")]
        (small / "filler").unlink()
        result = ToyTrainer(cfg).fit()
        assert result.resumed_from == on_disk[-1] and result.step == 60


def test_only_its_own_files_are_ever_touched(tmp_path, caplog):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "ckpt-1.index").write_text("precious")
    (outside / "precious.txt").write_text("do not touch")
    before = {p.name: (p.read_text(), p.stat().st_mtime_ns) for p in outside.iterdir()}
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "checkpoint").write_text(
        f'model_checkpoint_path: "../../outside/ckpt-1"\nall_model_checkpoint_paths: "{outside}/ckpt-1"\n'
    )
    (ckpts / "metadata.json").write_text(
        json.dumps(
            {
                "checkpoints": [
                    {"step": 1, "path": "../../outside/ckpt-1"},
                    {"step": 2, "path": str(outside / "precious.txt")},
                ]
            }
        )
    )
    os.symlink(outside / "ckpt-1.index", ckpts / "ckpt-3.index")
    for name in ("notes.txt", "ckpt-best.txt", "ckpt-7.index.bak"):
        (ckpts / name).write_text("mine")
    cfg = make_cfg(
        tmp_path / "run",
        **{
            "trainer.max_steps": 20,
            "checkpoint.save_every_steps": 5,
            "checkpoint.max_to_keep": 1,
            "trainer.eval_every_steps": None,
        },
    )
    with caplog.at_level("WARNING", logger="ckptkit"):
        result = ToyTrainer(cfg).fit()
    assert result.resumed_from is None and result.step == 20  # nothing hostile was resumed from
    assert "refusing checkpoint" in caplog.text and "symbolic link" in caplog.text
    assert {p.name: (p.read_text(), p.stat().st_mtime_ns) for p in outside.iterdir()} == before
    assert os.path.islink(ckpts / "ckpt-3.index")
    assert all((ckpts / n).read_text() == "mine" for n in ("notes.txt", "ckpt-best.txt", "ckpt-7.index.bak"))
    assert steps_on_disk(ckpts) == [3, 20]  # ckpt-3 is the refused link, left alone


def test_bookkeeping_is_flushed_after_the_data(tmp_path, monkeypatch):
    events = []
    real_fsync, real_rename = storage.fsync_path, tf.io.gfile.rename
    monkeypatch.setattr(storage, "fsync_path", lambda p: (events.append(("fsync", os.path.basename(p))), real_fsync(p)))
    monkeypatch.setattr(
        tf.io.gfile,
        "rename",
        lambda a, b, overwrite=False: (
            events.append(("rename", os.path.basename(b))),
            real_rename(a, b, overwrite=overwrite),
        ),
    )
    ckpt = ckptkit.Checkpointer(str(tmp_path / "c"), async_save=True, model=Net())
    for step in (1, 2):
        ckpt.save(step)
    ckpt.wait()
    for step in (1, 2):
        data = events.index(("fsync", f"ckpt-{step}.data-00000-of-00001"))
        index = events.index(("fsync", f"ckpt-{step}.index"))
        directory = events.index(("fsync", "c"), index)
        renames = [i for i, e in enumerate(events) if e[0] == "rename" and i > directory]
        meta = next(i for i in renames if events[i][1] == "metadata.json")
        state = next(i for i in renames if events[i][1] == "checkpoint")
        assert data < directory < meta < state and index < directory
        assert events[meta - 1][0] == "fsync" and events[meta - 1][1].startswith("metadata.json.tmp-")


@pytest.mark.slow
def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(tmp_path):
    toy = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_run.py")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    slow = ["trainer.max_steps=100000", "data.step_sleep=0.01", "trainer.eval_every_steps=null"]
    first = subprocess.Popen(
        [sys.executable, toy, str(tmp_path), *slow],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not (tmp_path / LOCK_FILE).exists() and time.time() < deadline:
            time.sleep(0.05)
        started = time.time()
        second = subprocess.run(
            [sys.executable, toy, str(tmp_path), "trainer.max_steps=5"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=120,
        )
        assert second.returncode != 0
        assert f"in use by process {first.pid}" in second.stdout and "RunLockedError" in second.stdout
        assert time.time() - started < 60
    finally:
        first.kill()
        first.wait()
    assert (tmp_path / LOCK_FILE).exists()  # left behind by kill -9
    third = subprocess.run(
        [sys.executable, toy, str(tmp_path), "trainer.max_steps=5", "checkpoint.resume=never"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
    )
    assert third.returncode == 0, third.stdout[-2000:]
    assert "took over the run lock" in third.stdout and "that process is gone" in third.stdout
    assert runlock.current_claim(str(tmp_path)).released  # released at the end, the file kept


def test_bad_inputs_each_get_one_clear_message(tmp_path):
    ToyTrainer(make_cfg(tmp_path / "run", **{"trainer.max_steps": 10})).fit()
    with pytest.raises(ckptkit.ConfigError, match=r"trainer\.max_steps.*below step 10"):
        ToyTrainer(make_cfg(tmp_path / "run", **{"trainer.max_steps": 5})).fit()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ckptkit.CheckpointSaveError, match="cannot write to the run directory"):
        ToyTrainer(make_cfg(tmp_path / "a-file" / "run")).fit()
    with pytest.raises(ckptkit.CheckpointNotFoundError, match="nowhere"):
        ToyTrainer(make_cfg(tmp_path / "x", **{"checkpoint.init_from.path": str(tmp_path / "nowhere")})).fit()


def test_read_only_run_directory(tmp_path):
    with small_tmpfs(tmp_path / "ro", "1m", "ro") as ro:
        with pytest.raises(ckptkit.CheckpointSaveError, match="cannot write to the run directory"):
            ToyTrainer(make_cfg(ro / "run")).fit()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    class Exploding(ToyTrainer):
        def train_step(self, batch):
            out = super().train_step(batch)
            nan = tf.constant(float("nan"))
            return {"loss": tf.where(self.global_step >= 12, nan, out["loss"])}

    cfg = make_cfg(
        tmp_path / "run",
        **{
            "trainer.max_steps": 30,
            "trainer.steps_per_loop": 5,
            "checkpoint.save_every_steps": 5,
            "trainer.eval_every_steps": None,
        },
    )
    with pytest.raises(
        FloatingPointError,
        match=r"non-finite train metrics \(a NaN or infinite loss\) at step 13 and 2 more step\(s\) up to step 15",
    ):
        Exploding(cfg).fit()
    assert steps_on_disk(tmp_path / "run" / "checkpoints") == [5, 10]


# --- retention as a property --------------------------------------------------------------

ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("save"), st.one_of(st.none(), st.floats(0, 1), st.just(float("nan")))),
        st.tuples(st.just("crash"), st.none()),  # a save whose write never completes
        st.tuples(st.just("restart"), st.none()),  # a new process on the same directory
    ),
    min_size=1,
    max_size=14,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(actions=ACTIONS, max_to_keep=st.integers(1, 3), best_keep=st.integers(1, 2))
def test_retention_property(tmp_path_factory, actions, max_to_keep, best_keep):
    root = tmp_path_factory.mktemp("prop")
    d = root / "ckpts"
    (root / "outside.txt").write_text("untouched")
    net = Net(hidden=2)

    def open_ckpt():
        return ckptkit.Checkpointer(
            str(d),
            max_to_keep=max_to_keep,
            best_metric="m",
            best_mode="min",
            best_keep=best_keep,
            async_save=False,
            model=net,
        )

    ckpt, step, recorded = open_ckpt(), 0, {}
    policy = KeepAny((KeepNewest(max_to_keep), KeepBest("m", "min", best_keep)))
    for action, value in actions:
        step += 1
        if action == "save":
            ckpt.save(step, None if value is None else {"m": value})
            recorded[step] = value
        elif action == "crash":
            # What a kill mid-write leaves: TensorFlow's temporary shard directory, no index.
            os.makedirs(d / f"ckpt-{step}_temp", exist_ok=True)
            (d / f"ckpt-{step}_temp" / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"x")
        else:
            ckpt = open_ckpt()
        kept = policy.keep(
            [
                ckptkit.CheckpointInfo(s, f"ckpt-{s}", float(s), None if v is None else {"m": v})
                for s, v in recorded.items()
            ]
        )
        recorded = {s: v for s, v in recorded.items() if s in kept}
        if recorded:
            assert steps_on_disk(d) == sorted(kept)
            listed = json.loads((d / "metadata.json").read_text())["checkpoints"]
            assert [c["step"] for c in listed] == sorted(kept)
        finite = [(v, s) for s, v in recorded.items() if v is not None and not np.isnan(v)]
        if finite:
            assert ckpt.best is not None and ckpt.best.step == min(finite)[1]
    assert (root / "outside.txt").read_text() == "untouched"
    assert set(os.listdir(root)) <= {"ckpts", "outside.txt"}


@pytest.mark.slow
def test_the_preempted_exit_code_is_a_setting(tmp_path):
    """(issue 27, item 7) Kubernetes' ExitCode policy restarts only codes of 128 and above."""
    from procs import start

    proc = start(tmp_path, "trainer.max_steps=100000", "data.step_sleep=0.01", "trainer.exit_code_preempted=143")
    from procs import wait_for_line

    wait_for_line(proc, "training")
    time.sleep(0.5)
    proc.send_signal(15)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:]
    assert "stopped by SIGTERM at step" in out


@pytest.mark.parametrize("free", [0, 4096, 12288, 20000, 28000, 60000, 200000])
def test_every_full_disk_path_says_one_thing(tmp_path, free):
    """The whole run directory on a disk with ``free`` bytes left (issue 30): the run record,
    the run's identity, the lock, TensorBoard's event files, a save, the export. Each stops
    with one line naming the directory and the bytes free (and what one checkpoint needs once
    known, never less than what is free), leaves no temporary behind, and the run resumes
    once there is room."""
    with small_tmpfs(tmp_path / "small", "4m") as small:
        st = os.statvfs(small)
        filler = small / "filler"
        filler.write_bytes(b"\0" * max(st.f_bavail * st.f_frsize - free, 0))
        cfg = make_cfg(
            small / "run",
            **{
                "model.hidden": 64,
                "trainer.max_steps": 20,
                "trainer.eval_every_steps": None,
                "checkpoint.save_every_steps": 5,
                "export.enabled": True,
            },
        )
        with pytest.raises((ckptkit.CheckpointSaveError, ckptkit.ExportError)) as err:
            ToyTrainer(cfg).fit()
        message = str(err.value)
        assert "\n" not in message and "Op:" not in message and "function_node" not in message, message
        said = re.search(r"the disk holding (\S+) is full \((\d+) bytes free(?:, about (\d+) bytes needed)?", message)
        assert said, message
        assert said.group(1).startswith(str(small / "run")), message
        if said.group(3):
            assert int(said.group(3)) > int(said.group(2)), message
        left = [os.path.join(d, n) for d, _, names in os.walk(small / "run") for n in names if ".tmp-" in n]
        assert not left, left
        filler.unlink()
        result = ToyTrainer(cfg).fit()
        assert result.step == 20 and result.export_path
