"""SavedModel export: versions, the checkpoint it came from, loading in a fresh process."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from conftest import ToyTrainer, toy_data

import ckptkit
from ckptkit import export as export_lib
from ckptkit.transfer import checkpoint_variable_paths


def test_export_from_best_records_the_step_and_keeps_the_live_weights(toy_cfg):
    cfg = toy_cfg(
        **{
            "trainer.max_steps": 20,
            "trainer.eval_every_steps": 5,
            "checkpoint.save_every_steps": 5,
            "checkpoint.best.metric": "score",
            "checkpoint.best.mode": "max",
            "data.score_peak": 10,
            "export.enabled": True,
            "export.verify": False,
        }
    )
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
    np.testing.assert_array_equal(
        trainer.model.head.w.numpy(), reader.get_tensor("model/head/w/.ATTRIBUTES/VARIABLE_VALUE")
    )
    assert not np.allclose(served, trainer.model(tf.constant(x)).numpy())


def test_relaunching_a_finished_run_does_not_export_twice(toy_cfg):
    cfg = toy_cfg(**{"trainer.max_steps": 5, "export.enabled": True, "export.verify": False})
    first = ToyTrainer(cfg).fit()
    second = ToyTrainer(cfg).fit()
    assert first.export_path == second.export_path
    assert export_lib.versions(os.path.dirname(first.export_path)) == [1]


def test_next_export_gets_the_next_version_and_no_temporary_is_left(toy_cfg, monkeypatch):
    """Also: neither the saves nor the export call TensorFlow's SyncExecutors, which waits
    on every thread's executor (ckptkit._compat.patch_async_wait)."""
    from tensorflow.python.eager import context

    cfg = toy_cfg(**{"trainer.max_steps": 5, "export.enabled": True, "export.verify": False})
    ToyTrainer(cfg).fit()
    cfg["trainer"]["max_steps"] = 10
    synced = []
    monkeypatch.setattr(context.Context, "sync_executors", lambda self: synced.append(1))
    result = ToyTrainer(cfg).fit()
    assert synced == []
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
    cfg = toy_cfg(
        **{
            "model.kind": "keras_list",
            "trainer.max_steps": 20,
            "trainer.eval_every_steps": 5,
            "checkpoint.save_every_steps": 5,
            "checkpoint.best.metric": "score",
            "checkpoint.best.mode": "max",
            "data.score_peak": 10,
            "export.enabled": True,
            "export.verify": False,
        }
    )
    result = ToyTrainer(cfg).fit()
    best = os.path.join(cfg["run_dir"], "checkpoints", "ckpt-10")
    last = os.path.join(cfg["run_dir"], "checkpoints", "ckpt-20")
    exported = os.path.join(result.export_path, "variables", "variables")
    exported_paths = checkpoint_variable_paths(exported)
    assert set(exported_paths) == {p for p in checkpoint_variable_paths(best) if p.startswith("model/")}
    for block in (0, 1):
        path = f"model/blocks/{block}/kernel"  # the export keeps the checkpoint's paths
        want = tf.train.load_checkpoint(best).get_tensor(checkpoint_variable_paths(best)[path])
        stale = tf.train.load_checkpoint(last).get_tensor(checkpoint_variable_paths(last)[path])
        assert not np.array_equal(want, stale)
        np.testing.assert_array_equal(tf.train.load_checkpoint(exported).get_tensor(exported_paths[path]), want)


TWO_SIGNATURES = """
import sys, numpy as np, tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
x = tf.constant(np.load(sys.argv[2]))
a = loaded.signatures["serving_default"](features=x)
b = loaded.signatures["top_class"](features=x)
np.savez(sys.argv[3], logits=a["logits"].numpy(), top=b["output"].numpy())
"""


class TwoSignatures(ToyTrainer):
    def serving_signatures(self):
        spec = [tf.TensorSpec([None, 4], tf.float32, name="features")]

        @tf.function(input_signature=spec)
        def serve(features):
            return {"logits": self.model(features)}

        @tf.function(input_signature=spec)
        def top_class(features):  # a bare tensor: served under the name "output"
            return tf.argmax(self.model(features), axis=-1)

        return {"serving_default": serve, "top_class": top_class}


@pytest.mark.slow
def test_named_signatures_in_a_fresh_process(toy_cfg, tmp_path):
    trainer = TwoSignatures(toy_cfg(**{"export.enabled": True, "export.from": "last", "export.verify": False}))
    result = trainer.fit()
    x, _ = toy_data(n=6, seed=2)
    np.save(tmp_path / "x.npy", x)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    subprocess.run(
        [sys.executable, "-c", TWO_SIGNATURES, result.export_path, str(tmp_path / "x.npy"), str(tmp_path / "out.npz")],
        check=True,
        env=env,
        timeout=300,
    )
    got = np.load(tmp_path / "out.npz")
    want = trainer.model(tf.constant(x)).numpy()
    np.testing.assert_allclose(got["logits"], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got["top"], want.argmax(-1))
    config = open(os.path.join(result.export_path, "assets.extra", "config.yaml")).read()
    assert "max_steps: 20" in config


