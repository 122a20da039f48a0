"""Section 8 of benchmarks/run.py: a local tier on tmpfs against the persistent tier alone.

The same model trains with its checkpoints on disk (``checkpoint.dir`` alone) and with a
local tier on ``/dev/shm`` (``checkpoint.local_dir``) that copies a save to the disk every
``persist_every_seconds``. Each run's timeline (section 6's) records when each checkpoint
became complete in each tier; a kill -9 at a random instant loses, on a relaunch on the same
node, the steps since the newest checkpoint complete in either tier, and on a requeue on
another node (whose ``/dev/shm`` is not this one) the steps since the newest complete in
``checkpoint.dir``. Saves per minute count the checkpoints written (in the tier saves go to).

Then the requeues themselves: a tiered run crashes (an exception out of the train loop, after
about two thirds of its steps) and is launched again, once as this host (it resumes from the
local tier) and once as another host with its own empty ``local_dir`` (it resumes from
``checkpoint.dir``); each line gives the step resumed from and how long the restore took.
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from harness import bench_cfg  # noqa: E402
from lost import KILLS, Timeline  # noqa: E402
from overhead import BigTrainer, big_model  # noqa: E402
from workload_loop import mark_calls  # noqa: E402

from ckptkit import checkpointer as checkpointer_lib  # noqa: E402
from ckptkit import local_tier, lock_records  # noqa: E402

NONE = "no periodic save"


class TierTimeline(Timeline):
    """Section 6's timeline, with the checkpoints complete in ``checkpoint.dir`` apart."""

    def __init__(self):
        super().__init__()
        self.persisted: list[tuple[float, int]] = []

    def lost_elsewhere(self, t: float) -> float:
        kept = max((step for when, step in self.persisted if when <= t), default=0)
        return max(0.0, self.steps_at(t) - kept)


class Crash(Exception):
    """Stands in for a crash of the training process, raised between two loop calls (the
    launch's claims are released, and the saves in flight complete, as fit() unwinds)."""


def _mb(args) -> int:
    return 16 if args.quick else args.mb


def _shm(tmp: str) -> str:
    return tempfile.mkdtemp(dir="/dev/shm") if os.path.isdir("/dev/shm") else tempfile.mkdtemp(dir=tmp)


def _cfg(run_dir, steps, warmup, args, width, checkpoint):
    return bench_cfg(
        run_dir,
        max_steps=warmup + steps,
        steps_per_loop=10,
        log_every_steps=10**9,
        checkpoint={"max_to_keep": 2, "save_every_steps": None, **checkpoint},
        bench={"mb": _mb(args), "width": width},
    )


def _run(cfg, crash_at=None) -> TierTimeline:
    """Train ``cfg``; record every checkpoint's completion in each tier (``crash_at``: stop
    with :class:`Crash` once that many steps are done)."""
    line = TierTimeline()
    trainer = BigTrainer(cfg)
    line.marks = mark_calls(trainer)
    real_record = checkpointer_lib.Checkpointer._record

    def record(self, info):
        real_record(self, info)
        now = time.perf_counter()
        persistent = os.path.dirname(info.path) == self.directory
        for tier in (line.saved, line.persisted) if persistent else (line.saved,):
            if not any(s == info.step for _, s in tier):
                tier.append((now, info.step))

    if crash_at:
        marked = trainer._train_fn

        def crashing(n):
            if line.marks and line.marks[-1][1] >= crash_at:
                raise Crash()
            return marked(n)

        trainer._train_fn = crashing
    checkpointer_lib.Checkpointer._record = record
    try:
        trainer.fit()
    except Crash:
        pass
    finally:
        checkpointer_lib.Checkpointer._record = real_record
    return line


def _measure(line: TierTimeline, warmup: int, steps: int, rng: random.Random) -> dict:
    t0, t1, s0, s1 = line.window(warmup, warmup + steps)
    instants = [rng.uniform(t0, t1) for _ in range(KILLS)]
    here = [line.lost(t) for t in instants]
    elsewhere = [line.lost_elsewhere(t) for t in instants]
    minutes = (t1 - t0) / 60
    return {
        "rate": (s1 - s0) / (t1 - t0),
        "lost_here": statistics.median(here),
        "worst_here": max(here),
        "lost_elsewhere": statistics.median(elsewhere),
        "worst_elsewhere": max(elsewhere),
        "saves_per_min": sum(1 for when, _ in line.saved if t0 <= when <= t1) / minutes,
        "persisted_per_min": sum(1 for when, _ in line.persisted if t0 <= when <= t1) / minutes,
    }


def _contenders(args, tmp, shm, width, steps, warmup, persist):
    def run(checkpoint, local=False):
        extra = {"local_dir": tempfile.mkdtemp(dir=shm), "persist_every_seconds": persist} if local else {}
        return _run(_cfg(tempfile.mkdtemp(dir=tmp), steps, warmup, args, width, {**checkpoint, **extra}))

    auto = {"save_every_seconds": "auto", "max_overhead": 0.02}
    return {
        NONE: lambda: run({}),
        "disk alone, every 10 s": lambda: run({"save_every_seconds": 10}),
        f"tmpfs every 10 s, disk every {persist:.0f} s": lambda: run({"save_every_seconds": 10}, local=True),
        "disk alone, auto 2%": lambda: run(auto),
        f"tmpfs auto 2%, disk every {persist:.0f} s": lambda: run(auto, local=True),
    }


