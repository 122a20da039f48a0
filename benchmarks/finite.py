"""Section 1c of benchmarks/run.py: the finite-weights check before each save."""

from __future__ import annotations

import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
from harness import run_alternating  # noqa: E402
from overhead import big_model  # noqa: E402
from workload_loop import make_step, mlp, small_data  # noqa: E402


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
