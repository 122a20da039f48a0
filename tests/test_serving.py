"""Exports as their real clients use them: saved_model_cli, TF Serving's PredictRequest run
through the session loader, Keras's TFSMLayer; for every kind of model (tf.Module, Keras 3
subclassed, Sequential, functional, keras.applications with BatchNorm, tf-keras).

The exports are trained and written once per module (``exports``); each client test reads
them. Every export carries two named signatures: ``serving_default`` (float logits, string
class names, int64 class ids) and ``top_score`` (a bare tensor, served as ``output``).
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from conftest import KerasNet, Net, make_cfg

import ckptkit
from ckptkit import export as export_lib
from ckptkit.errors import ExportError
from ckptkit.transfer import checkpoint_variable_paths

keras = tf.keras
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
CLASS_NAMES = ["cat", "dog", "emu"]
KINDS = ["module", "subclassed", "sequential", "functional", "mobilenet", "tf_keras"]

pytestmark = pytest.mark.slow


def _model(kind: str):
    if kind == "module":
        return Net(4, 8, 3, seed=0)
    if kind == "subclassed":
        return KerasNet(8, 3)
    if kind == "sequential":
        return keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(8, activation="relu"),
                keras.layers.BatchNormalization(),
                keras.layers.Dense(3),
            ]
        )
    if kind == "functional":
        inputs = keras.Input((4,))
        h = keras.layers.Dense(8, activation="relu", name="backbone")(inputs)
        h = keras.layers.BatchNormalization(name="bn")(h)
        return keras.Model(inputs, keras.layers.Dense(3, name="head")(h))
    if kind == "mobilenet":
        return keras.applications.MobileNetV2(
            weights=None, alpha=0.35, input_shape=(32, 32, 3), classes=3, classifier_activation=None
        )
    raise ValueError(kind)


def _features(kind: str, n: int, seed: int) -> np.ndarray:
    shape = (32, 32, 3) if kind == "mobilenet" else (4,)
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype("float32")


class KindTrainer(ckptkit.Trainer):
    """A few steps of any model kind on random features; two named signatures."""

    def build_model(self):
        return _model(self.cfg.model.kind)

    def build_optimizer(self):
        return keras.optimizers.SGD(0.05)

    def call(self, x, training):
        if isinstance(self.model, keras.Model):
            return self.model(x, training=training)
        return self.model(x)

    def train_dataset(self):
        x = _features(self.cfg.model.kind, 32, seed=0)
        y = (np.arange(32) % 3).astype("int32")
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(8, drop_remainder=True)

    def train_step(self, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            logits = self.call(x, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
        variables = self.model.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        return {"loss": loss}

    def serving_signatures(self):
        spec = tf.TensorSpec([None, *_features(self.cfg.model.kind, 1, 0).shape[1:]], tf.float32, name="features")
        names = tf.constant(CLASS_NAMES)

        @tf.function(input_signature=[spec])
        def classify(features):
            logits = self.call(features, training=False)
            ids = tf.argmax(logits, -1)
            return {"logits": logits, "class_name": tf.gather(names, ids), "class_id": ids}

        @tf.function(input_signature=[spec])
        def top_score(features):
            return tf.reduce_max(tf.nn.softmax(self.call(features, training=False)), -1)

        return {"serving_default": classify, "top_score": top_score}


def _live(trainer, x):
    signatures = trainer.serving_signatures()
    default = {k: v.numpy() for k, v in signatures["serving_default"](tf.constant(x)).items()}
    return {"serving_default": default, "top_score": {"output": signatures["top_score"](tf.constant(x)).numpy()}}


TF_KERAS_RUN = textwrap.dedent("""
    import os, sys, pickle
    sys.path.insert(0, sys.argv[3])
    import numpy as np, tensorflow as tf
    assert "tf_keras" in type(tf.keras.layers.Dense(1)).__module__, type(tf.keras.layers.Dense(1))
    import test_serving as t
    cfg = t.make_cfg(sys.argv[1], **{"model.kind": "functional", "trainer.max_steps": 4,
                                     "export.enabled": True, "export.from": "last"})
    trainer = t.KindTrainer(cfg)
    result = trainer.fit()
    x = t._features("functional", 5, seed=9)
    with open(sys.argv[2], "wb") as f:
        pickle.dump((result.export_path, x, t._live(trainer, x)), f)
