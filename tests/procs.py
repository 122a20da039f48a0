"""Running ToyTrainer (tests/toy_run.py) in real subprocesses, for signals and crashes."""

import json
import os
import socket
import subprocess
import sys
import time

TOY_RUN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_run.py")
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


def run(run_dir, *overrides, timeout=300):
    proc = subprocess.run(
        [sys.executable, TOY_RUN, str(run_dir), *overrides],
        env=ENV,
        timeout=timeout,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc.returncode, proc.stdout


def run_command(args, *, cwd, env=None, timeout=600) -> subprocess.CompletedProcess:
    """Run ``args`` (``sys.executable`` goes first) in ``cwd``: its exit code and its
    stdout and stderr together, as a user sees them."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env if env is not None else ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


def result_of(output):
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert lines, output[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def start(run_dir, *overrides, env=None):
    return subprocess.Popen(
        [sys.executable, TOY_RUN, str(run_dir), *overrides],
        env=env or ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )


def wait_for_line(proc, needle, timeout=120):
    """Read the process's output until a line contains ``needle``; return all lines read."""
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} never appeared:\n" + "".join(lines[-50:]))


def free_ports(n):
    """``n`` TCP ports free on localhost right now (for a local TF_CONFIG cluster)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def start_workers(run_dir, *overrides, workers=2, run_dirs=None, only=None):
    """One toy_run.py process per worker of a localhost cluster, all on ``run_dir`` (or
    worker i on ``run_dirs[i]``); ``only``: start just these task indexes."""
    ports = free_ports(workers)
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    procs = []
    for index in range(workers) if only is None else only:
        run_dir = run_dirs[index] if run_dirs else run_dir
        env = dict(ENV, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
        procs.append(
            subprocess.Popen(
                [sys.executable, TOY_RUN, str(run_dir), "strategy.kind=multi_worker", *overrides],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
            )
        )
    return procs


def finish(procs, timeout=300):
    """Wait for every process; their (return code, output)."""
    return [(p.wait(timeout=timeout), p.stdout.read()) for p in procs]
