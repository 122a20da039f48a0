"""Section 7 of benchmarks/run.py: what one save costs as the model grows (64 MB to 2 GB of
float32 variables, 32 variables a model), side by side at each size:

- the disk's own sequential write of that many bytes, then fsync;
- a bare ``tf.train.Checkpoint.write``, then fsync of its files (as ckptkit's saves are);
- the same with TensorFlow's sharding (``tf.train.CheckpointOptions``
  ``experimental_sharding_callback=MaxShardSizePolicy``, 4 shards): several data files,
  which TensorFlow may write at once;
- ckptkit's synchronous save (``save`` + ``wait``), and its asynchronous one: the part that
  blocks training, and the whole save until the files are complete.

Each figure is in MB/s of variables (for the blocking part: seconds). Target: ckptkit's save
at 1 GB at least 0.9x a bare ``Checkpoint.write``.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
from harness import disk_write_seconds  # noqa: E402

import ckptkit  # noqa: E402
from ckptkit.metadata import fsync_checkpoint  # noqa: E402

N_VARIABLES = 32
TARGET = ("ckptkit sync save", "bare Checkpoint.write", 1024, 0.9)


def _model(mb: int) -> list[tf.Variable]:
    n = mb * 2**20 // 4 // N_VARIABLES
    return [tf.Variable(tf.random.stateless_normal([n], seed=[i, 0])) for i in range(N_VARIABLES)]


def _contenders(mb: int, tmp: str) -> dict:
    variables = _model(mb)
    nbytes = sum(v.shape.num_elements() * 4 for v in variables)
    bare = tf.train.Checkpoint(v=variables)
    sharded = tf.train.CheckpointOptions(
        experimental_sharding_callback=tf.train.experimental.MaxShardSizePolicy(max_shard_size=nbytes // 4 + 1)
    )
    sync_kit = ckptkit.Checkpointer(tempfile.mkdtemp(dir=tmp), async_save=False, max_to_keep=1, v=variables)
    async_kit = ckptkit.Checkpointer(tempfile.mkdtemp(dir=tmp), async_save=True, max_to_keep=1, v=variables)
    steps = iter(range(1, 10**6))
    payload = os.urandom(1 << 20)

    def mbps(seconds):
        return nbytes / seconds / 2**20

    def disk():
        path = os.path.join(tmp, "disk.bin")
        seconds = disk_write_seconds(path, nbytes, payload)
        os.remove(path)
        return mbps(seconds)

    def bare_write(options=None, name="bare"):
        t0 = time.perf_counter()
        path = bare.write(os.path.join(tmp, name, "ckpt"), options=options)
        fsync_checkpoint(path)
        return mbps(time.perf_counter() - t0)

    def kit(ckpt):
        t0 = time.perf_counter()
        ckpt.save(next(steps))
        blocking = time.perf_counter() - t0
        ckpt.wait()
        return mbps(time.perf_counter() - t0), blocking

    return {
        "disk write + fsync": disk,
        "bare Checkpoint.write": bare_write,
        "bare Checkpoint.write, 4 shards": lambda: bare_write(sharded, "sharded"),
        "ckptkit sync save": lambda: kit(sync_kit)[0],
        "ckptkit async save (whole)": lambda: kit(async_kit),
    }, (sync_kit, async_kit)


def bench_growth(args, tmp) -> dict:
    sizes = (8, 16) if args.quick else tuple(int(s) for s in args.growth_sizes.split(","))
    rows = {}
    for mb in sizes:
        contenders, kits = _contenders(mb, tmp)
        for fn in contenders.values():  # warm-up: traces (TensorFlow traces an async save's copy
            fn()  # on its first and its second save), first files, page cache
            fn()
        runs: dict[str, list] = {name: [] for name in contenders}
        for _ in range(args.reps):
            for name, fn in contenders.items():
                runs[name].append(fn())
        for k in kits:
            k.close()
        rows[mb] = runs
        del contenders, kits
    _print(rows, args)
    return {"sizes": list(rows), "runs": {str(mb): runs for mb, runs in rows.items()}}


def _print(rows, args):
    print(f"\n7. one save as the model grows  (MB/s of variables, median of {args.reps}; ratio vs bare write)")
    names = list(next(iter(rows.values())))
    print(f"  {'contender':34} " + " ".join(f"{str(mb) + ' MB':>16}" for mb in rows))
    for name in names:
        cells = []
        for runs in rows.values():
            values = [v[0] if isinstance(v, tuple) else v for v in runs[name]]
            base = statistics.median(runs["bare Checkpoint.write"])
            cells.append(f"{statistics.median(values):8.0f} {statistics.median(values) / base:6.2f}x")
        print(f"  {name:34} " + " ".join(f"{c:>16}" for c in cells))
    blocking = [statistics.median(v[1] for v in runs["ckptkit async save (whole)"]) for runs in rows.values()]
    print(f"  {'ckptkit async: training blocked s':34} " + " ".join(f"{b:16.3f}" for b in blocking))


def growth_targets(out: dict) -> list[dict]:
    name, baseline, mb, least = TARGET
    runs = out["runs"].get(str(mb))
    if runs is None:
        return []
    ratio = statistics.median(runs[name]) / statistics.median(runs[baseline])
    met = ratio >= least
    print(f"  target: {name} / {baseline} at {mb} MB >= {least}: {ratio:.3f} {'met' if met else 'MISSED'}")
    return [{"contender": name, "baseline": baseline, "target": least, "ratio": ratio, "met": met}]