""")


@pytest.fixture(scope="session")  # once per worker, however the tests interleave
def exports(tmp_path_factory):
    """kind -> (export path, a batch, what the live model gives for it by signature)."""
    import pickle

    root = tmp_path_factory.mktemp("exports")
    out = {}
    for kind in KINDS:
        if kind == "tf_keras":
            done = root / "tf_keras.pickle"
            env = dict(ENV, TF_USE_LEGACY_KERAS="1")
            subprocess.run(
                [sys.executable, "-c", TF_KERAS_RUN, str(root / kind), str(done), os.path.dirname(__file__)],
                check=True,
                env=env,
                timeout=600,
            )
            with open(done, "rb") as f:
                out[kind] = pickle.load(f)
            continue
        cfg = make_cfg(
            root / kind, **{"model.kind": kind, "trainer.max_steps": 4, "export.enabled": True, "export.from": "last"}
        )
        trainer = KindTrainer(cfg)
        result = trainer.fit()
        x = _features(kind, 5, seed=9)
        out[kind] = (result.export_path, x, _live(trainer, x))
    return out


def _assert_served(got, want):
    for key, value in want.items():
        if value.dtype.kind == "f":
            np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
        else:
            np.testing.assert_array_equal(np.asarray(got[key]).astype(value.dtype), value, err_msg=key)


# saved_model_cli's own main(), as its console script calls it, once per command line, all
# in one process: one TensorFlow start instead of two per model kind.
SAVED_MODEL_CLI = textwrap.dedent("""
    import contextlib, io, json, sys, traceback
    from tensorflow.python.tools import saved_model_cli
    commands_file, results_file = sys.argv[1:3]
    with open(commands_file) as f:
        commands = json.load(f)
    results = []
    for argv in commands:
        sys.argv = ["saved_model_cli", *argv]
        out, code = io.StringIO(), 0
        try:
            with contextlib.redirect_stdout(out):
                saved_model_cli.main()
        except SystemExit as exc:
            code = exc.code or 0
        except Exception:
            code, out = 1, io.StringIO(traceback.format_exc())
        results.append({"code": code, "stdout": out.getvalue()})
    with open(results_file, "w") as f:
        json.dump(results, f)
""")


@pytest.fixture(scope="session")  # once per worker, however the tests interleave
def saved_model_cli(exports, tmp_path_factory):
    """kind -> (``show --all`` stdout, ``run`` outputs of serving_default by name)."""
    root = tmp_path_factory.mktemp("saved_model_cli")
    commands = []
    for kind in KINDS:
        path, x, _ = exports[kind]
        np.save(root / f"{kind}.npy", x)
        commands.append(["show", "--all", "--dir", path])
        commands.append(
            [
                "run",
                "--dir",
                path,
                "--tag_set",
                "serve",
                "--signature_def",
                "serving_default",
                "--inputs",
                f"features={root / kind}.npy",
                "--outdir",
                str(root / kind),
            ]
        )
    (root / "commands.json").write_text(json.dumps(commands))
    subprocess.run(
        [sys.executable, "-c", SAVED_MODEL_CLI, str(root / "commands.json"), str(root / "results.json")],
        check=True,
        env=ENV,
        timeout=600,
        cwd=root,
    )
    results = json.loads((root / "results.json").read_text())
    out = {}
    for i, kind in enumerate(KINDS):
        show, run = results[2 * i], results[2 * i + 1]
        assert show["code"] == 0 and run["code"] == 0, (kind, show, run)
        outdir = root / kind
        out[kind] = (show["stdout"], {n[:-4]: np.load(outdir / n, allow_pickle=True) for n in os.listdir(outdir)})
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_saved_model_cli_shows_and_runs_the_export(exports, saved_model_cli, kind):
    _, _, live = exports[kind]
    shown, got = saved_model_cli[kind]
    for expected in (
        "signature_def['serving_default']",
        "signature_def['top_score']",
        "outputs['class_name'] tensor_info:\n        dtype: DT_STRING",
        "outputs['class_id'] tensor_info:\n        dtype: DT_INT64",
        "inputs['features'] tensor_info:\n        dtype: DT_FLOAT",
    ):
        assert expected in shown, (expected, shown[:3000])
    assert sorted(got) == ["class_id", "class_name", "logits"]
    _assert_served(got, live["serving_default"])


def _signature_defs(path):
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    (meta,) = proto.meta_graphs
    return meta.signature_def


def _predict_with_session_loader(path, request):
    """What TensorFlow Serving does with a PredictRequest: the signature def maps the
    request's named inputs to tensors of the graph the session loader restored."""
    from tensorflow_serving.apis import predict_pb2

    response = predict_pb2.PredictResponse()
    with tf.compat.v1.Session(graph=tf.Graph()) as sess:
        meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], path)
        signature = meta.signature_def[request.model_spec.signature_name or "serving_default"]
        assert set(request.inputs) == set(signature.inputs)
        feed = {signature.inputs[k].name: tf.make_ndarray(v) for k, v in request.inputs.items()}
        for key, value in sess.run({k: t.name for k, t in signature.outputs.items()}, feed).items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
    return response