def test_cli_export_of_a_finished_run_from_another_directory(tmp_path, monkeypatch, capsys):
    from conftest import make_cfg

    from ckptkit import cli

    cfg = make_cfg(
        "relative/run",
        **{
            "trainer.max_steps": 10,
            "trainer.eval_every_steps": 5,
            "checkpoint.save_every_steps": 5,
            "checkpoint.best.metric": "score",
            "checkpoint.best.mode": "max",
            "data.score_peak": 5,
            "export.verify": False,
        },
    )
    monkeypatch.chdir(tmp_path)
    ToyTrainer(cfg).fit()  # no export during training (export.enabled=false)
    # The CLI gives the ckptkit logger a stderr handler of its own when it has none (as in a
    # fresh process): start from none, whatever ran before in this worker, and put it back.
    logger = logging.getLogger("ckptkit")
    for attr, value in (("handlers", []), ("propagate", True), ("level", logger.level)):
        monkeypatch.setattr(logger, attr, value)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli.main(["export", str(tmp_path / "relative" / "run")]) == 0
    best_path = capsys.readouterr().out.strip()
    assert best_path == str(tmp_path / "relative" / "run" / "export" / "1")
    assert export_lib.read_export_info(best_path)["step"] == 5
    assert cli.main(["export", str(tmp_path / "relative" / "run"), "--from", "last", "--to", "out"]) == 0
    last_path = capsys.readouterr().out.strip()
    assert last_path == str(elsewhere / "out" / "1")
    assert export_lib.read_export_info(last_path)["step"] == 10
    assert cli.main(["verify", last_path]) == 0
    assert "signature 'serving_default'" in capsys.readouterr().out
    # Again: the same checkpoint and signatures give the same version, and the log says so;
    # --force writes a new one.
    assert cli.main(["export", str(tmp_path / "relative" / "run")]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == best_path
    assert "ckptkit: reusing export 1 (same checkpoint, same signatures)" in captured.err
    assert cli.main(["export", str(tmp_path / "relative" / "run"), "--force"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "relative" / "run" / "export" / "2")
    assert export_lib.read_export_info(str(tmp_path / "relative" / "run" / "export" / "2"))["step"] == 5


@pytest.mark.slow
def test_a_killed_export_leaves_no_version_behind(toy_cfg, tmp_path):
    import signal
    import time

    cfg = toy_cfg(**{"trainer.max_steps": 5})
    ToyTrainer(cfg).fit()
    run_dir = cfg["run_dir"]
    export_dir = os.path.join(run_dir, "export")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckptkit.cli", "export", run_dir],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(export_dir) and any(n.startswith(".tmp-") for n in os.listdir(export_dir)):
            break
        time.sleep(0.002)
    assert proc.poll() is None, "the export finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert export_lib.versions(export_dir) == []
    assert [n for n in os.listdir(export_dir) if n.isdigit()] == []
    result = ToyTrainer(dict(cfg, export={"enabled": True, "verify": False})).fit()
    assert result.export_path == os.path.join(export_dir, "1")
    assert sorted(os.listdir(export_dir)) == ["1"]  # the killed export's temporary is gone
    tf.saved_model.load(result.export_path)


def test_export_on_every_new_best_keeps_the_newest_versions(toy_cfg):
    cfg = toy_cfg(
        **{
            "trainer.max_steps": 30,
            "trainer.eval_every_steps": 5,
            "checkpoint.save_every_steps": 5,
            "checkpoint.best.metric": "score",
            "checkpoint.best.mode": "max",
            "data.score_peak": 20,
            "export.enabled": True,
            "export.on_best": True,
            "export.max_to_keep": 2,
            "export.verify": False,
        }
    )
    result = ToyTrainer(cfg).fit()
    export_dir = os.path.join(cfg["run_dir"], "export")
    # New bests at 5, 10, 15, 20 exported as versions 1-4; the final export is step 20's again.
    assert export_lib.versions(export_dir) == [3, 4]
    assert export_lib.read_export_info(os.path.join(export_dir, "4"))["step"] == 20
    assert result.export_path == os.path.join(export_dir, "4")


def test_a_version_taken_while_exporting_goes_to_the_next_number(toy_cfg, monkeypatch):
    """Two exporters into one directory (a training run's export.on_best and `ckptkit
    export --to` the same place) count the same next version; the second takes the next."""
    cfg = toy_cfg(**{"trainer.max_steps": 5, "export.enabled": True, "export.verify": False})
    trainer = ToyTrainer(cfg)
    first = trainer.fit().export_path
    counted = []
    real = export_lib._next_version

    def stale(export_dir):  # as counted before the other exporter published version 1
        counted.append(1)
        return 1 if len(counted) <= 2 else real(export_dir)

    monkeypatch.setattr(export_lib, "_next_version", stale)
    second = trainer.export(force=True)
    assert second == os.path.join(os.path.dirname(first), "2") and len(counted) == 3
    assert export_lib.read_export_info(first)["step"] == 5  # version 1 untouched
    assert export_lib.versions(os.path.dirname(first)) == [1, 2]


HOUSE = """
import os
import sys

sys.path.insert(0, {tests!r})
from conftest import ToyTrainer

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "imported.log"), "a") as f:
    f.write("top-level code ran\\n")


class HouseTrainer(ToyTrainer):
    pass
"""


def test_export_runs_a_file_outside_the_environment_only_with_trust_code(tmp_path):
    """A run directory someone sent names a trainer file outside the working directory and
    the installed packages (issue 30): export names the file and the flag, and runs nothing."""
    import importlib.util

    from conftest import make_cfg

    project = tmp_path / "downloaded"
    project.mkdir()
    (project / "house_train.py").write_text(HOUSE.format(tests=os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location("house_train", project / "house_train.py")
    module = sys.modules["house_train"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run_dir = project / "run"
    module.HouseTrainer(make_cfg(run_dir, **{"trainer.max_steps": 5, "export.verify": False})).fit()
    (project / "imported.log").unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    cmd = [sys.executable, "-m", "ckptkit.cli", "export", str(run_dir)]
    refused = subprocess.run(cmd, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert f"the run record names the trainer file {project / 'house_train.py'}" in refused.stderr
    assert f"ckptkit export {run_dir} --trust-code" in refused.stderr and "Traceback" not in refused.stderr
    assert not (project / "imported.log").exists() and not (run_dir / "export").exists()
    trusted = subprocess.run(
        [*cmd, "--trust-code"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300
    )
    assert trusted.returncode == 0, trusted.stderr[-3000:]
    assert trusted.stdout.strip() == str(run_dir / "export" / "1")
    assert (project / "imported.log").read_text() == "top-level code ran\n"
    # From the project's own directory the file is the user's own code: no flag needed.
    again = subprocess.run([*cmd, "--force"], cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.strip() == str(run_dir / "export" / "2"), again.stderr[-3000:]


NODE_A = (
    "import sys; from ckptkit import lock_records; lock_records.hostname = lambda: 'node-a'; "
    "from ckptkit import cli; sys.exit(cli.main(sys.argv[1:]))"
)


@pytest.mark.slow
def test_hosts_sharing_an_export_directory_never_remove_each_others_temporaries(toy_cfg, tmp_path):
    """An export on node-a, frozen while it writes its temporary (a slow host), and one on
    this host into the same directory (issue 30): this host's cleanup removes only what a
    process of its own that is gone left, never another host's, so both versions publish."""
    import signal
    import time

    from ckptkit import lock_records

    cfg = toy_cfg(**{"trainer.max_steps": 5, "export.verify": False})
    ToyTrainer(cfg).fit()
    run_dir, shared = cfg["run_dir"], str(tmp_path / "shared")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    node_a = subprocess.Popen(
        [sys.executable, "-c", NODE_A, "export", run_dir, "--to", shared, "--force"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and node_a.poll() is None:
        if os.path.isdir(shared) and any(n.startswith(".tmp-node-a-") for n in os.listdir(shared)):
            break
        time.sleep(0.002)
    node_a.send_signal(signal.SIGSTOP)
    try:
        a_tmp = [n for n in os.listdir(shared) if n.startswith(".tmp-node-a-")]
        assert a_tmp, "node-a's export never made its temporary"
        gone = subprocess.Popen(["true"])
        gone.wait()
        leftovers = {
            # node-b's pid means nothing here: never provably dead, so never removed
            ".tmp-node-b-4242-abcdef": {"host": "node-b", "boot_id": "x", "pid": 4242, "pid_start": 1},
            # a process of this host that is gone: removed
            f".tmp-here-{gone.pid}-abcdef": {
                "host": lock_records.hostname(),
                "boot_id": lock_records.boot_id(),
                "pid": gone.pid,
                "pid_start": None,
            },
        }
        for name, owner in leftovers.items():
            os.mkdir(os.path.join(shared, name))
            with open(os.path.join(shared, name, export_lib.TMP_MARKER), "w") as f:
                json.dump(owner, f)
        here = subprocess.run(
            [sys.executable, "-m", "ckptkit.cli", "export", run_dir, "--to", shared, "--force"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert here.returncode == 0, here.stderr[-3000:]
        assert sorted(n for n in os.listdir(shared) if n.startswith(".tmp-")) == sorted(
            a_tmp + [".tmp-node-b-4242-abcdef"]
        )
    finally:
        node_a.send_signal(signal.SIGCONT)
    out, _ = node_a.communicate(timeout=300)
    assert node_a.returncode == 0, out[-3000:]
    assert export_lib.versions(shared) == [1, 2]
    assert sorted(n for n in os.listdir(shared) if n.startswith(".tmp-")) == [".tmp-node-b-4242-abcdef"]
    for version in ("1", "2"):
        tf.saved_model.load(os.path.join(shared, version))
