"""The ``ckptkit`` command line.

Errors print one line (``ckptkit: error: ...``) and exit 1; ``--debug`` shows the traceback.
Exit codes: 0 success, 1 error, 2 bad usage.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import re
import sys

EPILOG = """examples:
  ckptkit ls runs/digits              checkpoints of a run: step, time, size, metrics, marks
  ckptkit ls runs/digits/checkpoints  the same, given the checkpoint directory
  ckptkit export runs/digits          export the best checkpoint again, without training
  ckptkit verify runs/digits/export/1 read a SavedModel (runs nothing) and show its signatures
  ckptkit verify runs/digits/checkpoints/ckpt-1500   read every tensor of a checkpoint
  ckptkit inspect runs/digits         variables by object-graph path, shape, dtype
  ckptkit diff runs/a runs/b          what a warm start from a into b's model would match

exit codes: 0 success, 1 error (one line; --debug for the traceback), 2 bad usage
"""


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


def checkpoint_dir_of(path: str) -> str:
    """The checkpoint directory for a run directory or a checkpoint directory."""
    from ckptkit import gfile, metadata

    if not gfile.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory")
    candidates = [os.path.join(path, "checkpoints"), path]
    for d in candidates:
        if gfile.isdir(d) and (metadata.scan(d) or gfile.exists(os.path.join(d, metadata.METADATA_FILE))):
            return d
    raise FileNotFoundError(f"no checkpoints in {path} (looked for ckpt-*.index in {' and '.join(candidates)})")


def _table(rows) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())


def runs_under(parent: str, depth: int = 3) -> list[str]:
    """Run directories (with a ``checkpoints/`` holding checkpoints) below ``parent``."""
    from ckptkit import gfile, metadata

    found, level = [], [parent]
    for _ in range(depth):
        below = []
        for d in level:
            for name in sorted(gfile.listdir(d)) if gfile.isdir(d) else []:
                path = os.path.join(d, name)
                if name.startswith(".") or not gfile.isdir(path):
                    continue
                if metadata.scan(os.path.join(path, "checkpoints")):
                    found.append(path)
                elif name not in ("checkpoints", "export", "logs"):
                    below.append(path)
        level = below
    return found


def _ls_runs(parent: str, runs: list[str]) -> int:
    from ckptkit import metadata

    rows = [("run", "checkpoints", "latest", "best")]
    for run in runs:
        d = os.path.join(run, "checkpoints")
        ckpts, doc = metadata.scan(d), metadata.read_document(d)
        best = [c for c in ckpts if c.step in (doc.get("best") or [])]
        metric = doc.get("best_metric")
        value = best[0].metrics.get(metric) if best and best[0].metrics and metric else None
        rows.append(
            (
                os.path.relpath(run, parent),
                str(len(ckpts)),
                str(ckpts[-1].step),
                f"{metric}={value:.4g} (step {best[0].step})" if value is not None else "-",
            )
        )
    print(f"{parent}: {len(runs)} run(s)")
    _table(rows)
    return 0


def cmd_ls(args) -> int:
    from ckptkit import checkpoint_files, metadata

    try:
        directory = checkpoint_dir_of(args.path)
    except FileNotFoundError:
        runs = runs_under(args.path)
        if not runs:
            raise
        return _ls_runs(args.path, runs)
    ckpts = metadata.scan(directory)
    doc = metadata.read_document(directory)
    best = set(doc.get("best") or [])
    latest = ckpts[-1].step if ckpts else None
    rows = [("step", "time", "size", "metrics", "marks")]
    changed: list[str] = []
    for c in ckpts:
        when = datetime.datetime.fromtimestamp(c.time).strftime("%Y-%m-%d %H:%M:%S")
        metrics = (
            " ".join(
                f"{k}={v:.4g}" if isinstance(v, (int, float)) else f"{k}={v}"
                for k, v in sorted((c.metrics or {}).items())
            )
            or "-"
        )
        torn = c.recorded_size is not None and c.size is not None and c.size != c.recorded_size
        marks = ",".join(
            m for m, on in (("latest", c.step == latest), ("best", c.step in best), ("SIZE-CHANGED", torn)) if on
        )
        rows.append((str(c.step), when, _human(c.size), metrics, marks or "-"))
        if torn:
            changed.append(f"{c.path}: {c.size} bytes on disk, {c.recorded_size} when saved")
    print(
        f"{directory}: {len(ckpts)} checkpoint(s)"
        + (f", best by {doc.get('best_metric')} ({doc.get('best_mode')})" if doc.get("best_metric") else "")
    )
    _table(rows)
    for line in changed:
        print(
            f"warning: {line}: truncated or rewritten since; `ckptkit verify {os.path.dirname(directory)}` "
            "reads it (a resume falls back past a checkpoint it cannot read)",
            file=sys.stderr,
        )
    aside = checkpoint_files.unreadable_sets(directory)
    if aside:
        size = sum(checkpoint_files.tree_size(p) for p in aside)
        print(
            f"{os.path.join(directory, metadata.UNREADABLE_DIR)}: {len(aside)} set(s) of files moved aside, "
            f"{_human(size)} (the newest {checkpoint_files.KEEP_UNREADABLE} are kept)"
        )
    from ckptkit.local_tier import describe

    tier = describe(directory, [args.path, os.path.dirname(directory)])
    if tier:
        print(tier)
    return 0


def cmd_export(args) -> int:
    from omegaconf import OmegaConf

    from ckptkit import runinfo
    from ckptkit.config import anchored
    from ckptkit.errors import CkptkitError, ConfigError

    run_dir = os.path.abspath(args.run_dir)
    record = runinfo.read_run_record(run_dir)
    where = record.get("trainer") or {}
    if not where.get("qualname") or "config" not in record:
        raise CkptkitError(
            f"{run_dir}/{runinfo.RUN_FILE} names no trainer class and config: it is not a complete ckptkit run record"
        )
    print(
        f"ckptkit: importing trainer {where.get('qualname')} from "
        f"{where.get('file') or where.get('module')} (named in {run_dir}/{runinfo.RUN_FILE})",
        file=sys.stderr,
    )
    cls = runinfo.import_trainer_class(
        where, trust_code=args.trust_code, how_to_trust=f"--trust-code (ckptkit export {args.run_dir} --trust-code)"
    )
    cfg = OmegaConf.create(record["config"])
    old_run_dir = str(cfg.run_dir)
    cfg.run_dir = run_dir
    for key in ("checkpoint.dir", "export.dir"):  # follow the run directory if it moved
        value = str(OmegaConf.select(cfg, key))
        if value == old_run_dir or value.startswith(old_run_dir.rstrip("/") + "/"):
            OmegaConf.update(cfg, key, run_dir + value[len(old_run_dir) :])
        else:
            OmegaConf.update(cfg, key, anchored(record.get("cwd", ""), value))
    # What the export does goes to stderr: "reusing export N (same checkpoint, same
    # signatures)", or the check and the new version; stdout is the path alone.
    logger = logging.getLogger("ckptkit")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("ckptkit: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # a root handler (absl's, the trainer's module's) would print it twice
    here = os.getcwd()
    if record.get("cwd") and os.path.isdir(record["cwd"]):
        os.chdir(record["cwd"])  # the user's relative data paths mean what they meant then
    try:
        try:
            trainer = cls(cfg)
        except ConfigError as exc:
            raise ConfigError(
                exc.key,
                f"{exc.message} (in the run record {run_dir}/{runinfo.RUN_FILE}, which an older ckptkit wrote "
                "with it: correct or delete that line there, then export again)",
            ) from None
        path = trainer.export(from_=args.source, to=os.path.join(here, args.to) if args.to else None, force=args.force)
    finally:
        os.chdir(here)
    if path is None:
        raise RuntimeError(f"{run_dir} has no checkpoint to export")
    print(path)
    return 0


def _files_of(prefix: str) -> list[str]:
    from ckptkit import metadata

    return metadata.checkpoint_files(prefix) or [prefix + ".index"]


def _read_tensors(prefix: str) -> tuple:
    """Read every tensor of the checkpoint at ``prefix``: (tensors read, bytes, opaque ones)."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(prefix)
    dtypes = reader.get_variable_to_dtype_map()
    total, opaque = 0, 0
    for key in sorted(dtypes):
        if dtypes[key] == tf.variant:  # a tf.data iterator's state: listed, not readable here
            opaque += 1
            continue
        try:
            value = reader.get_tensor(key)
        except (tf.errors.OpError, IndexError) as exc:  # IndexError: a truncated data file
            message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            files = ", ".join(os.path.basename(f) for f in _files_of(prefix))
            raise RuntimeError(
                f"{prefix}: tensor {key} cannot be read ({message}) from its "
                f"files ({files}); the checkpoint is truncated or corrupt"
            ) from exc
        total += getattr(value, "nbytes", 0)
    return len(dtypes) - opaque, total, opaque


