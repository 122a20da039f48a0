"""ckptkit against what users would otherwise write, side by side in one run.

    python benchmarks/run.py [--quick] [--reps 3] [--json out.json] [--threads N] [--device auto|cpu|gpu]
                             [--only loop,savecost,savegap,position,finite,overhead,io,resume,d2h]

1. loop      steps/s of a small MLP (64 inputs, batch 64, data shuffled every epoch with
             ckptkit.data.shuffle): a hand-written tf.function step in a Python loop, the same
             with 100 steps fused in one tf.function, Keras fit with steps_per_execution 1 and
             100, and the ckptkit Trainer at its defaults, at steps_per_loop=1, without
             periodic saves, with a 4096-element shuffle buffer and with synchronous saves
             (saving every 1000 steps);
             peers saving every 1000 steps too: Keras fit with BackupAndRestore +
             ModelCheckpoint, and orbit's Controller with a CheckpointManager (when orbit
             imports: pip install --no-deps tf-models-official).
   savecost  where one save of that trainer goes: the data iterator's snapshot, the blocking
             save() call, and a complete save with and without the data iterator (wall and
             CPU time, writer thread included).
   savegap   a periodic save inside the Trainer's loop, async and sync: the time between the
             loop calls around it, and how much longer the next loop call takes.
   position  (benchmarks/position.py) the data position's bytes and snapshot time against the
             example size (4 B, 4 kB, 400 kB) and the dataset size, saved symbolically (the
             Trainer's way) and with its buffers; target: <= 4 kB and <= 1 ms per save.
   finite    the check that every weight is finite, which the Trainer runs before each save
             (one fused reduction, one read to the host), against one bare synchronous
             Checkpoint.write of the same variables: the large model of 2. and workload 1's
             MLP with its Adam slots.
2. overhead  training throughput of a large model (--mb of float32 variables, SGD) saving every
             few seconds, as a fraction of the same loop without checkpoints: ckptkit async,
             ckptkit sync, a hand-written loop with tf.train.CheckpointManager.save, Keras fit
             with ModelCheckpoint(save_weights_only); and the blocking time per save.
3. io        save and restore of the same variables: ckptkit vs bare tf.train.Checkpoint
             write/read vs the disk's own sequential write (+fsync) and read of that many bytes.
4. resume    seconds from process start to the first training step of a resumed run: ckptkit
             vs a hand-written script restoring with tf.train.CheckpointManager.
5. d2h       (with --device gpu, or named in --only) GB/s of the part of an async save that
             blocks training, against a plain device-to-host copy of the same variables and
             the finite check alone. Without a GPU, --device gpu prints "no GPU" and stops;
             --only d2h then copies host to host, which checks the code, not a GPU.

The issue's targets are printed under their tables as met or MISSED (and stored in --json).

Contenders alternate within each repetition; the table shows medians, ratios, and the spread
of the repetitions (half their range over the median: how noisy the machine was). ``--quick``
shrinks every workload to a smoke run (CI runs it to check the script works, not its numbers).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import ckptkit  # noqa: E402
from ckptkit.metadata import fsync_checkpoint  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


# --- workload 1: loop speed ----------------------------------------------------------------


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


def timed_fit(trainer: ckptkit.Trainer, warmup: int) -> float:
    """Steps/s of fit() from the first loop call that passes ``warmup`` to the end of the
    loop: everything between loop calls (logging, policies, saves) counts."""
    trainer.build()
    inner, marks, done = trainer._train_fn, [], [0]

    def timed(n):  # no extra device reads per call: the hand-written loops make none either
        out = inner(n)
        done[0] += n
        marks.append((time.perf_counter(), done[0]))
        return out

    trainer._train_fn = timed
    trainer.fit()
    start = next(m for m in marks if m[1] >= warmup)
    return (marks[-1][1] - start[1]) / (marks[-1][0] - start[0])


def ckptkit_loop(steps, warmup, steps_per_loop, tmp, save_every=1000, shuffle="global", async_save=True):
    """Checkpointing on (a save every 1000 steps); the warm-up includes the first two saves,
    whose async copy functions TensorFlow traces once per process (the second save's trace
    alone cost 50-90 ms here), as the loop's tracing is once."""
    warmup += 2 * (save_every or 0)
    cfg = {
        "name": "bench",
        "run_dir": tempfile.mkdtemp(dir=tmp),
        "trainer": {
            "max_steps": warmup + steps,
            "steps_per_loop": steps_per_loop,
            "eval_every_steps": None,
            "log_every_steps": 1000,
            "progress": "log",
        },
        "checkpoint": {"save_every_steps": save_every, "async_save": async_save},
        "export": {"enabled": False},
        "bench": {"shuffle": shuffle},
    }
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