def _timed_restores() -> tuple[list[float], object]:
    """Patch Checkpointer.restore to time each call; returns (the times, the real method)."""
    times: list[float] = []
    real = checkpointer_lib.Checkpointer.restore

    def restore(self, path, **kw):
        t0 = time.perf_counter()
        step = real(self, path, **kw)
        times.append(time.perf_counter() - t0)
        return step

    checkpointer_lib.Checkpointer.restore = restore
    return times, real


def _requeue(args, tmp, shm, width, steps, warmup) -> dict:
    """Crash a tiered run (a save every tenth of the run, every 4th copied to disk), then
    launch it again on this host and, from a second crashed copy, on another host."""
    out = {}
    for where in ("this host", "another host"):
        run_dir = tempfile.mkdtemp(dir=tmp)
        checkpoint = {
            "save_every_steps": max(steps // 10, 1),
            "local_dir": tempfile.mkdtemp(dir=shm),
            "persist_every_saves": 4,
        }
        crashed = _run(_cfg(run_dir, steps, warmup, args, width, checkpoint), crash_at=warmup + steps * 2 // 3)
        newest_local = max((s for _, s in crashed.saved), default=None)
        newest_disk = max((s for _, s in crashed.persisted), default=None)
        real_host = lock_records.hostname
        if where == "another host":  # its own node-local storage, empty
            checkpoint["local_dir"] = tempfile.mkdtemp(dir=shm)
            lock_records.hostname = local_tier.hostname = lambda: "another-node"
        times, real_restore = _timed_restores()
        try:
            cfg = _cfg(run_dir, steps, warmup, args, width, checkpoint)
            cfg["trainer"]["max_steps"] = (newest_local or 0) + 10
            result = BigTrainer(cfg).fit()
        finally:
            lock_records.hostname = local_tier.hostname = real_host
            checkpointer_lib.Checkpointer.restore = real_restore  # type: ignore[method-assign]
        out[where] = {
            "newest_local": newest_local,
            "newest_persisted": newest_disk,
            "resumed_from": result.resumed_from,
            "restore_seconds": times[-1] if times else None,
        }
    return out


def bench_tiers(args, tmp) -> dict:
    shm = _shm(tmp)
    try:
        width = big_model(_mb(args))[1]
        steps = 30 if args.quick else 600
        warmup, persist = 10, (20.0 if args.quick else 15.0)
        contenders = _contenders(args, tmp, shm, width, steps, warmup, persist)
        rng = random.Random(8)
        runs: dict[str, list[dict]] = {name: [] for name in contenders}
        for _ in range(args.reps):
            for name, fn in contenders.items():
                runs[name].append(_measure(fn(), warmup, steps, rng))
        out = {"runs": runs, "requeue": _requeue(args, tmp, shm, width, steps, warmup), "shm": shm}
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    _print(out, args)
    return out


def _print(out: dict, args) -> None:
    runs = out["runs"]
    base = statistics.median(r["rate"] for r in runs[NONE])
    print(
        f"\n8. a local tier on tmpfs ({'/dev/shm' if out['shm'].startswith('/dev/shm') else 'no /dev/shm: on disk'}) "
        f"against the persistent tier alone, a {_mb(args)} MB model  (median of {args.reps}; {KILLS} kills a run)"
    )
    print(
        f"  {'contender':38} {'steps/s':>8} {'overhead':>9} {'saves/min':>9} {'to disk':>8}  "
        f"{'lost: same node':>15} {'worst':>6}  {'other node':>10} {'worst':>6}"
    )
    for name, reps in runs.items():
        rate = statistics.median(r["rate"] for r in reps)

        def med(key, reps=reps):
            return statistics.median(r[key] for r in reps)

        print(
            f"  {name:38} {rate:8.2f} {1 - rate / base:9.2%} {med('saves_per_min'):9.1f} "
            f"{med('persisted_per_min'):8.1f}  {med('lost_here'):15.0f} {med('worst_here'):6.0f}  "
            f"{med('lost_elsewhere'):10.0f} {med('worst_elsewhere'):6.0f}"
        )
    for where, r in out["requeue"].items():
        secs = r["restore_seconds"]
        print(
            f"  crashed with step {r['newest_local']} newest in the local tier, {r['newest_persisted']} on disk; "
            f"relaunched on {where}: resumed from step {r['resumed_from']}"
            + (f" (restore {secs:.2f} s)" if secs is not None else "")
        )


def tiers_targets(out: dict) -> list[dict]:
    """A requeue on another host resumes from the newest step on disk, one on this host from
    the newest local one; with the local tier, auto saves more often than on disk alone."""
    rq, runs = out["requeue"], out["runs"]
    results = [
        {
            "target": "requeue elsewhere resumes from checkpoint.dir",
            "met": rq["another host"]["resumed_from"] == rq["another host"]["newest_persisted"],
        },
        {
            "target": "relaunch here resumes from the local tier",
            "met": rq["this host"]["resumed_from"] == rq["this host"]["newest_local"],
        },
    ]
    tiered = next(n for n in runs if n.startswith("tmpfs auto"))
    more = statistics.median(r["saves_per_min"] for r in runs[tiered]) >= statistics.median(
        r["saves_per_min"] for r in runs["disk alone, auto 2%"]
    )
    results.append({"target": "auto saves at least as often with the local tier", "met": more})
    for r in results:
        print(f"  target: {r['target']}: {'met' if r['met'] else 'MISSED'}")
    return results