@pytest.mark.parametrize("kind", KINDS)
def test_a_predict_request_built_from_the_signature_def(exports, kind):
    from tensorflow_serving.apis import predict_pb2

    path, x, live = exports[kind]
    defs = _signature_defs(path)
    for name in ("serving_default", "top_score"):
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "model"
        request.model_spec.signature_name = name
        for key, info in defs[name].inputs.items():
            assert tf.as_dtype(info.dtype) == tf.float32
            request.inputs[key].CopyFrom(tf.make_tensor_proto(x, dtype=tf.as_dtype(info.dtype)))
        response = _predict_with_session_loader(path, request)
        assert set(response.outputs) == set(defs[name].outputs) == set(live[name])
        got = {k: tf.make_ndarray(v) for k, v in response.outputs.items()}
        for key, info in defs[name].outputs.items():
            assert response.outputs[key].dtype == info.dtype
        _assert_served(got, live[name])


@pytest.mark.parametrize("kind", KINDS)
def test_keras_tfsm_layer_reloads_the_export(exports, kind):
    path, x, live = exports[kind]
    for name in ("serving_default", "top_score"):
        layer = keras.layers.TFSMLayer(path, call_endpoint=name)
        got = layer(tf.constant(x))
        got = {k: v.numpy() for k, v in got.items()} if isinstance(got, dict) else {"output": got.numpy()}
        _assert_served(got, live[name])


@pytest.mark.parametrize("kind", ["functional", "mobilenet"])
def test_keras_exports_keep_the_checkpoint_paths_and_are_not_stored_twice(exports, kind):
    path, _, _ = exports[kind]
    exported = checkpoint_variable_paths(os.path.join(path, "variables", "variables"))
    ckpt = os.path.join(os.path.dirname(os.path.dirname(path)), "checkpoints", "ckpt-4")
    model_paths = {p for p in checkpoint_variable_paths(ckpt) if p.startswith("model/")}
    assert set(exported) == model_paths
    if kind == "mobilenet":
        assert any(p.endswith("moving_mean") for p in exported)
    # Each variable once: the export's variables weigh what the model's do.
    reader = tf.train.load_checkpoint(os.path.join(path, "variables", "variables"))
    stored = sum(
        np.asarray(reader.get_tensor(k)).nbytes
        for k in reader.get_variable_to_shape_map()
        if k.endswith("VARIABLE_VALUE")
    )
    ckpt_reader = tf.train.load_checkpoint(ckpt)
    model_bytes = sum(
        np.asarray(ckpt_reader.get_tensor(k)).nbytes
        for p, k in checkpoint_variable_paths(ckpt).items()
        if p.startswith("model/")
    )
    assert stored == model_bytes


def test_the_export_records_its_check(exports):
    path, _, _ = exports["mobilenet"]
    info = export_lib.read_export_info(path)
    assert "session loader" in info["check"]["loader"] and "fresh process" in info["check"]["loader"]
    assert info["check"]["batches"] == {"serving_default": "the sample batch", "top_score": "the sample batch"}
    assert info["signatures"]["serving_default"]["outputs"]["class_name"] == ["string", [None]]
    inputs, outputs = export_lib.read_check(path, info)
    assert inputs["serving_default"]["features"].shape == (8, 32, 32, 3)
    assert outputs["serving_default"]["class_name"].dtype == object


