"""Warm start for every Keras model kind: layers by name, Keras weights files as sources,
and the same result from every entry point (issue 17)."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import ckptkit
from ckptkit import Checkpointer, cli, transfer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def mobilenet_classifier(classes, rescale=False, seed=0):
    """keras.applications' MobileNetV2 as the backbone of a functional classifier; with
    ``rescale`` a layer goes in front of it, shifting every layer's position."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255.0, name="rescale")(inputs) if rescale else inputs
    backbone = keras.applications.MobileNetV2(weights=None, alpha=0.35, input_shape=(32, 32, 3), include_top=False)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(backbone(x))
    return keras.Model(inputs, keras.layers.Dense(classes, name="head")(x), name="classifier")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A MobileNetV2 classifier with moving statistics away from their initial values,
    saved by a Checkpointer, as .weights.h5 and as .keras."""
    d = tmp_path_factory.mktemp("source")
    model = mobilenet_classifier(3)
    for v in model.non_trainable_variables + model.trainable_variables:
        v.assign(
            tf.random.stateless_normal(v.shape, seed=[len(v.path), 7], dtype=v.dtype) * 0.1
            + (1.0 if "variance" in v.path else 0.0)
        )
    ckpt = Checkpointer(str(d / "checkpoints"), model=model, async_save=False)
    ckpt.save(100)
    model.save_weights(str(d / "classifier.weights.h5"))
    model.save(str(d / "classifier.keras"))
    return model, d


def _backbone_of(model):
    return next(layer for layer in model.layers if layer.name.startswith("mobilenetv2"))


def _same_backbone(a, b):
    for x, y in zip(_backbone_of(a).variables, _backbone_of(b).variables, strict=True):
        assert x.path == y.path
        np.testing.assert_array_equal(x.numpy(), y.numpy())


def test_functional_paths_are_layer_names_with_positions_as_aliases(source):
    model, d = source
    paths = transfer.model_variable_paths(model)
    assert "model/head/kernel" in paths and "model/head/bias" in paths
    assert "model/mobilenetv2_0.35_32/block_1_expand_BN/moving_mean" in paths
    assert not [p for p in paths if "_operations" in p]
    saved = transfer.checkpoint_variable_paths(str(d / "checkpoints" / "ckpt-100"))
    assert set(saved) == set(paths)
    assert saved["model/head/kernel"].startswith("model/_operations/")  # the object-graph key


@pytest.mark.parametrize("kind", ["checkpoint", "weights.h5", "keras"])
def test_head_swap_by_name_with_a_layer_inserted_in_front(source, kind):
    """The README's recipe on a functional keras.applications model: a new 10-class head,
    and a Rescaling layer in front shifts every position; the backbone restores bit-exact."""
    model, d = source
    path = {
        "checkpoint": d / "checkpoints",
        "weights.h5": d / "classifier.weights.h5",
        "keras": d / "classifier.keras",
    }[kind]
    target = mobilenet_classifier(10, rescale=True, seed=1)
    fresh_head = target.get_layer("head").kernel.numpy()
    report = ckptkit.restore_partial(target, str(path), exclude=["model/head/*"])
    n = len(_backbone_of(target).variables)
    assert n > 200 and len(report.restored) == n
    assert report.skipped_by_selection == ["model/head/bias", "model/head/kernel"]
    assert not report.missing_in_checkpoint and not report.mismatched
    _same_backbone(target, model)
    np.testing.assert_array_equal(target.get_layer("head").kernel.numpy(), fresh_head)
    # Without the exclusion, strict names both head variables and what the source holds.
    with pytest.raises(ckptkit.CheckpointMismatchError) as err:
        ckptkit.restore_partial(mobilenet_classifier(10, seed=2), str(path))
    assert "model/head/kernel: checkpoint has [1280, 3] float32, model has [1280, 10] float32" in str(err.value)


def test_selection_by_glob_and_by_position_alias(source):
    model, d = source
    target = mobilenet_classifier(10, seed=3)
    report = ckptkit.restore_partial(target, str(d / "checkpoints"), exclude=["*head*"])
    assert report.skipped_by_selection == ["model/head/bias", "model/head/kernel"]
    head_position = transfer.checkpoint_paths(str(d / "checkpoints" / "ckpt-100")).raw[0]["model/head/kernel"]
    by_position = head_position.rsplit("/", 1)[0] + "/*"  # model/_operations/3/*
    report = ckptkit.restore_partial(mobilenet_classifier(10, seed=4), str(d / "checkpoints"), exclude=[by_position])
    assert report.skipped_by_selection == ["model/head/bias", "model/head/kernel"]


def test_rename_a_layer_by_name(source, tmp_path):
    """A layer renamed in the new model maps over with one prefix rename."""
    model, d = source
    inputs = keras.Input((32, 32, 3))
    backbone = keras.applications.MobileNetV2(weights=None, alpha=0.35, input_shape=(32, 32, 3), include_top=False)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(backbone(inputs))
    target = keras.Model(inputs, keras.layers.Dense(3, name="classes")(x))
    with pytest.raises(ckptkit.CheckpointMismatchError) as err:
        ckptkit.restore_partial(target, str(d / "checkpoints"))
    message = str(err.value)
    assert "model/classes/kernel: missing in checkpoint" in message
    assert "nearest in checkpoint: model/head/kernel" in message
    assert "checkpoint.init_from.rename='{model/head/: model/classes/}' would map 2 of them" in message
    report = ckptkit.restore_partial(target, str(d / "checkpoints"), rename={"model/head/": "model/classes/"})
    assert "model/classes/kernel" in report.restored and not report.missing_in_checkpoint
    np.testing.assert_array_equal(target.get_layer("classes").kernel.numpy(), model.get_layer("head").kernel.numpy())


def test_plain_checkpoint_of_a_flat_functional_model_is_named_by_its_variables(tmp_path):
    """A checkpoint ckptkit did not write has no record of layer names; a functional
    model's layers are then named by the names their variables carry."""

    def net(classes, extra=False):
        inputs = keras.Input((6,))
        x = keras.layers.Rescaling(2.0, name="scale")(inputs) if extra else inputs
        x = keras.layers.Dense(5, name="body")(x)
        x = keras.layers.BatchNormalization(name="bn")(x)
        return keras.Model(inputs, keras.layers.Dense(classes, name="head")(x))

    src = net(2)
    prefix = tf.train.Checkpoint(model=src).write(str(tmp_path / "plain"))
    assert sorted(transfer.checkpoint_variable_paths(prefix)) == [
        "model/bn/beta",
        "model/bn/gamma",
        "model/bn/moving_mean",
        "model/bn/moving_variance",
        "model/body/bias",
        "model/body/kernel",
        "model/head/bias",
        "model/head/kernel",
    ]
    target = net(4, extra=True)
    report = ckptkit.restore_partial(target, prefix, exclude=["model/head/*"])
    assert len(report.restored) == 6
    np.testing.assert_array_equal(target.get_layer("body").kernel.numpy(), src.get_layer("body").kernel.numpy())


