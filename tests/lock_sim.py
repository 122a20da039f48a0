"""One simulated launch for the run-lock harness in tests/test_lock_protocol.py.

Runs the real :class:`ckptkit.runlock.RunLock` in this process, as if on host ``--host``,
with a ``flock`` that is ``shared`` (the real one: one kernel for every simulated host), ``node``
(node-local: only processes of the same simulated host see each other's flock, as under
Lustre ``localflock`` or NFS ``local_lock=flock``) or ``none`` (the filesystem refuses flock),
and a wall clock skewed by ``--skew`` seconds (the record's time and every file time it sets).

While it holds the run it *commits* every 10 ms: ``lock.check()`` then one appended line
``<generation> <token> <seq>`` in ``run_dir/commits.log``. SIGUSR1 asks it to freeze: at the
next moment between two commits it sends itself SIGSTOP (as ``scontrol suspend`` would; SIGSTOP,
unlike SIGTSTP, also stops a process of an orphaned process group, as under CI), and goes on
after SIGCONT. It prints one JSON line per event: ``outcome`` (held, refused, fenced,
released), its generation and token, and the error's message.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from ckptkit import lock_records, runlock


def simulate(args: argparse.Namespace) -> None:
    lock_records.hostname = lambda: args.host
    if args.flock == "none":

        def no_flock(fd, path):
            return "unsupported"

        runlock.flock_exclusive = no_flock
    elif args.flock == "node":
        real = runlock.flock_exclusive

        def node_flock(fd, path):  # a per-host file stands for the node's own lock table
            node_fd = os.open(f"{path}.node-{args.host}", os.O_RDWR | os.O_CREAT, 0o644)
            return real(node_fd, path)

        runlock.flock_exclusive = node_flock
    if args.skew:
        real_time = time.time
        lock_records.time.time = lambda: real_time() + args.skew  # type: ignore[attr-defined]
        real_replace = os.replace

        def skewed_replace(src, dst):  # a skewed NFS client stamps the files with its own time
            real_replace(src, dst)
            then = real_time() + args.skew
            os.utime(dst, (then, then))

        runlock.os.replace = skewed_replace  # type: ignore[attr-defined]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--host", required=True)
    p.add_argument("--flock", choices=("shared", "node", "none"), default="shared")
    p.add_argument("--lease", type=float, default=1.0)
    p.add_argument("--hold", type=float, default=3.0)
    p.add_argument("--skew", type=float, default=0.0)
    p.add_argument("--wait-go", action="store_true", help="say ready, then acquire on a line on stdin (races)")
    args = p.parse_args()
    simulate(args)
    lock = runlock.RunLock(args.run_dir, lease_seconds=args.lease)
    if args.wait_go:
        print(json.dumps({"outcome": "ready"}), flush=True)
        sys.stdin.readline()
    try:
        lock.acquire()
    except runlock.RunLockedError as exc:
        print(json.dumps({"outcome": "refused", "message": str(exc)}), flush=True)
        return 2
    assert lock.record is not None
    gen, token = lock.record["generation"], lock.record["token"]
    print(json.dumps({"outcome": "held", "generation": gen, "token": token}), flush=True)
    log = os.open(os.path.join(args.run_dir, "commits.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    end, seq = time.monotonic() + args.hold, 0
    freeze: list[bool] = []
    signal.signal(signal.SIGUSR1, lambda *_: freeze.append(True))
    try:
        while time.monotonic() < end:
            lock.check()
            os.write(log, f"{gen} {token} {seq}\n".encode())
            seq += 1
            if freeze:  # between two commits
                freeze.clear()
                os.kill(os.getpid(), signal.SIGSTOP)
                end += 60  # the time it was frozen does not count
            time.sleep(0.01)
    except runlock.RunTakenOverError as exc:
        print(json.dumps({"outcome": "fenced", "generation": gen, "token": token, "message": str(exc)}), flush=True)
        lock.release()
        return 3
    own = lock_records.read_claim(lock._own_path(), gen)
    intact = own is not None and own.token == token and not own.released
    lock.release()
    print(json.dumps({"outcome": "released", "generation": gen, "own_record_intact": intact}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