MIRRORED_RUN = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[2])
    import test_serving as t
    cfg = t.make_cfg(sys.argv[1], **{"model.kind": "functional", "trainer.max_steps": 4,
                                     "export.enabled": True, "strategy.kind": "mirrored",
                                     "strategy.cpu_devices": 2})
    print("EXPORTED", t.KindTrainer(cfg).fit().export_path)
""")


def test_an_export_under_a_mirrored_strategy_passes_the_session_loader_check(tmp_path):
    """Two replicas (logical CPUs, which must be made before TensorFlow starts: a process
    of its own): the variables are mirrored, the export serves one copy of each."""
    done = subprocess.run(
        [sys.executable, "-c", MIRRORED_RUN, str(tmp_path / "run"), os.path.dirname(__file__)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mirrored strategy: 2 replica(s)" in done.stderr + done.stdout
    path = done.stdout.split("EXPORTED ")[1].strip()
    assert "fresh process" in export_lib.read_export_info(path)["check"]["loader"]
    assert "export check passed" in done.stderr + done.stdout


# --- strings and assets ---------------------------------------------------------------------


class TextModel(tf.Module):
    """Words -> ids through a vocabulary file (a SavedModel asset) -> a bag of embeddings."""

    def __init__(self, vocab_file):
        super().__init__()
        init = tf.lookup.TextFileInitializer(
            vocab_file, tf.string, tf.lookup.TextFileIndex.WHOLE_LINE, tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER
        )
        self.table = tf.lookup.StaticHashTable(init, default_value=0)
        self.embedding = tf.Variable(tf.random.stateless_normal([5, 3], seed=[1, 2]))

    def __call__(self, text):
        ids = self.table.lookup(tf.strings.split(text))  # ragged: words per text
        return tf.reduce_sum(tf.gather(self.embedding, ids), axis=1)


class TextTrainer(KindTrainer):
    def build_model(self):
        if self.cfg.model.kind == "keras_text":
            vectorize = keras.layers.TextVectorization(
                vocabulary=["red", "green", "blue"], output_mode="count", name="vectorize"
            )
            inputs = keras.Input((), dtype="string")
            return keras.Model(inputs, keras.layers.Dense(3, name="head")(vectorize(inputs)))
        return TextModel(self.cfg.model.vocab)

    def call(self, x, training):
        return self.model(x)

    def train_dataset(self):
        text = ["red green", "blue", "green green blue", "red"] * 4
        return tf.data.Dataset.from_tensor_slices((text, np.arange(16) % 3)).batch(4)

    def train_step(self, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(self.call(x, True)[:, 0] - tf.cast(y, tf.float32)))
        variables = self.model.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        return {"loss": loss}

    def serving_signatures(self):
        names = tf.constant(CLASS_NAMES)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
        def classify(text):
            scores = self.call(text, False)
            return {"scores": scores, "class_name": tf.gather(names, tf.argmax(scores, -1))}

        return {"serving_default": classify}


@pytest.mark.parametrize("kind", ["asset", "keras_text"])
def test_string_inputs_and_outputs_and_a_vocabulary_from_another_directory(tmp_path, kind):
    vocab = tmp_path / "vocab" / "words.txt"
    vocab.parent.mkdir()
    vocab.write_text("<unk>\nred\ngreen\nblue\n")
    cfg = make_cfg(
        tmp_path / "run",
        **{
            "model.kind": kind,
            "model.vocab": str(vocab),
            "trainer.max_steps": 4,
            "export.enabled": True,
            "export.from": "last",
        },
    )
    trainer = TextTrainer(cfg)
    result = trainer.fit()
    text = np.array([b"red blue", b"green", b"blue blue green"], dtype=object)
    want = {k: v.numpy() for k, v in trainer.serving_signatures()["serving_default"](tf.constant(text)).items()}
    if kind == "asset":
        assets = os.listdir(os.path.join(result.export_path, "assets"))
        assert assets == ["words.txt"]
        vocab.unlink()  # the export must carry its own copy
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = subprocess.run(
        [
            "saved_model_cli",
            "run",
            "--dir",
            result.export_path,
            "--tag_set",
            "serve",
            "--signature_def",
            "serving_default",
            "--input_exprs",
            "text=[b'red blue', b'green', b'blue blue green']",
            "--outdir",
            str(elsewhere / "out"),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=elsewhere,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = {n[:-4]: np.load(elsewhere / "out" / n, allow_pickle=True) for n in os.listdir(elsewhere / "out")}
    _assert_served(got, want)
    assert list(got["class_name"]) == list(want["class_name"])


# --- what the check refuses ------------------------------------------------------------------


def test_an_export_the_session_loader_cannot_run_is_refused_and_not_published(tmp_path, monkeypatch):
    """The export check is the session loader's: the way ckptkit used to save a Keras 3 model
    (the model object as it is) loads with tf.saved_model.load but fails in serving."""

    def as_before(model, signatures):
        root = tf.Module()
        root.model = model
        return root

    monkeypatch.setattr(export_lib, "serving_root", as_before)
    cfg = make_cfg(tmp_path / "run", **{"model.kind": "functional", "trainer.max_steps": 2, "export.enabled": True})
    with pytest.raises(ExportError, match="session loader .* cannot run it: .*Could not find variable"):
        KindTrainer(cfg).fit()
    export_dir = tmp_path / "run" / "export"
    assert os.listdir(export_dir) == []
    monkeypatch.undo()
    result = KindTrainer(cfg).fit()  # the next launch exports and checks it
    assert result.export_path == str(export_dir / "1")


@pytest.mark.parametrize("how", ["clock", "python"])
def test_signatures_that_serving_would_not_reproduce_are_refused(tmp_path, how):
    """The clock differs between the live model and the check; a tf.py_function calls this
    process's Python, which no serving process has."""

    class Unservable(KindTrainer):
        def serving_signatures(self):
            @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="features")])
            def serve(features):
                if how == "clock":
                    return self.model(features) + tf.cast(tf.timestamp() % 1000, tf.float32)
                return tf.py_function(lambda x: self.model(x), [features], tf.float32)

            return {"serving_default": serve}

    cfg = make_cfg(tmp_path / "run", **{"model.kind": "module", "trainer.max_steps": 2, "export.enabled": True})
    expected = (
        "signature 'serving_default' output 'output' differs from the live model"
        if how == "clock"
        else "session loader .* cannot run it: .*pyfunc"
    )
    with pytest.raises(ExportError, match=expected):
        Unservable(cfg).fit()
    assert os.listdir(tmp_path / "run" / "export") == []


