"""Section 1 of benchmarks/run.py: loop speed of a small MLP, ckptkit against a hand-written
loop, Keras fit and orbit's Controller (the workload the other sections of 1 reuse)."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from harness import bench_cfg, run_alternating  # noqa: E402

import ckptkit  # noqa: E402


def mlp(hidden=(256, 256), classes=10):
    return tf.keras.Sequential(
        [tf.keras.Input((64,))]
        + [tf.keras.layers.Dense(h, activation="relu") for h in hidden]
        + [tf.keras.layers.Dense(classes)]
    )


def small_data(batch=64, shuffle="global"):
    """4096 examples, shuffled every epoch: ``global`` with ckptkit.data.shuffle (a saved
    position is an index and a seed), ``buffer`` with Dataset.shuffle(4096) (a saved position
    holds the 4096-element buffer)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4096, 64)).astype("float32")
    y = rng.integers(0, 10, size=4096).astype("int32")
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    ds = ckptkit.data.shuffle(ds, seed=0) if shuffle == "global" else ds.shuffle(4096, seed=0)
    return ds.batch(batch, drop_remainder=True).repeat()


def make_step(model, opt):
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def step(batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    return step


def hand_loop(steps, warmup, fused):
    model, opt = mlp(), tf.keras.optimizers.Adam(1e-3)
    it = iter(small_data())
    step = make_step(model, opt)
    if fused:

        @tf.function
        def run(n):
            for _ in tf.range(n):
                loss = step(next(it))
            return loss

        run(tf.constant(warmup)).numpy()
        t0 = time.perf_counter()
        for _ in range(steps // 100):
            run(tf.constant(100))
        run(tf.constant(1)).numpy()
        return (steps // 100 * 100 + 1) / (time.perf_counter() - t0)
    one = tf.function(lambda: step(next(it)))
    for _ in range(warmup):
        one()
    one().numpy()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = one()
    loss.numpy()
    return steps / (time.perf_counter() - t0)


def keras_fit(steps, warmup, spe, tmp=None, save_every=None):
    """Keras fit; with ``save_every``, also what a Keras user writes for resumable runs:
    BackupAndRestore(save_freq) plus ModelCheckpoint(save_freq), both every ``save_every``
    steps (a warm-up run writes the first ones)."""
    model = mlp()
    model.compile(
        optimizer=tf.keras.optimizers.Adam(1e-3),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=spe,
    )
    ds = small_data()
    callbacks = []
    if save_every:
        where = tempfile.mkdtemp(dir=tmp)
        callbacks = [
            tf.keras.callbacks.BackupAndRestore(
                os.path.join(where, "backup"), save_freq=save_every, delete_checkpoint=False
            ),
            tf.keras.callbacks.ModelCheckpoint(os.path.join(where, "model-{epoch}.keras"), save_freq=save_every),
        ]
    model.fit(ds, steps_per_epoch=max(warmup, spe, save_every or 0), epochs=1, verbose=0, callbacks=callbacks)
    t0 = time.perf_counter()
    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=callbacks)
    return steps / (time.perf_counter() - t0)


def orbit_loop(steps, warmup, tmp, save_every):
    """TF Model Garden's orbit: a StandardTrainer (100 steps per tf.function call, as the
    ckptkit default) driven by a Controller with a tf.train.CheckpointManager saving every
    ``save_every`` steps (model, optimizer, global step: not the data position)."""
    import orbit
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbit logs every loop and save at INFO
    model, opt = mlp(), tf.keras.optimizers.Adam(1e-3)
    step_fn = make_step(model, opt)

    class Trainer(orbit.StandardTrainer):
        def __init__(self):
            self.global_step = orbit.utils.create_global_step()
            super().__init__(small_data(), options=orbit.StandardTrainerOptions(use_tf_while_loop=True))

        def train_step(self, iterator):
            step_fn(next(iterator))
            self.global_step.assign_add(1)  # orbit leaves the count to the trainer

    trainer = Trainer()
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(model=model, optimizer=opt, global_step=trainer.global_step),
        tempfile.mkdtemp(dir=tmp),
        max_to_keep=3,
        step_counter=trainer.global_step,
        checkpoint_interval=save_every,
    )
    first = warmup + save_every
    with contextlib.redirect_stdout(io.StringIO()):  # the Controller also prints each loop and save
        controller = orbit.Controller(
            trainer=trainer, global_step=trainer.global_step, steps_per_loop=100, checkpoint_manager=manager
        )
        controller.train(first)
        t0 = time.perf_counter()
        controller.train(first + steps)
        return steps / (time.perf_counter() - t0)


def orbit_missing():
    try:
        import orbit  # noqa: F401
    except ImportError as exc:
        return (
            f"orbit is not installed ({exc}): tf-models-official 2.20 requires "
            f"tensorflow~=2.20 (here {tf.__version__}); its orbit package needs only "
            "TensorFlow: pip install --no-deps tf-models-official"
        )
    return None


class MLPTrainer(ckptkit.Trainer):
    def build_model(self):
        return mlp()

    def build_optimizer(self):
        return tf.keras.optimizers.Adam(1e-3)

    def train_dataset(self):
        return small_data(shuffle=self.cfg.get("bench", {}).get("shuffle", "global"))

    def train_step(self, batch):
        return {"loss": make_step(self.model, self.optimizer)(batch)}


def mark_calls(trainer: ckptkit.Trainer) -> list[tuple[float, int]]:
    """Build ``trainer`` and record (time, steps done) after each of its loop calls, into the
    list returned (no extra device reads per call: the hand-written loops make none either)."""
    trainer.build()
    inner, marks, done = trainer._train_fn, [], [0]

    def timed(n):
        out = inner(n)
        done[0] += int(n)
        marks.append((time.perf_counter(), done[0]))
        return out

    trainer._train_fn = timed
    return marks


def timed_fit(trainer: ckptkit.Trainer, warmup: int) -> float:
    """Steps/s of fit() from the first loop call that passes ``warmup`` to the end of the
    loop: everything between loop calls (logging, policies, saves) counts."""
    marks = mark_calls(trainer)
    trainer.fit()
    start = next(m for m in marks if m[1] >= warmup)
    return (marks[-1][1] - start[1]) / (marks[-1][0] - start[0])


def ckptkit_loop(steps, warmup, steps_per_loop, tmp, save_every=1000, shuffle="global", async_save=True):
    """Checkpointing on (a save every 1000 steps); the warm-up includes the first two saves,
    whose async copy functions TensorFlow traces once per process (the second save's trace
    alone cost 50-90 ms here), as the loop's tracing is once."""
    warmup += 2 * (save_every or 0)
    cfg = bench_cfg(
        tempfile.mkdtemp(dir=tmp),
        max_steps=warmup + steps,
        steps_per_loop=steps_per_loop,
        log_every_steps=1000,
        checkpoint={"save_every_steps": save_every, "async_save": async_save},
        bench={"shuffle": shuffle},
    )
    return timed_fit(MLPTrainer(cfg), warmup)


def bench_loop(args, tmp):
    steps = 300 if args.quick else 5000
    warmup = 100
    every = 100 if args.quick else 1000
    contenders = {
        "hand-written step, Python loop": lambda: hand_loop(steps, warmup, fused=False),
        "hand-written, 100 steps fused": lambda: hand_loop(steps, warmup, fused=True),
        "Keras fit, steps_per_execution=1": lambda: keras_fit(steps, warmup, 1),
        "Keras fit, steps_per_execution=100": lambda: keras_fit(steps, warmup, 100),
        "ckptkit Trainer, defaults (100/loop)": lambda: ckptkit_loop(steps, warmup, 100, tmp, every),
        "ckptkit Trainer, steps_per_loop=1": lambda: ckptkit_loop(steps, warmup, 1, tmp, every),
        "ckptkit Trainer, defaults, no periodic save": lambda: ckptkit_loop(steps, warmup, 100, tmp, None),
        "ckptkit Trainer, defaults, buffered shuffle": lambda: ckptkit_loop(
            steps, warmup, 100, tmp, every, shuffle="buffer"
        ),
        "ckptkit Trainer, defaults, sync saves": lambda: ckptkit_loop(steps, warmup, 100, tmp, every, async_save=False),
        "Keras fit (100/exec) + BackupAndRestore": lambda: keras_fit(steps, warmup, 100, tmp, every),
    }
    missing = orbit_missing()
    if missing:
        print(f"  (no orbit row: {missing})")
    else:
        contenders["orbit Controller + CheckpointManager"] = lambda: orbit_loop(steps, warmup, tmp, every)
    return run_alternating(contenders, args.reps, "steps/s")
