"""Section 1e of benchmarks/run.py: the data position against example and dataset size.

For each example size (4 B, 4 kB, 400 kB) and dataset size, the pipeline a user writes
(tensor slices -> ckptkit.data.shuffle -> map(num_parallel_calls) -> batch(16) -> repeat ->
prefetch(AUTOTUNE)) runs a few batches; then the iterator's position is snapshotted, as each
save does, and serialized, as the checkpoint stores it. Rows: the Trainer's way (symbolic
checkpointing, ckptkit.data_position.prepare) and the same pipeline saved with its buffers.
Target, for the Trainer's way: at most 4 kB and 1 ms per save, whatever both sizes are.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import tensorflow as tf

import ckptkit
from ckptkit import data_position

MAX_BYTES, MAX_MS = 4_000, 1.0


def _pipeline(examples: int, floats: int, symbolic: bool) -> tf.data.Dataset:
    x = np.random.default_rng(0).normal(size=(examples, floats)).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices(x)
    ds = ckptkit.data.shuffle(ds, seed=0)
    ds = ds.map(lambda v: v * 2.0, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(16, drop_remainder=True).repeat().prefetch(tf.data.AUTOTUNE)
    if symbolic:
        ds, on = data_position.prepare(ds)
        assert on
    return ds


def measure(examples: int, floats: int, symbolic: bool, reps: int) -> dict:
    it = iter(_pipeline(examples, floats, symbolic))
    for _ in range(3):
        next(it)
    time.sleep(0.2)  # prefetch fills its buffer, as between two saves
    times, state = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        state = it._serialize_to_tensors()
        times.append((time.perf_counter() - t0) * 1e3)
        next(it)
    assert state is not None
    return {
        "bytes": data_position.position_bytes(state),
        "snapshot_ms": statistics.median(times),
        "spread": (max(times) - min(times)) / max(statistics.median(times), 1e-9),
    }


def bench_position(args) -> dict:
    sizes = [(1, "4 B"), (1_000, "4 kB"), (100_000, "400 kB")]
    counts = [96, 960] if args.quick else [96, 960, 4096]
    reps = 5 if args.quick else 21
    rows = []
    for floats, label in sizes:
        for n in counts:
            if floats * n * 4 > 2e9:
                continue  # 4096 examples of 400 kB: 1.6 GB of data in memory
            for symbolic in (True, False):
                r = measure(n, floats, symbolic, reps)
                rows.append({"example": label, "examples": n, "symbolic": symbolic, **r})
    return {"rows": rows, "max_bytes": MAX_BYTES, "max_ms": MAX_MS}


def print_position(data: dict) -> list[dict]:
    print("\n1e. the data position against example and dataset size  (median snapshot of the reps)")
    print(f"  {'example':>8} {'examples':>9} {'saved as':>10} {'bytes':>12} {'snapshot ms':>12} {'spread':>7}")
    for r in data["rows"]:
        how = "symbolic" if r["symbolic"] else "buffers"
        print(
            f"  {r['example']:>8} {r['examples']:>9} {how:>10} {r['bytes']:>12,} "
            f"{r['snapshot_ms']:>12.3f} {r['spread']:>6.0%}"
        )
    mine = [r for r in data["rows"] if r["symbolic"]]
    worst_bytes = max(r["bytes"] for r in mine)
    worst_ms = max(r["snapshot_ms"] for r in mine)
    met = worst_bytes <= data["max_bytes"] and worst_ms <= data["max_ms"]
    print(
        f"  target: ckptkit.data.shuffle (symbolic) <= {data['max_bytes']} bytes and <= {data['max_ms']} ms "
        f"per save at every size: worst {worst_bytes} bytes, {worst_ms:.3f} ms {'met' if met else 'MISSED'}"
    )
    return [{"contender": "data position", "bytes": worst_bytes, "ms": worst_ms, "met": met}]