@pytest.mark.parametrize("cast", [True, False])
def test_a_float16_output_is_served_as_float32_unless_told(tmp_path, caplog, cast):
    class Half(KindTrainer):
        def serving_signatures(self):
            @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="features")])
            def half(features):
                return {"probabilities": tf.cast(tf.nn.softmax(self.model(features)), tf.float16)}

            return {"serving_default": half}

    cfg = make_cfg(
        tmp_path / "run",
        **{
            "model.kind": "module",
            "trainer.max_steps": 2,
            "export.enabled": True,
            "export.cast_outputs_float32": cast,
            "export.verify": not cast,
        },
    )  # the check compares float16 once
    caplog.set_level("INFO", "ckptkit")
    result = Half(cfg).fit()
    served = _signature_defs(result.export_path)["serving_default"].outputs["probabilities"]
    assert tf.as_dtype(served.dtype) == (tf.float32 if cast else tf.float16)
    record = [
        r
        for r in caplog.records
        if "'probabilities' is" in r.getMessage() or "'probabilities' is served as float16" in r.getMessage()
    ]
    assert record and record[0].levelname == ("INFO" if cast else "WARNING")


# --- reuse -----------------------------------------------------------------------------------


def test_reuse_needs_the_same_checkpoint_and_the_same_signatures(tmp_path, caplog):
    class Scaled(KindTrainer):
        scale = 1.0
        extra = False

        def serving_signatures(self):
            @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="features")])
            def serve(features):
                out = {"logits": self.model(features) * self.scale}
                if self.extra:
                    out["top"] = tf.argmax(out["logits"], -1)
                return out

            return {"serving_default": serve}

    caplog.set_level("INFO", "ckptkit")
    # The decision is the subject here, not the session-loader check (its own tests below).
    cfg = make_cfg(
        tmp_path / "run",
        **{"model.kind": "module", "trainer.max_steps": 2, "export.enabled": True, "export.verify": False},
    )
    trainer = Scaled(cfg)
    first = trainer.fit().export_path
    export_dir = os.path.dirname(first)
    assert trainer.export() == first
    assert "reusing export 1 (same checkpoint, same signatures)" in caplog.text
    assert trainer.export(force=True) == os.path.join(export_dir, "2")
    trainer.scale = 2.0  # same specs, other outputs
    assert trainer.export() == os.path.join(export_dir, "3")
    assert "the signatures now serve other outputs" in caplog.text
    trainer.extra = True  # another output
    assert trainer.export() == os.path.join(export_dir, "4")
    assert "its signatures differ" in caplog.text
    assert trainer.export() == os.path.join(export_dir, "4")
    assert export_lib.versions(export_dir) == [1, 2, 3, 4]