def _verify_saved_model(path: str, load: bool) -> int:
    """Check a SavedModel by reading it: the graph proto's signatures and every variable
    through the checkpoint reader. Nothing of the model runs unless ``load``."""
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with tf.io.gfile.GFile(os.path.join(path, "saved_model.pb"), "rb") as f:
        try:
            proto.ParseFromString(f.read())
        except Exception as exc:  # noqa: BLE001 - DecodeError and friends
            raise RuntimeError(
                f"{path}/saved_model.pb cannot be parsed ({exc}): not a SavedModel, or a corrupt one"
            ) from exc
    graphs = [g for g in proto.meta_graphs if "serve" in g.meta_info_def.tags] or list(proto.meta_graphs)
    if not graphs:
        raise RuntimeError(f"{path}/saved_model.pb holds no meta graph")
    # "__saved_model_init_op" is TensorFlow's own entry (the initializer), no signature.
    signatures = {k: v for k, v in graphs[0].signature_def.items() if not k.startswith("__")}
    variables = os.path.join(path, "variables", "variables")
    count, size, _ = _read_tensors(variables) if tf.io.gfile.exists(variables + ".index") else (0, 0, 0)
    print(
        f"{path}: SavedModel, {len(signatures)} signature(s), {count} variable tensors read "
        f"({size} bytes); read only, nothing of the model was run"
    )
    for name in sorted(signatures):
        sig = signatures[name]
        print(f"  signature {name!r}")
        for kind, tensors in (("input ", sig.inputs), ("output", sig.outputs)):
            for arg in sorted(tensors):
                info = tensors[arg]
                shape = tf.TensorShape(info.tensor_shape)
                print(f"    {kind} {arg}: {tf.dtypes.as_dtype(info.dtype).name} {shape}")
    if load:
        loaded = tf.saved_model.load(path)
        print(
            f"  --load: loaded with tf.saved_model.load (ran its initializers): "
            f"{len(loaded.signatures)} signature(s) callable"
        )
    return 0


