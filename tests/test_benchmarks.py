"""The benchmark script runs end to end (its numbers are for people, not for this test)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_benchmarks_quick_smoke_run(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "benchmarks", "run.py"),
            "--quick",
            "--json",
            str(out),
            "--only",
            "loop,savecost,savegap,position,finite,overhead,io,resume,d2h,lost,tiers",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    for title in (
        "1. loop speed",
        "1b. where one save",
        "1d. a periodic save in the loop",
        "1e. the data position against example and dataset size",
        "1c. the finite-weights check",
        "2. checkpoint overhead",
        "3. save/restore throughput",
        "4. resume latency",
        "5. CPU: blocking part of an async save",  # no GPU in CI: the code path, host to host
        "6. work lost per kill -9 against overhead",
        "8. a local tier on tmpfs",
    ):
        assert title in proc.stdout
    figures = json.loads(out.read_text())
    assert set(figures) >= {
        "loop",
        "savecost",
        "savegap",
        "position",
        "finite",
        "overhead",
        "io",
        "resume",
        "d2h",
        "lost",
        "tiers",
    }
    assert all(r["rate"] > 0 and r["median_lost"] >= 0 for runs in figures["lost"]["runs"].values() for r in runs)
    requeue = figures["tiers"]["requeue"]  # from the right tier, here and elsewhere
    assert requeue["this host"]["resumed_from"] == requeue["this host"]["newest_local"] is not None
    assert requeue["another host"]["resumed_from"] == requeue["another host"]["newest_persisted"] is not None
    assert all(r["bytes"] > 0 and r["snapshot_ms"] > 0 for r in figures["position"]["rows"])
    assert all(between > 0 for runs in figures["savegap"]["runs"].values() for between, _ in runs)
    assert all(v > 0 for runs in figures["d2h"]["runs"].values() for v in runs)
    assert all(v > 0 for runs in figures["finite"]["runs"].values() for v in runs)
    assert all(v > 0 for runs in figures["loop"]["runs"].values() for v in runs)
    assert all(wall > 0 and cpu > 0 for runs in figures["savecost"]["runs"].values() for wall, cpu in runs)