def test_sequential_and_tf_keras_models_are_named_by_layer(tmp_path):
    seq = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d1"), keras.layers.Dense(2, name="head")])
    assert sorted(transfer.model_variable_paths(seq)) == [
        "model/d1/bias",
        "model/d1/kernel",
        "model/head/bias",
        "model/head/kernel",
    ]
    tf_keras = pytest.importorskip("tf_keras")
    inputs = tf_keras.Input((4,))
    x = tf_keras.layers.Dense(3, name="body")(inputs)
    legacy = tf_keras.Model(inputs, tf_keras.layers.Dense(2, name="head")(x))
    paths = transfer.model_variable_paths(legacy)
    assert sorted(paths) == ["model/body/bias", "model/body/kernel", "model/head/bias", "model/head/kernel"]
    prefix = tf.train.Checkpoint(model=legacy).write(str(tmp_path / "legacy"))
    assert sorted(transfer.checkpoint_variable_paths(prefix)) == sorted(paths)


def test_keras_export_savedmodel_is_matched_by_variable_name(tmp_path):
    """model.export() keeps the variables in one flat list (variables/0, ...)."""
    inputs = keras.Input((4,))
    src = keras.Model(inputs, keras.layers.Dense(2, name="head")(keras.layers.Dense(3, name="body")(inputs)))
    src.export(str(tmp_path / "exported"), verbose=False)
    inputs = keras.Input((4,))
    target = keras.Model(inputs, keras.layers.Dense(2, name="head")(keras.layers.Dense(3, name="body")(inputs)))
    report = ckptkit.restore_partial(target, str(tmp_path / "exported"))
    assert sorted(report.restored) == ["body/bias", "body/kernel", "head/bias", "head/kernel"]
    np.testing.assert_array_equal(target.get_layer("body").kernel.numpy(), src.get_layer("body").kernel.numpy())


def test_cli_inspect_and_diff_show_layer_names(source, capsys):
    _, d = source
    assert cli.main(["inspect", str(d / "checkpoints")]) == 0
    out = capsys.readouterr().out
    assert "model/mobilenetv2_0.35_32/Conv1/kernel" in out and "model/_operations/" in out
    assert cli.main(["diff", str(d / "checkpoints"), str(d / "checkpoints")]) == 0
    assert "0 missing in checkpoint, 0 mismatched" in capsys.readouterr().out