def cmd_verify(args) -> int:
    import tensorflow as tf

    path = args.path.rstrip("/")
    if tf.io.gfile.exists(os.path.join(path, "saved_model.pb")):
        return _verify_saved_model(path, args.load)
    prefix = path[: -len(".index")] if path.endswith(".index") else path
    if tf.io.gfile.exists(prefix + ".index"):
        prefixes = [prefix]
    elif tf.io.gfile.isdir(path):  # a run or checkpoint directory: every checkpoint in it
        from ckptkit import metadata

        prefixes = [c.path for c in metadata.scan(checkpoint_dir_of(path))]
    else:
        raise FileNotFoundError(
            f"{args.path} is neither a SavedModel directory, a run or "
            "checkpoint directory, nor a checkpoint prefix (no saved_model.pb, "
            "no .index file)"
        )
    bad = 0
    for prefix in prefixes:
        try:
            count, total, opaque = _read_tensors(prefix)
        except RuntimeError as exc:
            print(f"ckptkit: error: {exc}", file=sys.stderr)
            bad += 1
            continue
        print(
            f"{prefix}: checkpoint OK, {count} tensors read ({total} bytes)"
            + (f", {opaque} data-iterator state(s) present" if opaque else "")
        )
    return 1 if bad else 0


def cmd_inspect(args) -> int:
    from ckptkit import transfer

    prefix = transfer.resolve_source(args.path)
    specs = transfer.checkpoint_specs(prefix)
    kind = "TF2 object-based" if transfer.has_object_graph(prefix) else "TF1 name-based"
    print(f"{prefix}: {kind} checkpoint")
    import tensorflow as tf

    reader = tf.train.load_checkpoint(prefix)
    shown = {e.key for e in specs.values()}
    slots = (
        transfer.optimizer_slots(prefix, {p: e.key for p, e in specs.items()})
        if transfer.has_object_graph(prefix)
        else {}
    )
    rows = [("path", "shape", "dtype", "also")]
    for path, e in sorted(specs.items()):
        shape, dtype = e.spec
        rows.append((path, str(shape.as_list()), dtype.name, e.aliases[0] if e.aliases else ""))
    shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()

    def natural(key):  # optimizer/_variables/2 before optimizer/_variables/10
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]

    for key in sorted((k for k in shapes if k not in shown and k != "_CHECKPOINTABLE_OBJECT_GRAPH"), key=natural):
        rows.append((key.split("/.ATTRIBUTES/")[0], str(shapes[key]), dtypes[key].name, slots.get(key, "")))
    _table(rows)
    return 0