def test_an_unchecked_old_export_is_not_reused(tmp_path, caplog):
    cfg = make_cfg(tmp_path / "run", **{"model.kind": "module", "trainer.max_steps": 2, "export.enabled": True})
    trainer = KindTrainer(cfg)
    first = trainer.fit().export_path
    info_path = os.path.join(first, "assets.extra", export_lib.EXPORT_INFO)
    with open(info_path) as f:
        info = json.load(f)
    info["check"]["loader"] = None  # as an export made before the session-loader check
    with open(info_path, "w") as f:
        json.dump(info, f)
    caplog.set_level("INFO", "ckptkit")
    assert trainer.export() == os.path.join(os.path.dirname(first), "2")
    assert "it was not checked with the session loader" in caplog.text


class _Plant:
    """Unpickling this writes a file: what an adversary would put in an export's check batch."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_check_batch_planted_in_an_export_is_never_unpickled(tmp_path, caplog):
    """The reuse decision reads the check batch back from the export directory: a crafted
    .npz holding a pickle is refused (no code runs from data), and a new version is written."""
    cfg = make_cfg(
        tmp_path / "run",
        **{"model.kind": "module", "trainer.max_steps": 2, "export.enabled": True, "export.verify": False},
    )
    trainer = KindTrainer(cfg)
    first = trainer.fit().export_path
    info = export_lib.read_export_info(first)
    victim = tmp_path / "pwned"
    planted = np.empty(1, dtype=object)
    planted[0] = _Plant(str(victim))
    name = info["check"]["arrays"]["outputs"]["serving_default"]["logits"]
    np.savez(os.path.join(first, "assets.extra", "ckptkit_check_outputs.npz"), **{name: planted})
    caplog.set_level("INFO", "ckptkit")
    assert trainer.export() == os.path.join(os.path.dirname(first), "2")
    assert not victim.exists()
    assert "it holds no check batch to compare with" in caplog.text


# --- filesystems without a directory rename --------------------------------------------------


def test_an_export_to_ram_is_complete(tmp_path, caplog):
    """TensorFlow's ram:// filesystem renames a directory without its files."""
    where = f"ram://ckptkit-test-{os.getpid()}/export"
    cfg = make_cfg(
        tmp_path / "run",
        **{"model.kind": "functional", "trainer.max_steps": 2, "export.enabled": True, "export.dir": where},
    )
    caplog.set_level("INFO", "ckptkit")
    trainer = KindTrainer(cfg)
    result = trainer.fit()
    assert result.export_path == f"{where}/1"
    assert [n.rstrip("/") for n in tf.io.gfile.listdir(where)] == ["1"]
    names = {
        os.path.relpath(os.path.join(d, n), result.export_path)
        for d, _, files in tf.io.gfile.walk(result.export_path)
        for n in files
    }
    assert {"saved_model.pb", "variables/variables.index", "assets.extra/ckptkit_export.json"} <= names
    assert "loading it with the session loader in this process" in caplog.text
    x = _features("functional", 3, seed=1)
    request_out = tf.saved_model.load(result.export_path).signatures["serving_default"](features=tf.constant(x))
    _assert_served({k: v.numpy() for k, v in request_out.items()}, _live(trainer, x)["serving_default"])


