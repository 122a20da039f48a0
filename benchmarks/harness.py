"""The benchmarks' shared harness: alternating repetitions, medians, spreads, the tables and
the targets each section is checked against."""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def disk_write_seconds(path, nbytes, payload):
    """The disk's own sequential write of ``nbytes`` (``payload``, 1 MB, over and over) to
    ``path``, then fsync: the seconds it took."""
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(nbytes >> 20):
            f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def bench_cfg(run_dir, *, max_steps, steps_per_loop, log_every_steps, checkpoint, bench=None):
    """The Trainer config every benchmark run uses: no eval, no export, log-only progress."""
    cfg = {
        "name": "bench",
        "run_dir": run_dir,
        "trainer": {
            "max_steps": max_steps,
            "steps_per_loop": steps_per_loop,
            "eval_every_steps": None,
            "log_every_steps": log_every_steps,
            "progress": "log",
        },
        "checkpoint": checkpoint,
        "export": {"enabled": False},
    }
    if bench is not None:
        cfg["bench"] = bench
    return cfg


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