@pytest.mark.slow
def test_restore_partial_in_a_fresh_process_fills_list_held_layers(tmp_path):
    """Outside fit(), in a process that never made a Checkpointer: layers kept in a list
    restore in full, and a checkpoint that lacks them is a strict error, not a silent skip."""
    script = textwrap.dedent("""
        import sys
        import tensorflow as tf

        class ListNet(tf.keras.Model):  # conftest.KerasListNet, without importing ckptkit
            def __init__(self):
                super().__init__()
                self.blocks = [tf.keras.layers.Dense(8), tf.keras.layers.Dense(8)]
                self.drop = tf.keras.layers.Dropout(0.2)
                self.head = tf.keras.layers.Dense(3)

            def call(self, x, training=False):
                for block in self.blocks:
                    x = self.drop(block(x), training=training)
                return self.head(x)

        model = ListNet()
        model(tf.zeros([1, 4]))
        plain = tf.train.Checkpoint(model=model).write(sys.argv[2])  # Keras alone: lists unseen
        import ckptkit
        report = ckptkit.restore_partial(model, sys.argv[1])
        print("RESTORED", len(report.restored), "OF", len(model.variables))
        fresh = ListNet()
        fresh(tf.zeros([1, 4]))
        try:
            ckptkit.restore_partial(fresh, plain)
        except ckptkit.CheckpointMismatchError as exc:
            print("REFUSED", str(exc).replace(chr(10), " "))
    """)
    from conftest import KerasListNet

    model = KerasListNet()
    model(tf.zeros([1, 4]))
    Checkpointer(str(tmp_path / "ckpts"), model=model, async_save=False).save(1)
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "ckpts"), str(tmp_path / "plain")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    n = len(model.variables)  # 2 + 2 in the list, 2 in the head, Dropout's seed state
    assert n == 7 and f"RESTORED {n} OF {n}" in out.stdout, out.stdout + out.stderr[-3000:]
    assert "REFUSED" in out.stdout and "model/blocks/0/kernel: missing in checkpoint" in out.stdout, out.stdout


def _head_kernel_key(h5file) -> str:
    found = []
    h5file.visititems(lambda n, o: found.append(n) if n.endswith("vars") and o.attrs.get("name") == "head" else None)
    return f"{found[0]}/0"


def _reroute_head_kernel(weights_h5, how: str, outside: str) -> None:
    """Replace the head kernel of a Keras weights file by a dataset whose bytes come from
    ``outside``: external storage, a virtual dataset, or an external link."""
    import h5py

    with h5py.File(weights_h5, "r+") as f:
        key = _head_kernel_key(f)
        shape, dtype = f[key].shape, f[key].dtype
        del f[key]
        if how == "external":
            f.create_dataset(key, shape=shape, dtype=dtype, external=[(outside, 0, int(np.prod(shape)) * 4)])
        elif how == "virtual":
            layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
            layout[...] = h5py.VirtualSource(outside, "leak", shape=shape)
            f.create_virtual_dataset(key, layout)
        else:
            f[key] = h5py.ExternalLink(outside, "/leak")


@pytest.mark.parametrize("container", ["weights.h5", "keras"])
@pytest.mark.parametrize("how", ["external", "virtual", "link"])
def test_weights_files_that_read_outside_bytes_are_refused(source, tmp_path, how, container):
    """An adversary's weights file whose head kernel is another file's bytes (issue 30): h5py
    follows external storage, virtual datasets and external links, so the bytes of any file
    on the machine would enter the model and every checkpoint and export after it. Each is
    refused with one line naming the HDF5 object, and no variable changes."""
    import shutil
    import zipfile

    import h5py

    model, d = source
    secret = tmp_path / "outside.h5" if how != "external" else tmp_path / "outside.bin"
    leak = np.full((1280, 3), 7.0, np.float32)
    if how == "external":
        secret.write_bytes(leak.tobytes())
    else:
        with h5py.File(secret, "w") as f:
            f["leak"] = leak
    weights = tmp_path / "evil.weights.h5"
    shutil.copy(d / "classifier.weights.h5", weights)
    _reroute_head_kernel(str(weights), how, str(secret))
    with h5py.File(weights, "r") as f:  # the file really does read the outside bytes
        key = _head_kernel_key(f)
        np.testing.assert_array_equal(f[key][()], leak)
    path = weights
    if container == "keras":
        path = tmp_path / "evil.keras"
        with zipfile.ZipFile(d / "classifier.keras") as good, zipfile.ZipFile(path, "w") as bad:
            for item in good.infolist():
                data = weights.read_bytes() if item.filename == "model.weights.h5" else good.read(item)
                bad.writestr(item, data)
    target = mobilenet_classifier(3, seed=5)
    before = [v.numpy().copy() for v in target.variables]
    with pytest.raises(ckptkit.CheckpointMismatchError) as err:
        ckptkit.restore_partial(target, str(path), exclude=["model/mobilenet*"])
    message = str(err.value)
    assert "\n" not in message and len(message) < 400, message
    assert f"HDF5 object /{key} " in message and str(secret) in message, message
    assert {"external": "external file", "virtual": "virtual dataset", "link": "external link"}[how] in message
    for a, v in zip(before, target.variables, strict=True):
        np.testing.assert_array_equal(a, v.numpy())