def test_resume_never_with_checkpoints_on_ram_moves_them_all(tmp_path, caplog):
    """resume=never says it moved the old checkpoints aside: on ram:// a directory rename
    would move the name and leave the files where the new run saves."""
    where = f"ram://ckptkit-never-{os.getpid()}/checkpoints"
    cfg = make_cfg(
        tmp_path / "run",
        **{"model.kind": "module", "trainer.max_steps": 4, "checkpoint.save_every_steps": 2, "checkpoint.dir": where},
    )
    KindTrainer(cfg).fit()
    caplog.set_level("INFO", "ckptkit")
    cfg["trainer"]["max_steps"] = 2
    cfg["checkpoint"]["resume"] = "never"
    result = KindTrainer(cfg).fit()
    assert result.step == 2 and result.resumed_from is None
    moved = [r.getMessage().split("aside to ")[1].split(" ")[0] for r in caplog.records if "aside to" in r.getMessage()]
    assert len(moved) == 1 and moved[0].startswith(where + "-moved-")
    names = lambda d: sorted(n for _, _, files in tf.io.gfile.walk(d) for n in files if n.startswith("ckpt-"))  # noqa: E731
    assert [n.split(".")[0] for n in names(where)] == ["ckpt-2", "ckpt-2"]  # the new run's step 2 only
    assert sorted({n.split(".")[0] for n in names(moved[0])}) == ["ckpt-2", "ckpt-4"]


def test_resume_never_on_ram_moves_every_file(tmp_path):
    from ckptkit import storage

    src, dst = f"ram://ckptkit-move-{os.getpid()}/checkpoints", f"ram://ckptkit-move-{os.getpid()}/moved"
    tf.io.gfile.makedirs(src + "/sub")
    for name in ("ckpt-1.index", "ckpt-1.data-00000-of-00001", "sub/x"):
        with tf.io.gfile.GFile(f"{src}/{name}", "w") as f:
            f.write(name)
    storage.rename(src, dst)
    assert [n for _, _, files in tf.io.gfile.walk(src) for n in files] == []
    moved = sorted(os.path.relpath(os.path.join(d, n), dst) for d, _, files in tf.io.gfile.walk(dst) for n in files)
    assert moved == ["ckpt-1.data-00000-of-00001", "ckpt-1.index", "sub/x"]
    with tf.io.gfile.GFile(f"{dst}/sub/x") as f:
        assert f.read() == "sub/x"


# --- a zero-step run: a converter --------------------------------------------------------------


def test_max_steps_0_converts_a_tf1_checkpoint_into_a_checked_savedmodel(tmp_path, caplog):
    """TF1 Saver checkpoint in (names as a TF1 graph would have them), checked SavedModel
    out: build, warm start, save step 0, export; the same command again changes nothing."""
    rng = np.random.default_rng(3)
    arrays = {
        "backbone/kernel": rng.normal(size=(4, 8)),
        "backbone/bias": rng.normal(size=8),
        "bn/gamma": rng.normal(size=8),
        "bn/beta": rng.normal(size=8),
        "bn/moving_mean": rng.normal(size=8),
        "bn/moving_variance": rng.uniform(0.5, 2, size=8),
        "head/kernel": rng.normal(size=(8, 3)),
        "head/bias": rng.normal(size=3),
    }
    arrays = {k: v.astype("float32") for k, v in arrays.items()}
    with tf.Graph().as_default():
        variables = [tf.compat.v1.get_variable(name, initializer=value) for name, value in arrays.items()]
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            prefix = tf.compat.v1.train.Saver(variables).save(sess, str(tmp_path / "tf1" / "model.ckpt"))
    cfg = make_cfg(
        tmp_path / "run",
        **{
            "model.kind": "functional",
            "trainer.max_steps": 0,
            "checkpoint.init_from.path": prefix,
            "export.enabled": True,
        },
    )
    caplog.set_level("INFO", "ckptkit")
    result = KindTrainer(cfg).fit()
    assert result.step == 0 and result.steps_run == 0 and len(result.warm_start.restored) == 8
    assert "trainer.max_steps=0: nothing trained" in caplog.text
    assert "ckpt-0.index" in os.listdir(tmp_path / "run" / "checkpoints")
    assert result.export_path == str(tmp_path / "run" / "export" / "1")
    assert "session loader" in export_lib.read_export_info(result.export_path)["check"]["loader"]
    x = _features("functional", 5, seed=4)
    h = np.maximum(x @ arrays["backbone/kernel"] + arrays["backbone/bias"], 0)
    h = (
        arrays["bn/gamma"] * (h - arrays["bn/moving_mean"]) / np.sqrt(arrays["bn/moving_variance"] + 1e-3)
        + arrays["bn/beta"]
    )
    want = h @ arrays["head/kernel"] + arrays["head/bias"]
    served = tf.saved_model.load(result.export_path).signatures["serving_default"](features=tf.constant(x))
    np.testing.assert_allclose(served["logits"].numpy(), want, rtol=1e-4, atol=1e-4)
    again = KindTrainer(cfg).fit()  # the same command: finished, nothing new
    assert again.step == 0 and again.export_path == result.export_path
    assert export_lib.versions(str(tmp_path / "run" / "export")) == [1]


