"""Checkpointer on its own: retention, metadata, restore, Keras async saves."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from conftest import KerasListNet, KerasNet, Net, small_tmpfs, steps_on_disk, values

import ckptkit
from ckptkit import metadata


def _files(directory):
    return sorted(f for f in os.listdir(directory) if f.startswith("ckpt-"))


@pytest.mark.parametrize("async_save", [False, True])
def test_newest_two_plus_best_survive(tmp_path, async_save):
    d = str(tmp_path / "ckpts")
    net = Net()
    step = tf.Variable(0, dtype=tf.int64)
    ckpt = ckptkit.Checkpointer(
        d, max_to_keep=2, best_metric="loss", best_mode="min", async_save=async_save, model=net, step=step
    )
    losses = {5: 0.9, 10: 0.2, 15: 0.5, 20: 0.6, 25: 0.7, 30: float("nan")}
    for s, loss in losses.items():
        step.assign(s)
        ckpt.save(s, metrics={"loss": loss})
    ckpt.wait()
    assert steps_on_disk(d) == [10, 25, 30]
    doc = json.load(open(os.path.join(d, metadata.METADATA_FILE)))
    assert [c["step"] for c in doc["checkpoints"]] == [10, 25, 30]
    assert doc["best"] == [10] and doc["latest"] == 30
    assert doc["checkpoints"][-1]["metrics"]["loss"] is None  # NaN stored as null, never best
    assert all(c["size"] > 0 for c in doc["checkpoints"])
    assert ckpt.best.step == 10
    assert tf.train.latest_checkpoint(d).endswith("ckpt-30")
    state = tf.train.get_checkpoint_state(d)
    assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == ["ckpt-10", "ckpt-25", "ckpt-30"]


def test_best_survives_a_restart(tmp_path):
    d = str(tmp_path / "ckpts")
    net = Net()
    first = ckptkit.Checkpointer(d, max_to_keep=1, best_metric="acc", best_mode="max", async_save=False, model=net)
    first.save(1, {"acc": 0.9})
    first.save(2, {"acc": 0.5})
    again = ckptkit.Checkpointer(d, max_to_keep=1, best_metric="acc", best_mode="max", async_save=False, model=net)
    assert again.best.step == 1
    for s in (3, 4, 5):
        again.save(s, {"acc": 0.1})
    assert steps_on_disk(d) == [1, 5]
    assert again.restore_best() == 1


def test_restore_latest_and_best_values(tmp_path):
    d = str(tmp_path / "ckpts")
    net = Net()
    ckpt = ckptkit.Checkpointer(d, max_to_keep=3, best_metric="loss", async_save=True, model=net)
    assert ckpt.restore_latest() is None and ckpt.restore_best() is None
    saved = {}
    for s, loss in ((1, 0.1), (2, 0.5)):
        for v in net.trainable_variables:
            v.assign_add(tf.ones_like(v))
        ckpt.save(s, {"loss": loss})
        saved[s] = values(net.trainable_variables)
    ckpt.wait()
    fresh = Net(seed=42)
    other = ckptkit.Checkpointer(d, max_to_keep=3, best_metric="loss", model=fresh)
    assert other.restore_latest() == 2
    for a, b in zip(values(fresh.trainable_variables), saved[2], strict=True):
        np.testing.assert_array_equal(a, b)
    assert other.restore_best() == 1
    for a, b in zip(values(fresh.trainable_variables), saved[1], strict=True):
        np.testing.assert_array_equal(a, b)


def test_keras_model_async_saves_twice_and_restores_exactly(tmp_path):
    """Regression: Keras 3 variables broke TensorFlow's second async save (ckptkit._compat)."""
    d = str(tmp_path / "ckpts")
    model = KerasNet()
    model(tf.zeros([1, 4]))
    opt = tf.keras.optimizers.Adam(0.1)
    opt.build(model.trainable_variables)
    ckpt = ckptkit.Checkpointer(d, async_save=True, model=model, optimizer=opt)
    for s in (1, 2, 3):
        for v in model.trainable_variables:
            v.assign(v + 1.0)
        ckpt.save(s)
    ckpt.wait()
    want = values(model.variables)
    assert steps_on_disk(d) == [1, 2, 3]
    model2 = KerasNet()
    model2(tf.zeros([1, 4]))
    restored = ckptkit.Checkpointer(d, model=model2, optimizer=tf.keras.optimizers.Adam(0.1))
    assert restored.restore_latest() == 3
    for a, b in zip(values(model2.variables), want, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", ["sync", "async", "worker"])
def test_saves_never_wait_on_other_threads_executors(tmp_path, monkeypatch, kind):
    """Regression: TensorFlow's Checkpoint.write calls context.async_wait(), which waits on
    every thread's executor through raw pointers; a tf.py_function call running meanwhile
    (in train_step, in a tf.data map) frees its executor, and the process aborted with
    abseil's "Mutex corrupt" (ckptkit._compat.patch_async_wait). ckptkit's saves wait for
    their own thread's executor only: TensorFlow's SyncExecutors is never called, in the
    training thread or in the background save thread."""
    from tensorflow.python.eager import context

    calls = []
    real = context.Context.sync_executors

    def spy(self):
        calls.append(__import__("threading").current_thread().name)
        return real(self)

    monkeypatch.setattr(context.Context, "sync_executors", spy)
    v = tf.Variable(tf.zeros([64]))
    plain = tf.train.Checkpoint(v=v)  # the control: TensorFlow's own write syncs them all
    plain.write(str(tmp_path / "plain" / "c"), options=tf.train.CheckpointOptions(enable_async=kind != "sync"))
    plain.sync()
    assert calls, "the spy saw no SyncExecutors call from tf.train.Checkpoint.write"
    calls.clear()
    worker_dir = str(tmp_path / "worker") if kind == "worker" else None
    ckpt = ckptkit.Checkpointer(str(tmp_path / "ckpts"), async_save=kind != "sync", worker_dir=worker_dir, v=v)
    for step in (1, 2, 3):
        v.assign_add(tf.ones([64]))
        ckpt.save(step)
    ckpt.wait()
    ckpt.close()
    assert calls == []
    if kind != "worker":
        assert steps_on_disk(str(tmp_path / "ckpts")) == [1, 2, 3]


def test_metadata_follows_the_files_on_disk(tmp_path):
    d = str(tmp_path / "ckpts")
    net = Net()
    ckpt = ckptkit.Checkpointer(d, max_to_keep=5, async_save=False, model=net)
    for s in (1, 2, 3):
        ckpt.save(s, {"loss": float(s)})
    for f in os.listdir(d):
        if f.startswith("ckpt-2."):
            os.remove(os.path.join(d, f))
    tf.train.Checkpoint(model=net).write(os.path.join(d, "ckpt-7"))  # no metadata entry
    again = ckptkit.Checkpointer(d, max_to_keep=5, model=net)
    assert [c.step for c in again.checkpoints] == [1, 3, 7]
    assert again.checkpoints[-1].metrics is None
    assert again.checkpoints[0].metrics == {"loss": 1.0}


def test_unreadable_metadata_is_reported_and_ignored(tmp_path, caplog):
    d = str(tmp_path / "ckpts")
    net = Net()
    ckptkit.Checkpointer(d, async_save=False, model=net).save(4, {"loss": 1.0})
    with open(os.path.join(d, metadata.METADATA_FILE), "w") as f:
        f.write("{not json")
    with caplog.at_level("WARNING", logger="ckptkit"):
        again = ckptkit.Checkpointer(d, model=net)
    assert [c.step for c in again.checkpoints] == [4]
    assert metadata.METADATA_FILE in caplog.text


def test_restore_into_another_model_names_the_checkpoint(tmp_path):
    d = str(tmp_path / "ckpts")
    ckptkit.Checkpointer(d, async_save=False, model=Net(hidden=8)).save(1)
    other = ckptkit.Checkpointer(d, model=Net(hidden=5))
    with pytest.raises(ckptkit.CheckpointMismatchError, match="ckpt-1"):
        other.restore_latest()


def test_same_step_saved_twice_updates_metrics_only(tmp_path):
    d = str(tmp_path / "ckpts")
    ckpt = ckptkit.Checkpointer(d, async_save=True, model=Net())
    p1 = ckpt.save(3)
    p2 = ckpt.save(3, {"loss": 0.25})
    ckpt.wait()
    assert p1 == p2 and ckpt.latest.metrics == {"loss": 0.25}
    assert _files(d) == ["ckpt-3.data-00000-of-00001", "ckpt-3.index"]


@pytest.mark.parametrize("async_save", [False, True])
def test_write_error_is_raised_with_the_path(tmp_path, async_save):
    """A failed write (here: the filesystem has no inode left for TensorFlow's temporary
    shard directory) raises CheckpointSaveError naming the checkpoint, in the training
    thread, and the earlier checkpoint stays listed and restorable."""
    with small_tmpfs(tmp_path / "fs", "8m", "nr_inodes=64") as fs:
        d = fs / "ckpts"
        net = Net()
        ckpt = ckptkit.Checkpointer(str(d), async_save=async_save, model=net)
        ckpt.save(1)
        ckpt.wait()
        fillers = []
        with pytest.raises(OSError):
            for i in range(100):
                fillers.append(fs / f"filler-{i}")
                fillers[-1].write_text("")
        with pytest.raises(ckptkit.CheckpointSaveError, match="ckpt-2"):
            ckpt.save(2)
            ckpt.wait()
        assert steps_on_disk(str(d)) == [1]
        assert [c.step for c in ckpt.checkpoints] == [1]
        assert tf.train.latest_checkpoint(str(d)).endswith("ckpt-1")
        for f in fillers[:20]:
            f.unlink(missing_ok=True)
        ckpt.save(3)  # the checkpointer is usable again
        ckpt.wait()
        assert steps_on_disk(str(d)) == [1, 3]


def test_constructor_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="max_to_keep"):
        ckptkit.Checkpointer(str(tmp_path), max_to_keep=0, model=Net())
    with pytest.raises(ValueError, match="best_mode"):
        ckptkit.Checkpointer(str(tmp_path), best_mode="median", model=Net())
    with pytest.raises(ValueError, match="trackable"):
        ckptkit.Checkpointer(str(tmp_path))