# --- workload 2: checkpoint overhead --------------------------------------------------------


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
    cfg = {
        "name": "bench",
        "run_dir": tempfile.mkdtemp(dir=tmp),
        "trainer": {
            "max_steps": warmup + steps,
            "steps_per_loop": 10,
            "eval_every_steps": None,
            "log_every_steps": 10_000,
            "progress": "log",
        },
        "checkpoint": {
            "save_every_steps": save_every if mode != "none" else None,
            "async_save": mode == "async",
            "max_to_keep": 2,
        },
        "export": {"enabled": False},
        "bench": {"mb": mb, "width": width},
    }
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


# --- workload 3: save and restore throughput ------------------------------------------------


def bench_io(args, tmp):
    mb = 16 if args.quick else args.mb
    n = mb * 2**20 // 4 // 8
    variables = [tf.Variable(tf.random.normal([n])) for _ in range(8)]
    nbytes = sum(v.numpy().nbytes for v in variables)
    bare = tf.train.Checkpoint(v=variables)
    kit = ckptkit.Checkpointer(tempfile.mkdtemp(dir=tmp), async_save=False, max_to_keep=1, v=variables)
    payload = os.urandom(1 << 20)
    counter = iter(range(1, 10_000))

    def bare_write():  # written and fsync'd, as ckptkit's saves are
        t0 = time.perf_counter()
        path = bare.write(os.path.join(tmp, "bare", "ckpt"))
        fsync_checkpoint(path)
        return nbytes / (time.perf_counter() - t0) / 2**20

    def bare_read():
        uncached()
        t0 = time.perf_counter()
        bare.read(os.path.join(tmp, "bare", "ckpt")).assert_consumed()
        return nbytes / (time.perf_counter() - t0) / 2**20

    def kit_write():
        t0 = time.perf_counter()
        kit.save(next(counter))
        kit.wait()
        return nbytes / (time.perf_counter() - t0) / 2**20

    def kit_read():
        uncached()
        t0 = time.perf_counter()
        kit.restore_latest(assert_consumed=True)
        return nbytes / (time.perf_counter() - t0) / 2**20

    def disk_write():
        path = os.path.join(tmp, "disk.bin")
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            for _ in range(nbytes >> 20):
                f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        return nbytes / (time.perf_counter() - t0) / 2**20

    def disk_read():
        uncached()
        t0 = time.perf_counter()
        with open(os.path.join(tmp, "disk.bin"), "rb") as f:
            while f.read(8 << 20):
                pass
        return nbytes / (time.perf_counter() - t0) / 2**20

    bare_write(), kit_write()  # warm-up: the first save traces
    print(
        "  reads "
        + (
            "from disk (page cache dropped before each)"
            if uncached()
            else "from the page cache (dropping it needs root: /proc/sys/vm/drop_caches)"
        )
    )
    contenders = {
        "disk write+fsync": disk_write,
        "bare Checkpoint.write+fsync": bare_write,
        "ckptkit save (sync, wait)": kit_write,
        "disk read": disk_read,
        "bare Checkpoint.read": bare_read,
        "ckptkit restore": kit_read,
    }
    return run_alternating(contenders, max(args.reps, 3) if args.quick else max(3 * args.reps, 9), "MB/s")


