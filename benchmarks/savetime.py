"""Sections 1b and 1d of benchmarks/run.py: where one save of workload 1 goes, and a
periodic save inside the Trainer's loop."""

from __future__ import annotations

import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


from harness import run_alternating  # noqa: E402
from workload_loop import MLPTrainer, small_data  # noqa: E402

import ckptkit  # noqa: E402


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
