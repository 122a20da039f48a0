"""The data position is a position (issue 28): no examples inside checkpoints, an exact resume
over unchanged data, and a resume that notices changed data and never trains on examples
that are gone.

The trainer here reads its examples from a file, as users' do: each example has an id, a
version and a 400 kB payload; it counts, outside the checkpoint, which ids and versions each
launch trained on and in which order.
"""

from __future__ import annotations

import glob
import logging
import os

import numpy as np
import pytest
import tensorflow as tf
from conftest import make_cfg

import ckptkit
from ckptkit import data_position, metadata

WIDTH = 100_000  # 400 kB of float32 per example
BATCH = 16


def write_data(path, ids, version=1, width=WIDTH):
    ids = np.asarray(ids, dtype=np.int32)
    rng = np.random.default_rng(int(ids.sum()) + version)
    payload = rng.normal(size=(len(ids), width)).astype(np.float32)
    np.savez(path, ids=ids, versions=np.full(len(ids), version, np.int32), payload=payload)


class FileTrainer(ckptkit.Trainer):
    """About 100 weights trained on examples read from ``data.path`` (an .npz)."""

    def build_model(self):
        steps = self.cfg.trainer.max_steps + 2
        self.seen = tf.Variable(tf.zeros([256], tf.int32), trainable=False)  # per id, this launch
        self.newest_version = tf.Variable(tf.zeros([256], tf.int32), trainable=False)
        self.order = tf.Variable(tf.fill([steps, BATCH], -1), trainable=False)  # ids by step
        module = tf.Module()
        module.w = tf.Variable(tf.zeros([100]), name="w")
        return module

    def build_optimizer(self):
        return tf.keras.optimizers.SGD(0.01)

    def train_dataset(self):
        d = self.cfg.data
        with np.load(d.path) as f:
            ids, versions, payload = f["ids"], f["versions"], f["payload"]
        ds = tf.data.Dataset.from_tensor_slices({"id": ids, "version": versions, "x": payload})
        if d.shuffle == "global":
            ds = ckptkit.data.shuffle(ds, seed=3)
        else:
            ds = ds.shuffle(d.buffer, seed=3)
        ds = ds.map(lambda e: {**e, "x": e["x"] * 0.5}, num_parallel_calls=2)
        return ds.batch(BATCH, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    def train_step(self, batch):
        ids = batch["id"]
        self.seen.scatter_nd_add(ids[:, None], tf.ones_like(ids))
        self.newest_version.scatter_nd_max(ids[:, None], batch["version"])
        self.order.scatter_nd_update([[self.global_step]], [ids])
        with tf.GradientTape() as tape:
            pred = tf.reduce_sum(batch["x"][:, :100] * self.model.w, axis=1)
            loss = tf.reduce_mean(tf.square(pred - tf.cast(ids, tf.float32) / 100.0))
        self.optimizer.apply_gradients([(tape.gradient(loss, self.model.w), self.model.w)])
        return {"loss": loss}


def cfg_for(tmp_path, steps, data, **over):
    return make_cfg(
        tmp_path / "run",
        **{
            "trainer.max_steps": steps,
            "trainer.steps_per_loop": 1,
            "trainer.eval_every_steps": None,
            "trainer.log_every_steps": 100,
            "checkpoint.save_every_steps": 3,
            "data.path": str(data),
            "data.shuffle": "global",
            "data.buffer": 96,
            **over,
        },
    )


def launch(cfg):
    trainer = FileTrainer(cfg)
    result = trainer.fit()
    return trainer, result


def checkpoint_data_bytes(run):
    newest = metadata.scan(str(run / "checkpoints"))[-1]
    return sum(os.path.getsize(f) for f in glob.glob(newest.path + ".data-*"))


@pytest.mark.slow
def test_large_examples_stay_out_of_checkpoints_and_the_resume_is_exact(tmp_path, caplog):
    data = tmp_path / "examples.npz"
    write_data(data, range(96))
    whole, whole_result = launch(cfg_for(tmp_path / "a", 20, data))
    with caplog.at_level(logging.INFO, logger="ckptkit"):
        first, _ = launch(cfg_for(tmp_path / "b", 9, data))  # stops mid-epoch (6 batches an epoch)
    assert "saved symbolically" in caplog.text
    position = [r.getMessage() for r in caplog.records if "kB in each checkpoint" in r.getMessage()]
    assert position and float(position[0].split()[2]) <= 4.0, position
    # 100 weights, 100 SGD slots... and a few kB of position: never the 6.4 MB batches in flight
    assert checkpoint_data_bytes(tmp_path / "b" / "run") < 8_000
    second, result = launch(cfg_for(tmp_path / "b", 20, data))
    assert result.resumed_from == 9
    np.testing.assert_array_equal(second.order.numpy()[9:20], whole.order.numpy()[9:20])
    np.testing.assert_array_equal(first.order.numpy()[:9], whole.order.numpy()[:9])
    np.testing.assert_array_equal(second.model.w.numpy(), whole.model.w.numpy())  # bit for bit


@pytest.mark.slow
@pytest.mark.parametrize(
    "change, ids, version, words",
    [
        ("shrink", range(40), 1, "source elements 96 -> 40"),
        ("grow", range(200), 1, "source elements 96 -> 200"),
        ("rewrite", range(96), 2, "the first 4 elements differ"),
        ("reorder", list(reversed(range(96))), 1, "the first 4 elements differ"),
    ],
)
def test_changed_data_is_noticed_and_nothing_gone_is_trained(tmp_path, caplog, change, ids, version, words):
    data = tmp_path / "examples.npz"
    write_data(data, range(96), width=256)
    launch(cfg_for(tmp_path, 8, data))  # stopped mid-epoch
    write_data(data, ids, version=version, width=256)
    with caplog.at_level(logging.WARNING, logger="ckptkit"):
        trainer, result = launch(cfg_for(tmp_path, 14, data))
    assert result.resumed_from == 8
    assert "the training data changed since" in caplog.text and words in caplog.text, caplog.text
    assert "data position started afresh" in caplog.text
    seen = trainer.seen.numpy()
    trained = set(np.nonzero(seen)[0].tolist())
    assert trained and trained <= set(ids)  # no example that is gone
    assert set(np.unique(trainer.newest_version.numpy()[list(trained)])) == {version}  # never the old payload
    epochs = -(-(result.step - result.resumed_from) // (len(ids) // BATCH))
    assert seen.max() <= epochs  # a fresh order: no example twice within an epoch


@pytest.mark.slow
def test_a_data_change_can_be_refused(tmp_path):
    data = tmp_path / "examples.npz"
    write_data(data, range(96), width=256)
    launch(cfg_for(tmp_path, 6, data))
    write_data(data, range(50), width=256)
    with pytest.raises(
        ckptkit.DataPipelineError,
        match=r"(?s)nothing was trained.*\n  source elements 96 -> 50\n  elements per pass 6 -> 3",
    ):
        launch(cfg_for(tmp_path, 12, data, **{"checkpoint.on_data_change": "error"}))
    assert max(s for s in [c.step for c in metadata.scan(str(tmp_path / "run" / "checkpoints"))]) == 6


@pytest.mark.slow
@pytest.mark.parametrize(
    "over, old, new",
    [
        ({"data.buffer": 8}, "shuffle(buffer_size=96", "shuffle(buffer_size=8"),
        ({"data.shuffle": "global"}, "shuffle(buffer_size=96", "global_shuffle"),
    ],
)
def test_a_changed_pipeline_is_one_error_before_training_and_restart_keeps_the_weights(
    tmp_path, caplog, over, old, new
):
    data = tmp_path / "examples.npz"
    write_data(data, range(96), width=256)
    launch(cfg_for(tmp_path, 6, data, **{"data.shuffle": "buffer"}))
    changed = cfg_for(tmp_path, 12, data, **{"data.shuffle": "buffer", **over})
    with pytest.raises(ckptkit.DataPipelineError) as err:
        launch(changed)
    message = str(err.value)
    assert old in message and new in message and "checkpoint.on_data_change=restart" in message
    assert "nothing was trained" in message.splitlines()[0]
    changed["checkpoint"]["on_data_change"] = "restart"
    with caplog.at_level(logging.WARNING, logger="ckptkit"):
        trainer, result = launch(changed)
    assert result.resumed_from == 6 and result.step == 12
    assert "data position started afresh" in caplog.text


def test_records_compare_pipeline_and_content_apart():
    base = data_position.DataRecord(96, "spec", ("batch(batch_size=16)", "tensor_slice"), "aa", 4)
    assert data_position.changes(base, base) == ([], [])
    grown = data_position.DataRecord(100, "spec", base.pipeline, "bb", 4)
    assert data_position.changes(base, grown) == ([], ["elements per pass 96 -> 100", "the first 4 elements differ"])
    rebatched = data_position.DataRecord(96, "spec", ("batch(batch_size=32)", "tensor_slice"), "cc", 4)
    pipeline, content = data_position.changes(base, rebatched)
    assert pipeline == ["pipeline batch(batch_size=16) -> batch(batch_size=32)"] and content == []
    assert data_position.DataRecord.from_json(base.to_json()) == base
    for bad in (None, [], {"cardinality": "x"}, {**base.to_json(), "pipeline": [1]}):
        assert data_position.DataRecord.from_json(bad) is None


def test_symbolic_checkpointing_is_chosen_per_pipeline():
    ds = tf.data.Dataset.range(10)
    on, symbolic = data_position.prepare(ckptkit.data.shuffle(ds, seed=1).batch(2).prefetch(1))
    assert symbolic and on.options().experimental_symbolic_checkpoint
    assert data_position.buffer_report(on, symbolic) == []
    off, symbolic = data_position.prepare(ds.shuffle(10, seed=1).batch(2).prefetch(2))
    assert not symbolic
    report = data_position.buffer_report(off, symbolic)
    assert "shuffle holds up to 10 elements of 8 B (80 B)" in report
    assert any(r.startswith("prefetch holds up to 2 elements") for r in report)
    kept, symbolic = data_position.prepare(ds.batch(2), resumed_symbolic=False)  # a run keeps its way
    assert not symbolic