def uncached() -> bool:
    """Drop the page cache so that reads come from the disk, where permitted."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


# --- where a save's time goes -----------------------------------------------------------------


def bench_savecost(args, tmp):
    """One async save of the workload-1 trainer (model, Adam, global step, the data iterator
    over ckptkit.data.shuffle), taken apart: wall time and CPU time of the whole process (the
    writer thread included) per save, with and without the data iterator; and the snapshot
    of the same data position with a 4096-element shuffle buffer (Dataset.shuffle)."""
    warm = {
        "name": "bench",
        "run_dir": tempfile.mkdtemp(dir=tmp),
        "trainer": {"max_steps": 1, "steps_per_loop": 100, "eval_every_steps": None, "progress": "log"},
        "export": {"enabled": False},
    }
    trainer = MLPTrainer(warm)
    trainer.build()
    trainer._train_fn(100)
    full = trainer.checkpointer
    bare = ckptkit.Checkpointer(
        tempfile.mkdtemp(dir=tmp), model=trainer.model, optimizer=trainer.optimizer, global_step=trainer.global_step
    )
    counter = iter(range(1, 100_000))

    def timed(fn):
        def go():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3

        return go

    def blocking():
        full.wait()  # the previous save is complete: time the call alone
        return timed(lambda: full.save(next(counter)))()

    for ckpt in (full, bare):  # the first two saves trace TensorFlow's copy functions
        for _ in range(2):
            ckpt.save(next(counter))
            ckpt.wait()
    from ckptkit.iterator_state import IteratorCheckpoint

    buffered = IteratorCheckpoint(iter(small_data(shuffle="buffer")))
    next(buffered.iterator)  # the buffer is full
    contenders = {
        "data snapshot, ckptkit.data.shuffle": timed(full._iterators[0].snapshot),
        "data snapshot, 4096-element buffer": timed(buffered.snapshot),
        "save() call (training blocked)": blocking,
        "save + wait, with the data iterator": timed(lambda: (full.save(next(counter)), full.wait())),
        "save + wait, without the data iterator": timed(lambda: (bare.save(next(counter)), bare.wait())),
    }
    reps = 3 if args.quick else max(args.reps, 3) * 5
    return run_alternating(contenders, reps, "ms", extra="CPU ms")


def bench_savegap(args, tmp):
    """Where a periodic save's time goes in the loop of workload 1: each loop call of the
    Trainer (100 steps) is timed. Per save: the time between the loop calls around it (the
    training thread's part of the save) and how much longer the next call takes than the
    median call (what the save costs while training runs on, e.g. the writer thread's CPU)."""
    steps, every = (600, 200) if args.quick else (5000, 1000)

    def calls(async_save):
        def go():
            cfg = {
                "name": "bench",
                "run_dir": tempfile.mkdtemp(dir=tmp),
                "trainer": {
                    "max_steps": 2 * every + steps,
                    "steps_per_loop": 100,
                    "eval_every_steps": None,
                    "log_every_steps": 1000,
                    "progress": "log",
                },
                "checkpoint": {"save_every_steps": every, "async_save": async_save},
                "export": {"enabled": False},
            }
            trainer = MLPTrainer(cfg)
            trainer.build()
            inner, marks, done = trainer._train_fn, [], [0]

            def timed(n):
                t0 = time.perf_counter()
                out = inner(n)
                done[0] += n
                marks.append((t0, time.perf_counter(), done[0]))
                return out

            trainer._train_fn = timed
            trainer.fit()
            marks = [m for m in marks if m[2] > 2 * every]  # after the warm-up's two saves
            durations = [end - start for start, end, _ in marks]
            typical = statistics.median(durations)
            at_save = [i for i in range(1, len(marks)) if marks[i - 1][2] % every == 0]
            between = statistics.median(marks[i][0] - marks[i - 1][1] for i in at_save) * 1e3
            after = statistics.median(durations[i] - typical for i in at_save) * 1e3
            return between, after

        return go

    contenders = {"async saves (default)": calls(True), "sync saves": calls(False)}
    return run_alternating(contenders, 1 if args.quick else max(args.reps, 3), "ms between", extra="ms next call")


# --- the finite-weights check before a save --------------------------------------------------


def bench_finite(args, tmp):
    from ckptkit.loop import FiniteCheck

    mb = 16 if args.quick else args.mb
    big, _ = big_model(mb)
    mlp_model, opt = mlp(), tf.keras.optimizers.Adam(1e-3)
    make_step(mlp_model, opt)(next(iter(small_data())))  # creates the Adam slots
    cases = {f"{mb} MB model": big.variables, "workload-1 MLP + Adam": [*mlp_model.variables, *opt.variables]}
    contenders = {}
    for label, variables in cases.items():
        check = FiniteCheck(variables)
        check()  # traces
        writer = tf.train.Checkpoint(v=list(variables))
        prefix = tempfile.mkdtemp(dir=tmp) + "/ckpt"

        def timed(fn):
            def go():
                t0 = time.perf_counter()
                fn()
                return (time.perf_counter() - t0) * 1e3

            return go

        contenders[f"{label}: bare Checkpoint.write"] = timed(lambda w=writer, p=prefix: w.write(p))
        contenders[f"{label}: finite check"] = timed(lambda c=check: c())
    reps = 3 if args.quick else max(args.reps, 3) * 3
    return run_alternating(contenders, reps, "ms")


# --- workload 4: resume latency ---------------------------------------------------------------


def bench_resume(args, tmp):
    run_dir = tempfile.mkdtemp(dir=tmp)
    script = os.path.join(HERE, "resume_child.py")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    for kind in ("ckptkit", "manager"):  # first launch: train a little and save
        subprocess.run(
            [sys.executable, script, kind, run_dir, "first"],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def launch(kind):
        def go():
            t0 = time.time()
            out = subprocess.run(
                [sys.executable, script, kind, run_dir, "resume"],
                env=env,
                check=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            ).stdout
            first_step = float([ln for ln in out.splitlines() if ln.startswith("FIRST_STEP ")][-1].split()[1])
            return first_step - t0

        return go

    return run_alternating(
        {"hand-written CheckpointManager restore": launch("manager"), "ckptkit Trainer resume": launch("ckptkit")},
        args.reps,
        "s to 1st step",
    )


# --- 5 (GPU only): what an async save blocks on -------------------------------------------------


def bench_d2h(args, tmp):
    """On a GPU, an async save blocks the training thread while the variables are copied to
    host memory; the write happens after. GB/s of that blocking part against a plain
    device-to-host copy of the same variables (tf.identity onto the CPU), the finite check
    included in ckptkit's figure."""
    mb = 16 if args.quick else args.mb
    model, width = big_model(mb)
    model(tf.zeros([1, width]))
    variables = model.variables
    nbytes = sum(int(tf.size(v)) * tf.as_dtype(v.dtype).size for v in variables)  # Keras 3 names dtypes as strings
    kit = ckptkit.Checkpointer(tempfile.mkdtemp(dir=tmp), async_save=True, max_to_keep=1, model=model)
    from ckptkit.loop import FiniteCheck

    finite = FiniteCheck(list(variables))
    counter = iter(range(1, 10_000))

    def copy():
        t0 = time.perf_counter()
        with tf.device("/CPU:0"):
            host = [tf.identity(v) for v in variables]
        for h in host:
            h.numpy()  # complete
        return nbytes / (time.perf_counter() - t0) / 1e9

    def blocking():
        kit.wait()
        t0 = time.perf_counter()
        finite()
        kit.save(next(counter))
        return nbytes / (time.perf_counter() - t0) / 1e9

    def check():
        t0 = time.perf_counter()
        finite()
        return nbytes / (time.perf_counter() - t0) / 1e9

    for fn in (copy, blocking, blocking, check):  # warm-up: traces and the async machinery
        fn()
    kit.wait()
    result = run_alternating(
        {"device-to-host copy": copy, "ckptkit async save, blocking part": blocking, "finite check alone": check},
        3 if args.quick else max(args.reps, 3) * 3,
        "GB/s",
    )
    kit.close()
    return result


# --- harness ----------------------------------------------------------------------------------


def run_alternating(contenders, reps, unit, extra=None):
    results = {name: [] for name in contenders}
    for _ in range(reps):
        for name, fn in contenders.items():
            results[name].append(fn())
    return {"unit": unit, "extra": extra, "runs": results}


def medians(values):
    if isinstance(values[0], (tuple, list)):
        return statistics.median(v[0] for v in values), statistics.median(v[1] for v in values)
    return statistics.median(values), None


def spread(values) -> float:
    """Half the range of the repetitions, as a fraction of their median (the noise)."""
    main = [v[0] if isinstance(v, (tuple, list)) else v for v in values]
    mid = statistics.median(main)
    return (max(main) - min(main)) / 2 / mid if mid else float("nan")


# The targets: (section, contender, baseline, the least ratio). A ratio is contender
# over baseline in the table's unit; for resume latency (seconds, less is better) the
# contender is the baseline's time, so "at least 0.91" means ckptkit takes at most 1.1x.
TARGETS = [
    ("loop", "ckptkit Trainer, defaults (100/loop)", "hand-written, 100 steps fused", 0.95),
    ("loop", "ckptkit Trainer, steps_per_loop=1", "hand-written step, Python loop", 0.95),
    ("loop", "ckptkit Trainer, defaults (100/loop)", "Keras fit, steps_per_execution=1", 1.5),
    ("overhead", "ckptkit async", "no checkpointing", 0.97),
    ("io", "ckptkit save (sync, wait)", "bare Checkpoint.write+fsync", 0.95),
    ("io", "ckptkit restore", "bare Checkpoint.read", 0.95),
    ("resume", "hand-written CheckpointManager restore", "ckptkit Trainer resume", 1 / 1.1),
]
MAX_SPREAD = {"io": 0.10}  # the io targets also ask for repetitions within 10%


def check_targets(section, data):
    """Print and return how the section's figures compare with their targets."""
    results = []
    for sec, name, baseline, least in TARGETS:
        runs = data["runs"]
        if sec != section or name not in runs or baseline not in runs:
            continue
        ratio = medians(runs[name])[0] / medians(runs[baseline])[0]
        spreads = max(spread(runs[name]), spread(runs[baseline]))
        met = ratio >= least and spreads <= MAX_SPREAD.get(section, float("inf"))
        results.append(
            {"contender": name, "baseline": baseline, "target": least, "ratio": ratio, "spread": spreads, "met": met}
        )
        limit = f", spread <= {MAX_SPREAD[section]:.0%}" if section in MAX_SPREAD else ""
        print(
            f"  target: {name} / {baseline} >= {least:.2f}{limit}: {ratio:.3f} "
            f"(spread {spreads:.0%}) {'met' if met else 'MISSED'}"
        )
    return results


def print_table(title, data, baseline):
    print(f"\n{title}  (median of {len(next(iter(data['runs'].values())))}; ratio vs {baseline!r})")
    base, _ = medians(data["runs"][baseline])
    header = f"  {'contender':44} {data['unit']:>14} {'ratio':>7} {'spread':>7}"
    if data["extra"]:
        header += f" {data['extra']:>16}"
    print(header)
    for name, values in data["runs"].items():
        value, extra = medians(values)
        line = f"  {name:44} {value:14.3f} {value / base:7.3f} {spread(values):6.0%} "
        if data["extra"]:
            line += f" {extra:16.4f}"
        print(line)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny workloads, 1 repetition (smoke run)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--mb", type=int, default=256, help="size of the large model's variables")
    parser.add_argument("--only", default="loop,savecost,savegap,position,finite,overhead,io,resume")
    parser.add_argument("--json", help="write the raw figures here")
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "gpu"),
        default="auto",
        help="gpu: run on the first GPU (and time device-to-host copies), or say "
        "'no GPU' and stop; cpu: hide GPUs; auto: TensorFlow's placement",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="TensorFlow's intra- and inter-op threads (0: one per core); e.g. 1 "
        "on 2 cores leaves a core to the checkpoint writer",
    )
    args = parser.parse_args()
    if args.quick:
        args.reps = 1
    gpus = tf.config.list_physical_devices("GPU")
    if args.device == "gpu" and not gpus:
        print("no GPU: TensorFlow sees none here (tf.config.list_physical_devices('GPU') is empty); nothing measured")
        return
    if args.device == "cpu" and gpus:
        tf.config.set_visible_devices([], "GPU")  # before the first op initializes them
        gpus = []
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    wanted = args.only.split(",")
    if gpus and "d2h" not in wanted and args.device == "gpu":
        wanted.append("d2h")
    device = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU") if gpus else "CPU"
    print(
        f"{os.cpu_count()} cores, TensorFlow {tf.__version__}, running on {device}"
        + (f", {args.threads} TensorFlow threads" if args.threads else "")
    )
    out = {
        "machine": {"cpus": os.cpu_count(), "tensorflow": tf.__version__, "device": device},
        "args": vars(args),
        "targets": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        if "loop" in wanted:
            out["loop"] = bench_loop(args, tmp)
            print_table("1. loop speed, small MLP", out["loop"], "hand-written, 100 steps fused")
            out["targets"] += check_targets("loop", out["loop"])
        if "savecost" in wanted:
            out["savecost"] = bench_savecost(args, tmp)
            print_table(
                "1b. where one save of workload 1 goes", out["savecost"], "save + wait, without the data iterator"
            )
        if "savegap" in wanted:
            out["savegap"] = bench_savegap(args, tmp)
            print_table(
                "1d. a periodic save in the loop of workload 1",
                out["savegap"],
                "async saves (default)",
            )
        if "position" in wanted:
            from position import bench_position, print_position

            out["position"] = bench_position(args)
            out["targets"] += print_position(out["position"])
        if "finite" in wanted:
            out["finite"] = bench_finite(args, tmp)
            mb = 16 if args.quick else args.mb
            print_table(
                "1c. the finite-weights check before each save", out["finite"], f"{mb} MB model: bare Checkpoint.write"
            )
        if "overhead" in wanted:
            out["overhead"] = bench_overhead(args, tmp)
            print_table(
                f"2. checkpoint overhead, {16 if args.quick else args.mb} MB model", out["overhead"], "no checkpointing"
            )
            out["targets"] += check_targets("overhead", out["overhead"])
        if "io" in wanted:
            out["io"] = bench_io(args, tmp)
            print_table(
                f"3. save/restore throughput, {16 if args.quick else args.mb} MB",
                out["io"],
                "bare Checkpoint.write+fsync",
            )
            out["targets"] += check_targets("io", out["io"])
        if "resume" in wanted:
            out["resume"] = bench_resume(args, tmp)
            print_table("4. resume latency", out["resume"], "hand-written CheckpointManager restore")
            out["targets"] += check_targets("resume", out["resume"])
        if "d2h" in wanted:
            if not gpus:
                print("\n  (no GPU: section 5 copies host to host here; its figures check the code, not a GPU)")
            out["d2h"] = bench_d2h(args, tmp)
            print_table(
                f"5. {'GPU' if gpus else 'CPU'}: blocking part of an async save vs the device-to-host copy",
                out["d2h"],
                "device-to-host copy",
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
