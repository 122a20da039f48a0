"""How long a checkpoint save holds up training: ckptkit async vs ckptkit sync vs a bare
``tf.train.Checkpoint.write``, on the same variables, alternating contenders, medians.

    python benchmarks/save_blocking.py [--mb 128] [--reps 5] [--quick]

Prints, per contender, the median time save() blocked the caller and the median time
until the checkpoint was complete on disk, and the ratios against the bare synchronous write.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

import ckptkit  # noqa: E402


def make_variables(mb: int):
    n = mb * 1024 * 1024 // 4 // 8
    return [tf.Variable(tf.random.normal([n])) for _ in range(8)]


def bare_write(ckpt, directory, step):
    t0 = time.perf_counter()
    ckpt.write(os.path.join(directory, f"ckpt-{step}"))
    blocked = time.perf_counter() - t0
    return blocked, blocked


def ckptkit_save(checkpointer, step):
    t0 = time.perf_counter()
    checkpointer.save(step)
    blocked = time.perf_counter() - t0
    checkpointer.wait()
    return blocked, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=128, help="size of the variables in MB")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="8 MB, 2 repetitions (smoke run)")
    parser.add_argument("--json", help="write the raw figures here")
    args = parser.parse_args()
    if args.quick:
        args.mb, args.reps = 8, 2
    variables = make_variables(args.mb)
    results = {"bare tf.train.Checkpoint.write": [], "ckptkit sync": [], "ckptkit async": []}
    with tempfile.TemporaryDirectory() as tmp:
        sync = ckptkit.Checkpointer(os.path.join(tmp, "sync"), max_to_keep=1, async_save=False, v=variables)
        async_ = ckptkit.Checkpointer(os.path.join(tmp, "async"), max_to_keep=1, async_save=True, v=variables)
        bare = tf.train.Checkpoint(v=variables)
        bare_write(bare, os.path.join(tmp, "bare"), 0)  # warm-up: the first save traces
        ckptkit_save(sync, 0)
        ckptkit_save(async_, 0)  # first async save also builds TensorFlow's CPU copies
        for rep in range(1, args.reps + 1):
            for v in variables:
                v.assign_add(tf.ones_like(v))
            results["bare tf.train.Checkpoint.write"].append(bare_write(bare, os.path.join(tmp, "bare"), rep))
            results["ckptkit sync"].append(ckptkit_save(sync, rep))
            results["ckptkit async"].append(ckptkit_save(async_, rep))
    base_block = statistics.median(b for b, _ in results["bare tf.train.Checkpoint.write"])
    base_total = statistics.median(t for _, t in results["bare tf.train.Checkpoint.write"])
    print(f"{args.mb} MB of float32 variables, {args.reps} saves each, medians")
    print(f"{'contender':32} {'blocking s':>11} {'vs bare':>8} {'complete s':>11} {'vs bare':>8}")
    for name, runs in results.items():
        block = statistics.median(b for b, _ in runs)
        total = statistics.median(t for _, t in runs)
        print(f"{name:32} {block:11.4f} {block / base_block:8.3f} {total:11.4f} {total / base_total:8.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mb": args.mb, "reps": args.reps, "runs": results}, f, indent=1)


if __name__ == "__main__":
    main()
