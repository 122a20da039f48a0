"""Section 2 of benchmarks/run.py: training throughput of a large model saving every few
seconds, against the same loop without checkpoints and the peers' ways of saving."""

from __future__ import annotations

import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
from harness import bench_cfg, run_alternating  # noqa: E402
from workload_loop import timed_fit  # noqa: E402

import ckptkit  # noqa: E402


def big_model(mb):
    width = int((mb * 2**20 / 4 / 4) ** 0.5)  # four square layers of float32
    return tf.keras.Sequential(
        [tf.keras.Input((width,))] + [tf.keras.layers.Dense(width, use_bias=False) for _ in range(4)]
    ), width


def big_data(width):
    x = tf.random.stateless_normal([8, width], seed=[1, 2])
    return tf.data.Dataset.from_tensors((x, x)).repeat()


class BigTrainer(ckptkit.Trainer):
    def build_model(self):
        return big_model(self.cfg.bench.mb)[0]

    def build_optimizer(self):
        return tf.keras.optimizers.SGD(1e-6)

    def train_dataset(self):
        return big_data(self.cfg.bench.width)

    def train_step(self, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(self.model(x) - y))
        grads = tape.gradient(loss, self.model.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables, strict=True))
        return {"loss": loss}


def overhead_ckptkit(steps, warmup, save_every, mb, width, tmp, mode):
    cfg = bench_cfg(
        tempfile.mkdtemp(dir=tmp),
        max_steps=warmup + steps,
        steps_per_loop=10,
        log_every_steps=10_000,
        checkpoint={
            "save_every_steps": save_every if mode != "none" else None,
            "async_save": mode == "async",
            "max_to_keep": 2,
        },
        bench={"mb": mb, "width": width},
    )
    trainer = BigTrainer(cfg)  # "none": no periodic save; the final one comes after the timing
    rate = timed_fit(trainer, warmup)
    if mode == "none":
        return rate, float("nan")
    blocking = [
        c.blocking_seconds for c in trainer.checkpointer.checkpoints if c.blocking_seconds and c.step < warmup + steps
    ]  # not the final save
    return rate, (statistics.median(blocking) if blocking else float("nan"))


def overhead_manager(steps, warmup, save_every, mb, tmp):
    model, width = big_model(mb)
    opt = tf.keras.optimizers.SGD(1e-6)
    it = iter(big_data(width))

    @tf.function
    def run(n):
        for _ in tf.range(n):
            x, y = next(it)
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(x) - y))
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(model=model, optimizer=opt), tempfile.mkdtemp(dir=tmp), max_to_keep=2
    )
    run(tf.constant(warmup)).numpy()
    blocks = []
    t0 = time.perf_counter()
    for done in range(10, steps + 1, 10):
        run(tf.constant(10)).numpy()
        if done % save_every == 0:
            b0 = time.perf_counter()
            manager.save(checkpoint_number=done)
            blocks.append(time.perf_counter() - b0)
    return steps / (time.perf_counter() - t0), statistics.median(blocks) if blocks else 0.0


def overhead_keras(steps, warmup, save_every, mb, tmp):
    model, width = big_model(mb)
    model.compile(optimizer=tf.keras.optimizers.SGD(1e-6), loss="mse", steps_per_execution=10)
    ds = big_data(width)
    model.fit(ds, steps_per_epoch=warmup, epochs=1, verbose=0)
    path = os.path.join(tempfile.mkdtemp(dir=tmp), "w.weights.h5")
    cb = tf.keras.callbacks.ModelCheckpoint(path, save_weights_only=True, save_freq=save_every)
    t0 = time.perf_counter()
    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=[cb])
    return steps / (time.perf_counter() - t0), float("nan")


def bench_overhead(args, tmp):
    mb = 16 if args.quick else args.mb
    steps, warmup, save_every = (40, 10, 20) if args.quick else (300, 20, 50)
    width = big_model(mb)[1]
    contenders = {
        "no checkpointing": lambda: overhead_ckptkit(steps, warmup, save_every, mb, width, tmp, "none"),
        "ckptkit async": lambda: overhead_ckptkit(steps, warmup, save_every, mb, width, tmp, "async"),
        "ckptkit sync": lambda: overhead_ckptkit(steps, warmup, save_every, mb, width, tmp, "sync"),
        "hand loop + CheckpointManager.save": lambda: overhead_manager(steps, warmup, save_every, mb, tmp),
        "Keras fit + ModelCheckpoint(weights)": lambda: overhead_keras(steps, warmup, save_every, mb, tmp),
    }
    return run_alternating(contenders, args.reps, "steps/s", extra="blocking s/save")