def _iterator_and_ds():
    ds = tf.data.Dataset.range(100).shuffle(10, seed=3).batch(4).repeat()
    return ds, iter(ds)


@pytest.mark.parametrize("async_save", [False, True])
def test_iterator_position_is_saved_at_save_time_and_saving_does_not_disturb_it(tmp_path, async_save):
    """An async save must neither change what the live iterator yields afterwards (TF's own
    async copy did, see ckptkit/iterator_state.py) nor record a later position."""
    _, reference = _iterator_and_ds()
    expected = [next(reference).numpy().tolist() for _ in range(40)]
    _, it = _iterator_and_ds()
    ckpt = ckptkit.Checkpointer(str(tmp_path), async_save=async_save, max_to_keep=None, data=it, step=tf.Variable(0))
    seen = []
    for i in range(40):
        if i in (5, 17, 30):
            ckpt.save(i)
        seen.append(next(it).numpy().tolist())
    ckpt.wait()
    assert seen == expected
    for step in (5, 17, 30):
        _, fresh = _iterator_and_ds()
        ckptkit.Checkpointer(str(tmp_path), data=fresh, step=tf.Variable(0)).restore(
            os.path.join(str(tmp_path), f"ckpt-{step}"), assert_consumed=True
        )
        assert next(fresh).numpy().tolist() == expected[step]


