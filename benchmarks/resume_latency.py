"""Section 4 of benchmarks/run.py: seconds from process start to the first step of a resumed
run, ckptkit against a hand-written CheckpointManager script."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


from harness import run_alternating  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


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
