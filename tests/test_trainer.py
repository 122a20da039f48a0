"""The Trainer end to end on a toy model: resume, retention, warm start, errors."""

import os
import threading

import numpy as np
import pytest
import tensorflow as tf
from conftest import ToyTrainer, make_cfg, steps_on_disk, values

import ckptkit


@pytest.mark.parametrize("kind", ["module", "keras", "keras_list"])
def test_resume_restores_everything_and_continues(toy_cfg, kind):
    first = ToyTrainer(toy_cfg(**{"model.kind": kind, "trainer.max_steps": 10}))
    r1 = first.fit()
    assert r1.step == 10 and r1.steps_run == 10 and r1.resumed_from is None
    saved_model = values(first.model.variables)
    saved_slots = values(first.optimizer.variables)
    assert len(saved_slots) > 2  # iterations, learning rate and the Adam moments

    # Launched again with the same max_steps: restores, trains nothing, says so.
    again = ToyTrainer(toy_cfg(**{"model.kind": kind, "trainer.max_steps": 10}))
    r2 = again.fit()
    assert r2.resumed_from == 10 and r2.steps_run == 0 and r2.step == 10
    assert int(again.global_step.numpy()) == 10
    for a, b in zip(values(again.model.variables), saved_model, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(values(again.optimizer.variables), saved_slots, strict=True):
        np.testing.assert_array_equal(a, b)

    # With a larger max_steps it continues to it, from the same data position.
    cont = ToyTrainer(toy_cfg(**{"model.kind": kind, "trainer.max_steps": 20}))
    r3 = cont.fit()
    assert r3.resumed_from == 10 and r3.steps_run == 10 and r3.step == 20
    assert int(cont.optimizer.iterations.numpy()) == 20


@pytest.mark.parametrize("kind", ["module", "keras_list"])
def test_resumed_run_matches_an_uninterrupted_one(tmp_path, kind):
    """Mid-epoch (7 of 6-batch epochs), shuffled data, async saves; with Dropout for Keras."""
    from conftest import make_cfg

    kw = {"trainer.eval_every_steps": None, "model.kind": kind}
    straight = ToyTrainer(make_cfg(tmp_path / "a", **{"trainer.max_steps": 20, **kw}))
    straight.fit()
    ToyTrainer(make_cfg(tmp_path / "b", **{"trainer.max_steps": 7, **kw})).fit()
    resumed = ToyTrainer(make_cfg(tmp_path / "b", **{"trainer.max_steps": 20, **kw}))
    resumed.fit()
    # Same batches in the same order (the data iterator was restored mid-epoch): the
    # weights agree far below what one different batch would change.
    for a, b in zip(values(resumed.model.variables), values(straight.model.variables), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_newest_two_plus_best_are_kept(toy_cfg):
    cfg = toy_cfg(
        **{
            "trainer.max_steps": 30,
            "trainer.eval_every_steps": 5,
            "checkpoint.save_every_steps": 5,
            "checkpoint.max_to_keep": 2,
            "checkpoint.best.metric": "score",
            "checkpoint.best.mode": "max",
            "data.score_peak": 10,
        }
    )
    result = ToyTrainer(cfg).fit()
    ckpt_dir = os.path.join(cfg["run_dir"], "checkpoints")
    assert steps_on_disk(ckpt_dir) == [10, 25, 30]
    assert result.best_step == 10 and result.best_metric == 0.0
    assert result.best_checkpoint.endswith("ckpt-10")


def test_best_save_happens_between_periodic_saves(toy_cfg):
    cfg = toy_cfg(
        **{
            "trainer.max_steps": 20,
            "trainer.eval_every_steps": 5,
            "checkpoint.save_every_steps": 20,
            "checkpoint.max_to_keep": 1,
            "checkpoint.best.metric": "score",
            "checkpoint.best.mode": "max",
            "data.score_peak": 15,
        }
    )
    ToyTrainer(cfg).fit()
    assert steps_on_disk(os.path.join(cfg["run_dir"], "checkpoints")) == [15, 20]


def test_warm_start_restores_backbone_and_keeps_new_head_fresh(tmp_path, caplog):
    from conftest import make_cfg

    source = ToyTrainer(make_cfg(tmp_path / "src", **{"trainer.max_steps": 10}))
    source.fit()
    src_backbone = values([source.model.backbone.w, source.model.backbone.b])
    src_head_w = source.model.head.w.numpy()

    cfg = make_cfg(
        tmp_path / "dst",
        **{
            "trainer.max_steps": 5,
            "optim.lr": 0.0,  # lr 0: the weights stay as restored
            "model.classes": 5,
            "model.seed": 7,
            "checkpoint.init_from.path": str(tmp_path / "src"),
            "checkpoint.init_from.exclude": ["model/head/*"],
        },
    )
    with caplog.at_level("INFO", logger="ckptkit"):
        target = ToyTrainer(cfg)
        result = target.fit()
    for a, b in zip(values([target.model.backbone.w, target.model.backbone.b]), src_backbone, strict=True):
        np.testing.assert_array_equal(a, b)
    fresh_head = tf.random.stateless_normal([8, 5], seed=[8, 0]).numpy() * 0.5
    np.testing.assert_array_equal(target.model.head.w.numpy(), fresh_head)
    assert target.model.head.w.shape != src_head_w.shape
    report = result.warm_start
    assert report.restored == ["model/backbone/b", "model/backbone/w"]
    assert report.skipped_by_selection == ["model/head/b", "model/head/w"]
    assert "restored: model/backbone/b, model/backbone/w" in caplog.text
    assert "skipped by selection (kept fresh): model/head/b, model/head/w" in caplog.text


def test_warm_start_strict_lists_every_mismatch(tmp_path):
    from conftest import make_cfg

    ToyTrainer(make_cfg(tmp_path / "src", **{"trainer.max_steps": 5})).fit()
    strict = make_cfg(tmp_path / "dst", **{"model.classes": 5, "checkpoint.init_from.path": str(tmp_path / "src")})
    with pytest.raises(ckptkit.CheckpointMismatchError) as err:
        ToyTrainer(strict).fit()
    assert "model/head/w" in str(err.value) and "model/head/b" in str(err.value)
    assert "[8, 3]" in str(err.value) and "[8, 5]" in str(err.value)
    assert not os.path.exists(os.path.join(tmp_path / "dst", "checkpoints", "ckpt-20.index"))

    loose = make_cfg(
        tmp_path / "dst2",
        **{
            "model.classes": 5,
            "trainer.max_steps": 5,
            "optim.lr": 0.0,
            "checkpoint.init_from.path": str(tmp_path / "src"),
            "checkpoint.init_from.strict": False,
        },
    )
    result = ToyTrainer(loose).fit()
    assert result.warm_start.restored == ["model/backbone/b", "model/backbone/w"]
    assert [p for p, _ in result.warm_start.mismatched] == ["model/head/b", "model/head/w"]


def test_resumed_run_ignores_init_from(tmp_path, caplog):
    from conftest import make_cfg

    ToyTrainer(make_cfg(tmp_path / "src", **{"trainer.max_steps": 5})).fit()
    cfg = make_cfg(tmp_path / "dst", **{"trainer.max_steps": 5})
    ToyTrainer(cfg).fit()
    cfg["checkpoint"]["init_from"] = {"path": str(tmp_path / "src")}
    with caplog.at_level("INFO", logger="ckptkit"):
        result = ToyTrainer(cfg).fit()
    assert result.resumed_from == 5 and result.warm_start is None
    assert "init_from.path ignored" in caplog.text


def test_resume_must_without_checkpoint_fails(toy_cfg):
    with pytest.raises(ckptkit.CheckpointNotFoundError, match="resume=must"):
        ToyTrainer(toy_cfg(**{"checkpoint.resume": "must"})).fit()


def test_resume_never_moves_old_checkpoints_aside(toy_cfg, tmp_path):
    ToyTrainer(toy_cfg(**{"trainer.max_steps": 5})).fit()
    result = ToyTrainer(toy_cfg(**{"trainer.max_steps": 5, "checkpoint.resume": "never"})).fit()
    assert result.resumed_from is None and result.steps_run == 5
    moved = [d for d in os.listdir(tmp_path / "run") if d.startswith("checkpoints-moved-")]
    assert len(moved) == 1
    assert steps_on_disk(str(tmp_path / "run" / moved[0])) == [5]


def test_best_metric_missing_from_eval_names_the_available_ones(toy_cfg):
    with pytest.raises(ckptkit.ConfigError, match="accuracy"):
        ToyTrainer(toy_cfg(**{"checkpoint.best.metric": "f1"})).fit()


def test_best_metric_without_eval_dataset_is_an_error(toy_cfg):
    with pytest.raises(ckptkit.ConfigError, match="eval_dataset"):
        ToyTrainer(toy_cfg(**{"checkpoint.best.metric": "accuracy", "data.eval": False})).fit()


def test_tensorboard_scalars_are_written(toy_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ToyTrainer(toy_cfg(**{"trainer.max_steps": 20})).fit()
    train = EventAccumulator(str(tmp_path / "run" / "logs" / "train"), size_guidance={"tensors": 0})
    train.Reload()
    assert [e.step for e in train.Tensors("loss")] == [10, 20]
    evals = EventAccumulator(str(tmp_path / "run" / "logs" / "eval"), size_guidance={"tensors": 0})
    evals.Reload()
    assert [e.step for e in evals.Tensors("accuracy")] == [10, 20]


def test_train_step_must_return_a_dict(toy_cfg):
    class Bad(ToyTrainer):
        def train_step(self, batch):
            return super().train_step(batch)["loss"]

    with pytest.raises(ckptkit.HookError, match=r"train_step\(\) returned a tensor; return a dict"):
        Bad(toy_cfg()).fit()


def test_warm_start_reaches_keras_layers_held_in_a_list(tmp_path):
    from conftest import make_cfg

    source = ToyTrainer(make_cfg(tmp_path / "src", **{"trainer.max_steps": 5, "model.kind": "keras_list"}))
    source.fit()
    target = ToyTrainer(
        make_cfg(
            tmp_path / "dst",
            **{
                "trainer.max_steps": 5,
                "optim.lr": 0.0,
                "model.kind": "keras_list",
                "model.classes": 4,
                "checkpoint.init_from.path": str(tmp_path / "src"),
                "checkpoint.init_from.exclude": ["model/head/*", "model/drop/*"],
            },
        )
    )
    report = target.fit().warm_start
    assert report.restored == [
        "model/blocks/0/bias",
        "model/blocks/0/kernel",
        "model/blocks/1/bias",
        "model/blocks/1/kernel",
    ]
    for a, b in zip(target.model.blocks, source.model.blocks, strict=True):
        np.testing.assert_array_equal(a.kernel.numpy(), b.kernel.numpy())


def test_variables_the_checkpoint_cannot_reach_are_refused(toy_cfg):
    from conftest import Net

    class Hidden(Net):
        def __init__(self):
            super().__init__()
            object.__setattr__(self, "secret", tf.Variable(1.0, name="secret"))  # not tracked

    class HiddenTrainer(ToyTrainer):
        def build_model(self):
            return Hidden()

    with pytest.raises(ckptkit.CheckpointMismatchError, match="secret"):
        HiddenTrainer(toy_cfg()).fit()


def test_wall_clock_saves_with_a_fake_clock(toy_cfg):
    class FakeClock:
        def __init__(self):
            self.now = 1000.0

        def __call__(self):
            self.now += 10.0  # every look at the clock: ten seconds later
            return self.now

    class Timed(ToyTrainer):
        clock = FakeClock()

    cfg = toy_cfg(
        **{
            "trainer.max_steps": 40,
            "trainer.steps_per_loop": 5,
            "trainer.eval_every_steps": None,
            "trainer.log_every_steps": 5,
            "checkpoint.save_every_steps": None,
            "checkpoint.save_every_seconds": 25,
            "checkpoint.max_to_keep": None,
        }
    )
    Timed(cfg).fit()
    # One clock read at the start and one per 5-step loop: 10 s per loop, a save every 3rd.
    assert steps_on_disk(os.path.join(cfg["run_dir"], "checkpoints")) == [15, 30, 40]


def test_save_at_specific_steps(toy_cfg):
    cfg = toy_cfg(
        **{
            "trainer.max_steps": 20,
            "checkpoint.save_every_steps": None,
            "checkpoint.save_at_steps": [3, 11],
            "checkpoint.max_to_keep": None,
        }
    )
    ToyTrainer(cfg).fit()
    assert steps_on_disk(os.path.join(cfg["run_dir"], "checkpoints")) == [3, 11, 20]


def _events(directory):
    from tensorboard.compat.proto import event_pb2

    out = []
    for name in sorted(os.listdir(directory)):
        if "tfevents" in name:
            for record in tf.data.TFRecordDataset(os.path.join(directory, name)):
                out.append(event_pb2.Event.FromString(record.numpy()))
    return out


def _hparams_as_tensorboard_shows_them(run_dir, max_steps):
    """Through TensorBoard's own reader and hparams logic, with --logdir at the run directory:
    one session (logs/), whose metrics include eval accuracy and train loss, with the config
    of the latest launch."""
    from tensorboard.backend.event_processing import plugin_event_multiplexer
    from tensorboard.plugins.hparams import backend_context
    from tensorboard.plugins.hparams import metadata as hp_metadata

    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(run_dir))
    mux.Reload()
    content = mux.PluginRunToTagToContent(hp_metadata.PLUGIN_NAME)
    sessions = {run for run, tags in content.items() if hp_metadata.SESSION_START_INFO_TAG in tags}
    assert sessions == {"logs"}, content
    for run, tag in (("logs/eval", "accuracy"), ("logs/train", "loss")):
        assert backend_context._find_longest_parent_path(sessions, run) == "logs"
        assert tag in mux.GetAccumulator(run).Tags()["tensors"]
    info = hp_metadata.parse_session_start_info_plugin_data(content["logs"][hp_metadata.SESSION_START_INFO_TAG])
    assert info.hparams["trainer.max_steps"].number_value == max_steps
    starts = [
        e for e in _events(run_dir / "logs") for v in e.summary.value if v.metadata.plugin_data.plugin_name == "hparams"
    ]
    assert len(starts) == 1  # a resumed launch replaces the first launch's hyper-parameters


def test_tensorboard_after_a_resume_has_no_duplicate_or_out_of_order_steps(toy_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = toy_cfg(
        **{
            "trainer.max_steps": 25,
            "trainer.log_every_steps": 5,
            "trainer.eval_every_steps": 5,
            "checkpoint.save_every_steps": 10,
        }
    )
    ToyTrainer(cfg).fit()
    ckpts = tmp_path / "run" / "checkpoints"
    for f in ckpts.glob("ckpt-25.*"):  # as if killed after logging step 25, before its save
        f.unlink()
    cfg["trainer"]["max_steps"] = 30
    result = ToyTrainer(cfg).fit()
    assert result.resumed_from == 20
    logs = tmp_path / "run" / "logs"
    for phase in ("train", "eval"):
        steps = [
            e.step
            for e in _events(logs / phase)
            if any(v.tag == ("loss" if phase == "train" else "accuracy") for v in e.summary.value)
        ]
        assert steps == [5, 10, 15, 20, 25, 30], (phase, steps)
    acc = EventAccumulator(str(logs / "checkpoint"), size_guidance={"tensors": 0})
    acc.Reload()
    assert [e.step for e in acc.Tensors("checkpoint/save_seconds")] == [10, 20, 30]  # 25 never saved
    assert {f"checkpoint/{t}" for t in ("save_seconds", "blocking_seconds", "size_mb")} <= set(acc.Tags()["tensors"])
    _hparams_as_tensorboard_shows_them(tmp_path / "run", max_steps=30)
    train_tags = {v.tag for e in _events(logs / "train") for v in e.summary.value}
    assert "config" in train_tags and "steps_per_sec" in train_tags


def test_max_steps_below_the_saved_step_is_refused_before_building(tmp_path):
    ToyTrainer(make_cfg(tmp_path / "run", **{"trainer.max_steps": 20})).fit()
    again = ToyTrainer(make_cfg(tmp_path / "run", **{"trainer.max_steps": 5}))  # kept: 10, 20
    with pytest.raises(ckptkit.ConfigError, match="below step 20"):
        again.fit()
    assert not again._built  # refused before build()
    with pytest.raises(AttributeError, match=r"ToyTrainer.model does not exist before build\(\)"):
        again.model  # noqa: B018


def test_fit_leaves_no_thread_behind(tmp_path):
    """TensorFlow keeps an async checkpoint's save thread (and its executor) for the life
    of the process; after fit() none of ckptkit's or TensorFlow's save threads is left."""
    before = set(threading.enumerate())
    for name in ("a", "b"):
        ToyTrainer(make_cfg(tmp_path / name, **{"trainer.max_steps": 10, "checkpoint.save_every_steps": 5})).fit()
    left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not left, left