class TabularTrainer(ckptkit.Trainer):
    """Features as a dict, as tabular pipelines give them ({"age": ..., "income": ...})."""

    def build_model(self):
        age, income = keras.Input((1,), name="age"), keras.Input((1,), name="income")
        x = keras.layers.Concatenate()([age, income])
        return keras.Model({"age": age, "income": income}, keras.layers.Dense(2, name="head")(x))

    def build_optimizer(self):
        return keras.optimizers.SGD(0.05)

    def train_dataset(self):
        rng = np.random.default_rng(0)
        features = {k: rng.normal(size=(32, 1)).astype("float32") for k in ("age", "income")}
        if self.cfg.data.nested:
            features = (features["age"], features["income"])  # a tuple: no default signature
        y = (np.arange(32) % 2).astype("int32")
        return tf.data.Dataset.from_tensor_slices((features, y)).batch(8, drop_remainder=True)

    def train_step(self, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            logits = self.model(x if isinstance(x, dict) else {"age": x[0], "income": x[1]}, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
        variables = self.model.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        return {"loss": loss}


class CustomTabularTrainer(TabularTrainer):
    def serving_signatures(self):
        spec = {"age": tf.TensorSpec([None, 1], tf.float32), "income": tf.TensorSpec([None, 1], tf.float32)}

        @tf.function(input_signature=[spec])
        def score(inputs):
            return {"score": tf.nn.softmax(self.model(inputs, training=False))}

        return {"serving_default": score}


@pytest.mark.parametrize("custom", [False, True], ids=["default", "dict_input_signature"])
def test_dict_features_export_and_serve(tmp_path, custom):
    """A dict input_signature (which tf.saved_model.save serves as named inputs), and the
    default signature over dict features, export, pass the session-loader check and run
    in saved_model_cli with one input per key (issue 31)."""
    cfg = make_cfg(tmp_path / "run", **{"trainer.max_steps": 4, "export.enabled": True, "data.nested": False})
    result = (CustomTabularTrainer if custom else TabularTrainer)(cfg).fit()
    path = result.export_path
    assert path and export_lib.read_export_info(path)["check"]["batches"]["serving_default"] == "the sample batch"
    commands = [
        [
            "run",
            "--dir",
            path,
            "--tag_set",
            "serve",
            "--signature_def",
            "serving_default",
            "--input_exprs",
            "age=[[30.0],[40.0]];income=[[1.0],[2.0]]",
            "--outdir",
            str(tmp_path / "out"),
        ]
    ]
    (tmp_path / "commands.json").write_text(json.dumps(commands))
    subprocess.run(
        [sys.executable, "-c", SAVED_MODEL_CLI, str(tmp_path / "commands.json"), str(tmp_path / "results.json")],
        check=True,
        env=ENV,
        timeout=600,
        cwd=tmp_path,
    )
    (run,) = json.loads((tmp_path / "results.json").read_text())
    assert run["code"] == 0, run
    key = "score" if custom else "outputs"
    served = np.load(tmp_path / "out" / f"{key}.npy")
    assert served.shape == (2, 2)


def test_features_the_default_signature_cannot_take_are_refused_before_training(tmp_path):
    cfg = make_cfg(tmp_path / "run", **{"trainer.max_steps": 4, "export.enabled": True, "data.nested": True})
    with pytest.raises(ExportError) as err:
        TabularTrainer(cfg).fit()
    assert "the default serving signature cannot take" in str(err.value) and "override serving_signatures()" in str(
        err.value
    )
    assert not (tmp_path / "run" / "checkpoints").exists() or not [
        n for n in os.listdir(tmp_path / "run" / "checkpoints") if n.startswith("ckpt-")
    ]