def test_iterator_keys_match_tensorflows_own(tmp_path):
    _, it = _iterator_and_ds()
    ckptkit.Checkpointer(str(tmp_path / "a"), async_save=False, data=it).save(1)
    tf.train.Checkpoint(data=it).write(str(tmp_path / "b" / "ckpt-1"))
    ours = {k for k, _ in tf.train.list_variables(str(tmp_path / "a" / "ckpt-1"))}
    theirs = {k for k, _ in tf.train.list_variables(str(tmp_path / "b" / "ckpt-1"))}
    assert "data/.ATTRIBUTES/ITERATOR_STATE" in ours
    assert theirs <= ours | {"save_counter/.ATTRIBUTES/VARIABLE_VALUE"}


def test_keras_layers_in_lists_and_dropout_state_are_in_a_model_only_restore(tmp_path):
    """Regression: Keras 3 hides list-held layers and seed generators from tf.train.Checkpoint,
    so a model-only restore skipped them silently (ckptkit._compat)."""
    model = KerasListNet()
    model(tf.zeros([2, 4]), training=True)
    for v in model.variables:
        v.assign(v + 1)
    opt = tf.keras.optimizers.Adam(0.1)
    opt.build(model.trainable_variables)
    ckpt = ckptkit.Checkpointer(str(tmp_path), async_save=False, model=model, optimizer=opt)
    ckpt.save(1)
    keys = {k for k, _ in tf.train.list_variables(str(tmp_path / "ckpt-1"))}
    assert "model/drop/_seed_generators/0/.ATTRIBUTES/VARIABLE_VALUE" in keys
    fresh = KerasListNet()
    fresh(tf.zeros([2, 4]), training=True)
    status = tf.train.Checkpoint(model=fresh).read(str(tmp_path / "ckpt-1"))
    status.assert_existing_objects_matched()
    status.expect_partial()
    assert len(fresh.variables) == len(model.variables) == 7
    for a, b in zip(values(fresh.variables), values(model.variables), strict=True):
        np.testing.assert_array_equal(a, b)


