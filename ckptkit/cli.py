"""The ``ckptkit`` command line.

Errors print one line (``ckptkit: error: ...``) and exit 1; ``--debug`` shows the traceback.
Exit codes: 0 success, 1 error, 2 bad usage.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from typing import List, Optional

EPILOG = """examples:
  ckptkit ls runs/digits              checkpoints of a run: step, time, size, metrics, marks
  ckptkit ls runs/digits/checkpoints  the same, given the checkpoint directory

exit codes: 0 success, 1 error (one line; --debug for the traceback), 2 bad usage
"""


def _human(n: Optional[int]) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def checkpoint_dir_of(path: str) -> str:
    """The checkpoint directory for a run directory or a checkpoint directory."""
    import tensorflow as tf

    from ckptkit import metadata

    if not tf.io.gfile.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory")
    candidates = [os.path.join(path, "checkpoints"), path]
    for d in candidates:
        if tf.io.gfile.isdir(d) and (metadata.scan(d) or tf.io.gfile.exists(os.path.join(d, metadata.METADATA_FILE))):
            return d
    raise FileNotFoundError(f"no checkpoints in {path} (looked for ckpt-*.index in {' and '.join(candidates)})")


def cmd_ls(args) -> int:
    from ckptkit import metadata

    directory = checkpoint_dir_of(args.path)
    ckpts = metadata.scan(directory)
    doc = metadata.read_document(directory)
    best = set(doc.get("best") or [])
    latest = ckpts[-1].step if ckpts else None
    rows = [("step", "time", "size", "metrics", "marks")]
    for c in ckpts:
        when = datetime.datetime.fromtimestamp(c.time).strftime("%Y-%m-%d %H:%M:%S")
        metrics = " ".join(f"{k}={v:.4g}" if isinstance(v, (int, float)) else f"{k}={v}"
                           for k, v in sorted((c.metrics or {}).items())) or "-"
        marks = ",".join(m for m, on in (("latest", c.step == latest), ("best", c.step in best)) if on)
        rows.append((str(c.step), when, _human(c.size), metrics, marks or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"{directory}: {len(ckpts)} checkpoint(s)"
          + (f", best by {doc.get('best_metric')} ({doc.get('best_mode')})" if doc.get("best_metric") else ""))
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckptkit",
        description="Inspect the checkpoints of ckptkit runs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    ls = sub.add_parser("ls", help="list the checkpoints of a run or checkpoint directory",
                        description="List checkpoints: step, time, size, eval metrics, and "
                                    "marks for the latest and the best.",
                        epilog="example: ckptkit ls runs/digits",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ls.add_argument("path", metavar="RUN_OR_CKPT_DIR")
    ls.set_defaults(func=cmd_ls)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return args.func(args)
    except Exception as exc:  # noqa: BLE001 - one line for the user, traceback with --debug
        if args.debug:
            raise
        print(f"ckptkit: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
