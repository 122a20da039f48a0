"""Shared test helpers: a tiny tf.Module / Keras model trainer on synthetic data."""

import contextlib
import os
import subprocess

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import ckptkit  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Dense(tf.Module):
    def __init__(self, n_in, n_out, seed, name=None):
        super().__init__(name=name)
        self.w = tf.Variable(tf.random.stateless_normal([n_in, n_out], seed=[seed, 0]) * 0.5, name="w")
        self.b = tf.Variable(tf.zeros([n_out]), name="b")

    def __call__(self, x):
        return tf.matmul(x, self.w) + self.b


class Net(tf.Module):
    """backbone -> relu -> head, as plain tf.Module objects."""

    def __init__(self, n_in=4, hidden=8, classes=3, seed=0):
        super().__init__()
        self.backbone = Dense(n_in, hidden, seed)
        self.head = Dense(hidden, classes, seed + 1)

    def __call__(self, x):
        return self.head(tf.nn.relu(self.backbone(x)))


class KerasNet(tf.keras.Model):
    def __init__(self, hidden=8, classes=3):
        super().__init__()
        self.backbone = tf.keras.layers.Dense(hidden, activation="relu")
        self.head = tf.keras.layers.Dense(classes)

    def call(self, x, training=False):
        return self.head(self.backbone(x))


def toy_data(n=96, n_in=4, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, n_in)).astype("float32")
    w = rng.normal(size=(n_in, classes)).astype("float32")
    y = np.argmax(x @ w, axis=1).astype("int32")
    return x, y


class ToyTrainer(ckptkit.Trainer):
    """Trainer over toy_data. ``model.kind`` is ``module``, ``keras`` or ``keras_list``.

    ``data.shuffle``: ``global`` shuffles with ``ckptkit.data.shuffle``; otherwise with a
    buffer (``Dataset.shuffle``).
    ``data.score_peak``: if set, eval also returns ``score = -(step - peak)^2``, a metric
    whose best step the test knows in advance.
    """

    def build_model(self):
        m = self.cfg.model
        if m.kind == "keras":
            return KerasNet(m.hidden, m.classes)
        if m.kind == "keras_list":
            return KerasListNet(m.hidden, m.classes)
        return Net(4, m.hidden, m.classes, seed=m.seed)

    def build_optimizer(self):
        return tf.keras.optimizers.Adam(self.cfg.optim.lr)

    def train_dataset(self):
        x, y = toy_data()
        ds = tf.data.Dataset.from_tensor_slices((x, y))
        if self.cfg.data.get("shuffle") == "global":  # an index and a seed in each checkpoint
            ds = ckptkit.data.shuffle(ds, seed=1)
        else:  # a 96-element shuffle buffer in each checkpoint
            ds = ds.shuffle(96, seed=1)
        return ds.batch(16, drop_remainder=True)

    def eval_dataset(self):
        if not self.cfg.data.eval:
            return None
        x, y = toy_data(n=40, seed=5)
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(16)

    def train_step(self, batch):
        x, y = batch
        if self.cfg.data.get("noise"):
            x = x + self.rng.normal(tf.shape(x)) * self.cfg.data.noise
        with tf.GradientTape() as tape:
            logits = self.model(x, training=True) if self.cfg.model.kind == "keras_list" else self.model(x)
            per_example = tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
            loss = tf.nn.compute_average_loss(per_example)  # the global batch's mean, any strategy
        variables = self.model.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        return {"loss": tf.reduce_mean(per_example)}

    def eval_step(self, batch):
        x, y = batch
        logits = self.model(x)
        acc = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), y), tf.float32))
        out = {"accuracy": acc}
        if self.cfg.data.get("score_peak") is not None:
            d = tf.cast(self.global_step, tf.float32) - float(self.cfg.data.score_peak)
            out["score"] = -d * d
        return out


def own_project_block(after: str, lang: str) -> str:
    """A code block of docs/own-project.md (linked from the README): the first ```lang block
    after the text ``after``."""
    text = open(os.path.join(REPO, "docs", "own-project.md")).read()
    start = text.index(f"```{lang}\n", text.index(after)) + len(lang) + 4
    return text[start : text.index("```", start)]


def make_cfg(run_dir, **overrides):
    """A plain dict config for ToyTrainer; ``overrides`` are dotted keys."""
    base = {
        "name": "toy",
        "run_dir": str(run_dir),
        "trainer": {"max_steps": 20, "steps_per_loop": 5, "eval_every_steps": 10, "log_every_steps": 10},
        "checkpoint": {"save_every_steps": 10},
        "export": {"enabled": False},
        "model": {"kind": "module", "hidden": 8, "classes": 3, "seed": 0},
        "optim": {"lr": 0.01},
        "data": {"eval": True, "score_peak": None, "noise": 0.0, "step_sleep": 0.0, "shuffle": "buffer"},
    }
    cfg = OmegaConf.create(base)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return OmegaConf.to_container(cfg)


def steps_on_disk(directory):
    """The steps of the complete checkpoints (``ckpt-<step>.index``) in ``directory``."""
    return sorted(int(f[5:-6]) for f in os.listdir(directory) if f.startswith("ckpt-") and f.endswith(".index"))


def values(variables):
    return [np.array(v.numpy()) for v in variables]


@pytest.fixture
def toy_cfg(tmp_path):
    return lambda **kw: make_cfg(tmp_path / "run", **kw)


class KerasListNet(tf.keras.Model):
    """Keras 3 layers held in a list attribute, and a Dropout with its seed generator:
    both are invisible to tf.train.Checkpoint without ckptkit._compat."""

    def __init__(self, hidden=8, classes=3, dropout=0.2):
        super().__init__()
        self.blocks = [
            tf.keras.layers.Dense(hidden, activation="relu"),
            tf.keras.layers.Dense(hidden, activation="relu"),
        ]
        self.drop = tf.keras.layers.Dropout(dropout)
        self.head = tf.keras.layers.Dense(classes)

    def call(self, x, training=False):
        for block in self.blocks:
            x = self.drop(block(x), training=training)
        return self.head(x)


@contextlib.contextmanager
def small_tmpfs(path, size, *options):
    """A tmpfs of ``size`` (with mount ``options``, e.g. ``nr_inodes=40``) mounted at ``path``."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    os.makedirs(path, exist_ok=True)
    opts = ",".join((f"size={size}",) + options)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)])


# At interpreter exit TensorFlow destroys every tf.data iterator the tests left alive, and
# each destructor waits for the iterator's worker threads: measured 5-66 s after one test
# file, and over 10 minutes after the whole suite (the main thread blocked in
# RootDataset::Iterator::~Iterator, py-spy --native). The results are reported by then, so
# the test process ends as soon as pytest is done, with pytest's own exit status.
_exit_status = {}


def pytest_sessionfinish(session, exitstatus):
    _exit_status["code"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if "code" in _exit_status and not os.environ.get("CKPTKIT_TESTS_NORMAL_EXIT"):
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status["code"])
