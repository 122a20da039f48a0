"""Section 3 of benchmarks/run.py: save and restore throughput against bare
tf.train.Checkpoint and the disk's own sequential write and read."""

from __future__ import annotations

import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
from harness import disk_write_seconds, run_alternating  # noqa: E402

import ckptkit  # noqa: E402
from ckptkit.metadata import fsync_checkpoint  # noqa: E402


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
        return nbytes / disk_write_seconds(os.path.join(tmp, "disk.bin"), nbytes, payload) / 2**20

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
