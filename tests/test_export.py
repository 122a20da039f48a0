"""SavedModel export: versions, the checkpoint it came from, loading in a fresh process."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import ckptkit
from ckptkit import export as export_lib
from ckptkit.transfer import checkpoint_variable_paths

from conftest import ToyTrainer, toy_data

LOAD_AND_CALL = """
import sys, numpy as np, tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
fn = loaded.signatures["serving_default"]
x = np.load(sys.argv[2])
(name, spec), = fn.structured_input_signature[1].items()
out = fn(**{name: tf.constant(x)})
np.savez(sys.argv[3], **{k: v.numpy() for k, v in out.items()})
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["module", "keras"])
def test_export_loads_in_a_fresh_process_and_matches(toy_cfg, tmp_path, kind):
    cfg = toy_cfg(**{"model.kind": kind, "export.enabled": True, "export.from": "last"})
    trainer = ToyTrainer(cfg)
    result = trainer.fit()
    assert result.export_path == os.path.join(cfg["run_dir"], "export", "1")
    x, _ = toy_data(n=7, seed=11)
    want = trainer.model(tf.constant(x)).numpy()
    np.save(tmp_path / "x.npy", x)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    subprocess.run([sys.executable, "-c", LOAD_AND_CALL, result.export_path, str(tmp_path / "x.npy"),
                    str(tmp_path / "out.npz")], check=True, env=env, timeout=300)
    got = np.load(tmp_path / "out.npz")
    assert list(got.keys()) == ["outputs"]
    np.testing.assert_allclose(got["outputs"], want, rtol=1e-6, atol=1e-6)


def test_export_from_best_records_the_step_and_keeps_the_live_weights(toy_cfg):
    cfg = toy_cfg(**{
        "trainer.max_steps": 20, "trainer.eval_every_steps": 5, "checkpoint.save_every_steps": 5,
        "checkpoint.best.metric": "score", "checkpoint.best.mode": "max", "data.score_peak": 10,
        "export.enabled": True,
    })
    trainer = ToyTrainer(cfg)
    result = trainer.fit()
    info = export_lib.read_export_info(result.export_path)
    assert info["step"] == 10 and info["checkpoint"] == "ckpt-10"
    assert info["metrics"]["score"] == 0.0
    # The exported weights are step 10's; the trainer's own model is back at step 20.
    loaded = tf.saved_model.load(result.export_path)
    x, _ = toy_data(n=5, seed=3)
    served = loaded.signatures["serving_default"](inputs=tf.constant(x))["outputs"].numpy()
    reader = tf.train.load_checkpoint(os.path.join(cfg["run_dir"], "checkpoints", "ckpt-20"))
    np.testing.assert_array_equal(trainer.model.head.w.numpy(),
                                  reader.get_tensor("model/head/w/.ATTRIBUTES/VARIABLE_VALUE"))
    assert not np.allclose(served, trainer.model(tf.constant(x)).numpy())


def test_relaunching_a_finished_run_does_not_export_twice(toy_cfg):
    cfg = toy_cfg(**{"trainer.max_steps": 5, "export.enabled": True})
    first = ToyTrainer(cfg).fit()
    second = ToyTrainer(cfg).fit()
    assert first.export_path == second.export_path
    assert export_lib.versions(os.path.dirname(first.export_path)) == [1]


def test_next_export_gets_the_next_version_and_no_temporary_is_left(toy_cfg):
    cfg = toy_cfg(**{"trainer.max_steps": 5, "export.enabled": True})
    ToyTrainer(cfg).fit()
    cfg["trainer"]["max_steps"] = 10
    result = ToyTrainer(cfg).fit()
    export_dir = os.path.dirname(result.export_path)
    assert export_lib.versions(export_dir) == [1, 2]
    assert sorted(os.listdir(export_dir)) == ["1", "2"]
    with open(os.path.join(result.export_path, "assets.extra", export_lib.EXPORT_INFO)) as f:
        assert json.load(f)["step"] == 10


def test_signatures_without_serving_default_are_refused(toy_cfg):
    class NoDefault(ToyTrainer):
        def serving_signatures(self):
            return {"predict": super().serving_signatures()["serving_default"]}

    with pytest.raises(ckptkit.ExportError, match="serving_default"):
        NoDefault(toy_cfg(**{"trainer.max_steps": 5, "export.enabled": True})).fit()


def test_export_from_best_holds_every_layer_of_the_best_step(toy_cfg):
    """All of the best step's weights, also Keras layers held in a list (a model-only restore
    used to leave those at the last step's values)."""
    cfg = toy_cfg(**{
        "model.kind": "keras_list", "trainer.max_steps": 20, "trainer.eval_every_steps": 5,
        "checkpoint.save_every_steps": 5, "checkpoint.best.metric": "score",
        "checkpoint.best.mode": "max", "data.score_peak": 10, "export.enabled": True,
    })
    result = ToyTrainer(cfg).fit()
    loaded = tf.saved_model.load(result.export_path)
    best = os.path.join(cfg["run_dir"], "checkpoints", "ckpt-10")
    last = os.path.join(cfg["run_dir"], "checkpoints", "ckpt-20")
    exported = [v.numpy() for v in loaded.model_variables]
    for block in (0, 1):
        path = f"model/blocks/{block}/_kernel"
        want = tf.train.load_checkpoint(best).get_tensor(checkpoint_variable_paths(best)[path])
        stale = tf.train.load_checkpoint(last).get_tensor(checkpoint_variable_paths(last)[path])
        assert not np.array_equal(want, stale)
        assert sum(np.array_equal(want, got) for got in exported) == 1, path