def test_twenty_saves_keep_newest_three_and_best_two(tmp_path):
    d = str(tmp_path / "ckpts")
    rng = np.random.default_rng(7)
    losses = {s: float(v) for s, v in zip(range(1, 21), rng.uniform(0, 1, 20), strict=True)}
    losses[4] = float("nan")
    ckpt = ckptkit.Checkpointer(
        d, max_to_keep=3, best_metric="loss", best_mode="min", best_keep=2, async_save=True, model=Net()
    )
    for s, loss in losses.items():
        ckpt.save(s, {"loss": loss})
    ckpt.wait()
    finite = sorted((v, s) for s, v in losses.items() if not np.isnan(v))
    expected = {18, 19, 20} | {s for _, s in finite[:2]}
    assert set(steps_on_disk(d)) == expected
    doc = json.load(open(os.path.join(d, metadata.METADATA_FILE)))
    assert {c["step"] for c in doc["checkpoints"]} == expected
    assert doc["best"] == [s for _, s in finite[:2]]
    assert all(c["blocking_seconds"] is not None and c["save_seconds"] > 0 for c in doc["checkpoints"])


@pytest.mark.parametrize("async_save", [False, True])
def test_bookkeeping_points_only_at_complete_checkpoints(tmp_path, monkeypatch, async_save):
    """Every time the metadata or the state file is written, each checkpoint it lists is
    complete on disk and every one of its tensors reads back."""
    d = str(tmp_path / "ckpts")
    calls = []

    def complete(checkpoints):
        for c in checkpoints:
            reader = tf.train.load_checkpoint(c.path)
            for key in reader.get_variable_to_shape_map():
                reader.get_tensor(key)
        calls.append(sorted(c.step for c in checkpoints))

    real_meta, real_state = metadata.write_metadata, metadata.write_state_file

    def spy_meta(directory, checkpoints, **kw):
        complete(checkpoints)
        real_meta(directory, checkpoints, **kw)

    def spy_state(directory, checkpoints):
        complete(checkpoints)
        real_state(directory, checkpoints)

    monkeypatch.setattr(metadata, "write_metadata", spy_meta)
    monkeypatch.setattr(metadata, "write_state_file", spy_state)
    big = tf.Variable(tf.random.normal([1024, 1024]))  # 4 MB: the write takes a while
    ckpt = ckptkit.Checkpointer(d, max_to_keep=2, async_save=async_save, model=Net(), big=big)
    for s in range(1, 7):
        big.assign_add(tf.ones_like(big))
        ckpt.save(s)
        if async_save and s == 1:
            # Right after save() returns the write is still in flight: nothing lists it yet.
            assert calls == [] or calls[-1] == [1]
    ckpt.wait()
    assert calls[-1] == [5, 6] and len(calls) == 12
    # The kept checkpoints hold the values of their own step, not a later one.
    reader = tf.train.load_checkpoint(os.path.join(d, "ckpt-5"))
    key = [k for k in reader.get_variable_to_shape_map() if k.startswith("big/")][0]
    np.testing.assert_allclose(reader.get_tensor(key), big.numpy() - 1.0)


def test_cli_help_and_ls_do_not_import_tensorflow(tmp_path):
    """`ckptkit --help` and `ckptkit ls` answer at once: TensorFlow (seconds to import) is
    imported only by commands that read tensors."""
    ckpt = ckptkit.Checkpointer(str(tmp_path / "run" / "checkpoints"), v=tf.Variable(1.0), async_save=False)
    ckpt.save(7, metrics={"loss": 0.5})
    script = (
        "import sys, contextlib, io\n"
        "from ckptkit import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        "        cli.main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "code = cli.main(['ls', sys.argv[1]])\n"
        "print('TF', 'tensorflow' in sys.modules, 'CODE', code)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(tmp_path),
    )
    assert "TF False CODE 0" in out.stdout, out.stdout + out.stderr
    assert "7 " in out.stdout and "loss=0.5" in out.stdout, out.stdout
