"""Section 5 of benchmarks/run.py: the blocking part of an async save against a plain
device-to-host copy (host to host without a GPU)."""

from __future__ import annotations

import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
from harness import run_alternating  # noqa: E402
from overhead import big_model  # noqa: E402

import ckptkit  # noqa: E402


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