def cmd_diff(args) -> int:
    from ckptkit import transfer

    a, b = transfer.resolve_source(args.a), transfer.resolve_source(args.b)
    source = transfer.checkpoint_specs(a)
    target = transfer.checkpoint_specs(b)
    rename = dict(item.split("=", 1) for item in args.rename)
    report, _ = transfer.plan_restore(
        source, target, include=args.include or None, exclude=args.exclude, rename=rename, source_name=a
    )
    print(f"restoring {a} into the structure of {b}:")
    for line in report.lines():
        print(line)
    return 0


def _add_ls(sub) -> None:
    ls = sub.add_parser(
        "ls",
        help="list the checkpoints of a run or checkpoint directory",
        description="List checkpoints: step, time, size, eval metrics, and marks for the latest and the best.",
        epilog="example: ckptkit ls runs/digits",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ls.add_argument("path", metavar="RUN_OR_CKPT_DIR")
    ls.set_defaults(func=cmd_ls)


def _add_export(sub) -> None:
    exp = sub.add_parser(
        "export",
        help="export a run's best or last checkpoint as a SavedModel, without training",
        description="Rebuild the run's trainer from RUN_DIR/ckptkit_run.yaml (its class and "
        "resolved config), restore the chosen checkpoint and export it to the next "
        "version directory. Prints the export's path. This IMPORTS AND RUNS the "
        "Python file or module named in the run record (the trainer that trained "
        "the run); it says which on stderr first. Use it only on run directories "
        "you trust.",
        epilog="examples:\n  ckptkit export runs/digits\n"
        "  ckptkit export runs/digits --from last --to /srv/models/digits",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    exp.add_argument("run_dir", metavar="RUN_DIR")
    exp.add_argument(
        "--from",
        dest="source",
        choices=["best", "last"],
        default=None,
        help="which checkpoint (default: the run's export.from)",
    )
    exp.add_argument("--to", metavar="DIR", default=None, help="export directory (default: the run's export.dir)")
    exp.add_argument(
        "--trust-code",
        action="store_true",
        help="import the trainer's file named in the run record even when it lies outside the working "
        "directory and the installed packages (it runs that file's code)",
    )
    exp.add_argument(
        "--force",
        action="store_true",
        help="write a new version even when the newest one came from the same checkpoint "
        "and serves the same signatures (it is reused otherwise, and the log says so)",
    )
    exp.set_defaults(func=cmd_export)


def _add_verify(sub) -> None:
    ver = sub.add_parser(
        "verify",
        help="check that a checkpoint or a SavedModel is complete and readable",
        description="For a checkpoint prefix: read every tensor. For a SavedModel directory: "
        "read its signatures from saved_model.pb and every variable through the "
        "checkpoint reader, and print each signature's inputs and outputs. This only "
        "reads files: a SavedModel from elsewhere can be checked safely. --load also "
        "loads it with tf.saved_model.load, which RUNS operations of the model's "
        "graph (its initializers): use it only on SavedModels you trust.",
        epilog="examples:\n  ckptkit verify runs/digits/checkpoints/ckpt-1500\n  ckptkit verify runs/digits/export/1\n"
        "  ckptkit verify --load runs/digits/export/1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ver.add_argument("path", metavar="CKPT_OR_EXPORT")
    ver.add_argument(
        "--load", action="store_true", help="also load the SavedModel with TensorFlow (runs its graph's initializers)"
    )
    ver.set_defaults(func=cmd_verify)


def _add_inspect(sub) -> None:
    ins = sub.add_parser(
        "inspect",
        help="list a checkpoint's variables: object-graph paths, shapes, dtypes",
        description="List the variables of a checkpoint (a prefix, a checkpoint directory, a "
        "run directory or a SavedModel): model variables by their object-graph path "
        "under model/ (the names include/exclude/rename use), then the rest.",
        epilog="examples:\n  ckptkit inspect runs/digits\n  ckptkit inspect runs/digits/export/1\n"
        "  ckptkit inspect old_tf1_model/model.ckpt-1000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ins.add_argument("path", metavar="CKPT")
    ins.set_defaults(func=cmd_inspect)


def _add_diff(sub) -> None:
    dif = sub.add_parser(
        "diff",
        help="what a warm start from CKPT_A into CKPT_B's model would match",
        description="Match the model variables of CKPT_A against those of CKPT_B as a warm "
        "start (checkpoint.init_from) would: restored, missing, mismatched, unused.",
        epilog="examples:\n  ckptkit diff runs/pretrain runs/finetune\n"
        "  ckptkit diff runs/a runs/b --exclude 'model/head/*' --rename model/encoder/=model/backbone/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dif.add_argument(
        "a", metavar="CKPT_A", help="the source: a run, checkpoint directory, checkpoint prefix or SavedModel"
    )
    dif.add_argument("b", metavar="CKPT_B", help="whose variables play the new model's")
    dif.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="only variables whose path (or object-graph path) matches; repeatable (checkpoint.init_from.include)",
    )
    dif.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="leave out variables whose path matches; repeatable (checkpoint.init_from.exclude)",
    )
    dif.add_argument(
        "--rename",
        action="append",
        default=[],
        metavar="OLD=NEW",
        help="read CKPT_A's paths starting with OLD as starting with NEW; repeatable (checkpoint.init_from.rename)",
    )
    dif.set_defaults(func=cmd_diff)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckptkit",
        description="Inspect, verify and export the checkpoints of ckptkit runs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_ls(sub)
    _add_export(sub)
    _add_verify(sub)
    _add_inspect(sub)
    _add_diff(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
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


#: TensorFlow's C++ start-up lines, which its TF_CPP_MIN_LOG_LEVEL does not reach (absl
#: logs them before it is initialized): INFO and WARNING lines, a CPU feature note, and the
#: CUDA probe's error on a machine without a GPU. Other C++ errors still show.
_START_UP_NOISE = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\)"
    rb"|[IW]\d{4} [\d:.]+ +\d+ \S+:\d+\]"
    rb"|E\d{4} [\d:.]+ +\d+ cuda_\w+\.cc:\d+\] failed call to cuInit"
    rb"|To enable the following instructions:)"
)


def _quiet_tensorflow_start_up() -> None:
    """Pass this process's stderr (file descriptor 2, which TensorFlow's C++ code writes to)
    through a thread that drops :data:`_START_UP_NOISE`, until the process exits."""
    import atexit
    import threading

    try:
        saved = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
    except OSError:
        return

    def pump() -> None:
        with os.fdopen(read, "rb") as lines:
            for line in lines:
                if not _START_UP_NOISE.match(line):
                    os.write(saved, line)

    thread = threading.Thread(target=pump, daemon=True, name="ckptkit-stderr")
    thread.start()

    def restore() -> None:
        try:
            sys.stderr.flush()
            os.dup2(saved, 2)  # the pipe's last write end closes: the pump reads to the end
        except (OSError, ValueError):
            return
        thread.join(timeout=2)

    atexit.register(restore)


def console_main() -> int:
    """The ``ckptkit`` command: :func:`main`, with TensorFlow's start-up lines hidden."""
    _quiet_tensorflow_start_up()
    return main()


if __name__ == "__main__":
    sys.exit(console_main())
