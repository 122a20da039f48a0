"""SavedModel export into versioned directories, as TensorFlow Serving expects.

``export_dir/<version>/`` with ``version`` one more than the highest existing integer. The
SavedModel is written to a hidden temporary directory beside it (``.tmp-<host>-<pid>-<random>``,
created exclusively, holding a marker that names its process) and renamed into place, so a crash never leaves a
half-written export under a version number. ``assets.extra/ckptkit_export.json`` records
which checkpoint (step, metrics, and the identity the checkpoint was given at save time) the
export came from; it is also the mark of a version ckptkit made: only such versions, real
directories and not links, are ever pruned or reused.
"""

from __future__ import annotations

import errno
import inspect
import json
import logging
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from ckptkit import lock_records, serving_check, storage, transfer
from ckptkit._compat import own_executor_only
from ckptkit.errors import ExportError
from ckptkit.storage import atomic_write_text

#: A serving signature: a ``tf.function`` with an ``input_signature`` (TensorFlow ships no
#: type information, so this is ``Any`` to the type checker).
Signature = Any

log = logging.getLogger("ckptkit")

EXPORT_INFO = "ckptkit_export.json"
#: Written first into an export's temporary directory: what marks it as ckptkit's own.
TMP_MARKER = ".ckptkit-export-in-progress"
#: ``assets.extra/<stem>_inputs.npz`` and ``_outputs.npz``: the batch an export was checked
#: with and what the live model gave for it.
CHECK_STEM = "ckptkit_check"
#: Rows of the sample batch each signature is checked with.
CHECK_ROWS = 8
CHECK_TIMEOUT_SECONDS = 900


def versions(export_dir: str) -> list:
    """The integer version directories under ``export_dir`` (real ones, with a
    ``saved_model.pb``), ascending."""
    out = []
    for name in storage.listdir(export_dir):
        path = os.path.join(export_dir, name)
        if name.isdigit() and storage.is_real_dir(path) and storage.is_real_file(os.path.join(path, "saved_model.pb")):
            out.append(int(name))
    return sorted(out)


def _next_version(export_dir: str) -> int:
    """One more than any integer name there, whatever it is (a link, a file, a version)."""
    return max([int(n) for n in storage.listdir(export_dir) if n.isdigit()], default=0) + 1


def read_export_info(version_dir: str) -> dict | None:
    """The record ckptkit wrote into an export, or None (not ckptkit's, a link, unreadable)."""
    extra = os.path.join(version_dir, "assets.extra")
    path = os.path.join(extra, EXPORT_INFO)
    if not (storage.is_real_dir(version_dir) and storage.is_real_dir(extra) and storage.is_real_file(path)):
        return None
    try:
        with tf.io.gfile.GFile(path) as f:
            info = json.load(f)
    except (ValueError, UnicodeDecodeError):
        return None
    return info if isinstance(info, dict) else None


# --- what the SavedModel tracks -------------------------------------------------------------


class _Tree(tf.__internal__.tracking.AutoTrackable):
    """A container in the export's copy of the model's object tree: children, nothing else."""


def _own_state(obj) -> bool:
    """Whether ``obj`` saves tensors of its own (a variable, a table, ...), as opposed to a
    container (a layer, a module, a list) whose state is all in its children."""
    base = tf.__internal__.tracking.Trackable
    return (
        isinstance(obj, (tf.Variable, tf.saved_model.experimental.TrackableResource, tf.saved_model.Asset))
        or type(obj)._serialize_to_tensors is not base._serialize_to_tensors
        or bool(obj._gather_saveables_for_checkpoint())
    )


def _serving_variable(obj):
    """The ``tf.Variable`` a Keras 3 variable wraps (what traced functions capture), else None."""
    keras = sys.modules.get("keras")
    variable_class = getattr(keras, "Variable", None)
    if variable_class is not None and isinstance(obj, variable_class) and not isinstance(obj, tf.Variable):
        value = getattr(obj, "value", None)
        return value if isinstance(value, tf.Variable) else None
    return None


def _mirror(obj, memo: dict[int, Any]):
    """``obj``'s checkpoint tree, each Keras 3 variable replaced by the ``tf.Variable`` it
    wraps; containers without any state are left out. Shared objects stay shared."""
    if id(obj) in memo:
        return memo[id(obj)]
    unwrapped = _serving_variable(obj)
    if unwrapped is not None or _own_state(obj):
        memo[id(obj)] = unwrapped if unwrapped is not None else obj
        return memo[id(obj)]
    node = memo[id(obj)] = _Tree()
    kept = 0
    for name, child in tf.train.TrackableView(obj).children(obj).items():
        mirrored = _mirror(child, memo)
        if mirrored is not None:
            node._track_trackable(mirrored, name=name, overwrite=True)
            kept += 1
    if not kept:
        memo[id(obj)] = None
    return memo[id(obj)]


def serving_root(model, signatures: Mapping[str, Signature]):
    """What an export saves: the signatures, and the model's state as real ``tf.Variable``s
    and resources under the paths the training checkpoints use (``model/...``).

    Keras 3 wraps every variable in a ``keras.Variable``; saved as such, TF1's saver restores
    copies, not the variables the signature functions capture, and the session loader that
    TensorFlow Serving and ``saved_model_cli run`` use fails with "Could not find variable"
    (tensorflow/tensorflow#72963, keras-team/keras#20095), while ``tf.saved_model.load``
    works. Saving the wrapped variables themselves, once each, serves every model kind
    (``tf.Module``, Keras 3, tf-keras) by one path. Variables the signatures capture from
    outside the model are saved too (``extra_variables``).
    """
    memo: dict[int, Any] = {}
    root = _Tree()
    tree = _mirror(model, memo)
    if tree is not None:
        root._track_trackable(tree, name="model")
    saved = {id(v) for v in memo.values() if v is not None}
    extra, seen = [], set()
    for fn in signatures.values():
        for v in fn.get_concrete_function().variables:
            if id(v) not in saved and id(v) not in seen:
                seen.add(id(v))
                extra.append(v)
    if extra:
        root.extra_variables = extra
    return root


# --- signatures ------------------------------------------------------------------------------

LOW_PRECISION = (tf.float16, tf.bfloat16)


def _argument_names(fn) -> list[str]:
    python = getattr(fn, "python_function", fn)
    try:
        params = inspect.signature(python).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def named_signatures(signatures: Mapping[str, Signature], *, cast_outputs_float32: bool = True) -> dict[str, Signature]:
    """The signatures as served: named inputs, a dict of named outputs, float32 outputs.

    Inputs are named by their TensorSpec's name, else the Python argument's. Outputs: a dict
    keeps its keys, a tensor is ``output``, a tuple/list ``output_<i>``. A float16/bfloat16
    output (mixed precision) is cast to float32 with ``cast_outputs_float32`` (clients such
    as TF Serving's REST API and most numpy code expect float32), else served as it is with a
    warning; either way the log names the output.
    """
    out = {}
    for name, fn in signatures.items():
        if not hasattr(fn, "get_concrete_function") or not getattr(fn, "input_signature", None):
            raise ExportError(
                f"signature {name!r} must be a tf.function with an input_signature, e.g. "
                "tf.function(f, input_signature=[tf.TensorSpec([None, 64], tf.float32)])"
            )
        specs = _flat_inputs(name, fn)
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise ExportError(f"signature {name!r} has inputs with the same name: {names}")
        outputs = _output_dict(fn.get_concrete_function().structured_outputs)
        for key, tensor in outputs.items():
            dtype = getattr(tensor, "dtype", None)
            if dtype not in LOW_PRECISION:
                continue
            if cast_outputs_float32:
                log.info(
                    "export: signature %r output %r is %s; served as float32 (export.cast_outputs_float32=true)",
                    name,
                    key,
                    dtype.name,
                )
            else:
                log.warning(
                    "export: signature %r output %r is served as %s "
                    "(export.cast_outputs_float32=false); its clients must accept it",
                    name,
                    key,
                    dtype.name,
                )
        out[name] = tf.function(_served(fn, cast_outputs_float32, fn.input_signature), input_signature=specs)
    return out


def _flat_inputs(signature: str, fn) -> list[tf.TensorSpec]:
    """The signature's inputs as one flat list of named TensorSpecs, as TensorFlow Serving
    sees them: a dict argument (``[{"age": spec, "income": spec}]``) gives one input per key,
    a tuple or list one per element (``<argument>_<i>``); a plain spec is named by its own
    name, else the Python argument's."""
    args = _argument_names(fn)
    specs = []
    for i, arg in enumerate(fn.input_signature):
        base = args[i] if i < len(args) else f"input_{i}"
        for path, spec in _leaves(arg, ()):
            if not isinstance(spec, tf.TensorSpec):
                raise ExportError(
                    f"signature {signature!r}: input {base}{''.join(f'[{p!r}]' for p in path)} is a "
                    f"{type(spec).__name__}; serving signatures take dense tensors (tf.TensorSpec)"
                )
            if not path:
                label = spec.name or base
            elif isinstance(arg, Mapping):
                label = "/".join(str(p) for p in path)
            else:
                label = f"{base}_{'_'.join(map(str, path))}"
            specs.append(tf.TensorSpec(spec.shape, spec.dtype, name=label))
    return specs


def _leaves(node, path: tuple) -> list[tuple[tuple, Any]]:
    """(path, leaf) of a nested input signature, in ``tf.nest`` order (dicts by sorted key)."""
    if isinstance(node, Mapping):
        return [leaf for key in sorted(node) for leaf in _leaves(node[key], (*path, key))]
    if isinstance(node, (tuple, list)):
        return [leaf for i, item in enumerate(node) for leaf in _leaves(item, (*path, i))]
    return [(path, node)]


def _output_dict(result) -> dict[str, Any]:
    if isinstance(result, Mapping):
        return dict(result)
    if isinstance(result, (tuple, list)):
        return {f"output_{i}": r for i, r in enumerate(result)}
    return {"output": result}


def _served(fn: Callable, cast: bool, structure: Any) -> Callable:
    def served(*flat):
        args = tf.nest.pack_sequence_as(list(structure), list(flat))
        outputs = _output_dict(fn(*args))
        if cast:
            outputs = {k: tf.cast(v, tf.float32) if v.dtype in LOW_PRECISION else v for k, v in outputs.items()}
        return outputs

    return served


def describe(signatures: Mapping[str, Signature]) -> dict[str, Any]:
    """Each signature's inputs and outputs (dtype, shape) as JSON, for the export record."""
    out = {}
    for name in sorted(signatures):
        fn = signatures[name]
        concrete = fn.get_concrete_function()
        out[name] = {
            "inputs": {
                spec.name: [spec.dtype.name, spec.shape.as_list() if spec.shape.rank is not None else None]
                for spec in fn.input_signature
            },
            "outputs": {
                key: [t.dtype.name, t.shape.as_list() if t.shape.rank is not None else None]
                for key, t in sorted(concrete.structured_outputs.items())
            },
        }
    return out


def signature_feeds(signatures: Mapping[str, Signature], sample, rows: int = CHECK_ROWS):
    """A batch for every signature: ``({signature: {input: array}}, {signature: source})``.

    From ``sample`` (a batch's features: one tensor, or a dict by input name), at most
    ``rows`` rows, where it fits the signature's inputs; else a batch of zeros (empty strings,
    False) of the inputs' specs, two rows, with the reason as its source.
    """
    feeds, sources = {}, {}
    for name, fn in signatures.items():
        specs = list(fn.input_signature)
        feed, why = _feed_from_sample(specs, sample, rows)
        if feed is None:
            feed = {spec.name: _zeros(spec) for spec in specs}
            sources[name] = f"zeros ({why})"
        else:
            sources[name] = "the sample batch"
        feeds[name] = feed
    return feeds, sources


def _feed_from_sample(specs, sample, rows):
    if sample is None:
        return None, "no sample batch"
    if isinstance(sample, Mapping):
        missing = [s.name for s in specs if s.name not in sample]
        if missing:
            return None, f"the sample batch has no feature {', '.join(missing)}"
        values = [sample[s.name] for s in specs]
    elif len(specs) == 1:
        values = [sample]
    else:
        return None, f"{len(specs)} inputs, and the sample batch is one tensor"
    feed = {}
    for spec, value in zip(specs, values, strict=True):
        value = np.asarray(value)
        n = spec.shape[0] if spec.shape.rank else None
        if value.ndim:
            value = value[: (n or rows)]
        dtype = tf.string if value.dtype.kind in "OSU" else tf.as_dtype(value.dtype)
        if not spec.is_compatible_with(tf.TensorSpec(value.shape, dtype)):
            return None, (
                f"the sample batch's {spec.name} ({dtype.name} {list(value.shape)}) does "
                f"not fit {spec.dtype.name} {spec.shape}"
            )
        feed[spec.name] = value
    return feed, None


def _zeros(spec: tf.TensorSpec) -> np.ndarray:
    if spec.shape.rank is None:
        shape: list[int] = [2]
    else:
        shape = [d if d is not None else (2 if i == 0 else 1) for i, d in enumerate(spec.shape.as_list())]
    if spec.dtype == tf.string:
        return np.full(shape, b"", dtype=object)
    return np.zeros(shape, dtype=spec.dtype.as_numpy_dtype)


def live_outputs(signatures: Mapping[str, Signature], feeds) -> dict[str, dict[str, np.ndarray]]:
    """What the live model serves for ``feeds``, computed on the CPU as the check process does."""
    out = {}
    with tf.device("/CPU:0"):
        for name, feed in feeds.items():
            fn = signatures[name]
            result = fn(*[tf.constant(feed[spec.name]) for spec in fn.input_signature])
            out[name] = {key: value.numpy() for key, value in result.items()}
    return out


def compare(want, got, where: str) -> None:
    """Every output of every signature: same dtype kind and shape; floats allclose, anything
    else (strings, integers, booleans) exactly equal. Raises ExportError naming the first
    difference."""
    for name, outputs in want.items():
        served = got.get(name, {})
        for key, expected in outputs.items():
            label = f"{where}: signature {name!r} output {key!r}"
            if key not in served:
                raise ExportError(f"{label} is missing from what the SavedModel serves")
            expected, actual = np.asarray(expected), np.asarray(served[key])
            if expected.shape != actual.shape:
                raise ExportError(
                    f"{label} has shape {list(actual.shape)}, the live model gives {list(expected.shape)}"
                )
            why = _difference(expected, actual)
            if why:
                raise ExportError(
                    f"{label} differs from the live model ({why}); the SavedModel does not reproduce the trained model"
                )


def _difference(expected: np.ndarray, actual: np.ndarray) -> str | None:
    """None when ``actual`` (of ``expected``'s shape) matches: floats within 1e-5, anything
    else exactly, of the same dtype kind; else the first difference."""
    inexact = np.issubdtype(expected.dtype, np.inexact)
    if inexact != np.issubdtype(actual.dtype, np.inexact) or (not inexact and expected.dtype.kind != actual.dtype.kind):
        return f"dtype {actual.dtype}, expected {expected.dtype}"
    same = (
        np.isclose(actual, expected, rtol=1e-5, atol=1e-6, equal_nan=True)
        if inexact
        else np.asarray(actual == expected, dtype=bool).reshape(expected.shape)
    )
    if same.all():
        return None
    i = int(np.argmin(same.reshape(-1)))
    return f"element {i}: {actual.reshape(-1)[i]!r}, expected {expected.reshape(-1)[i]!r}"


def _temporary_owner(path: str) -> dict | None:
    """The process that made the export temporary ``path``, from its marker (host, boot,
    pid, the pid's start time); None when the marker is missing or not one ckptkit wrote."""
    marker = os.path.join(path, TMP_MARKER)
    if not storage.is_real_file(marker):
        return None
    try:
        record = json.loads(storage.read_text(marker)[:4096])
    except Exception:  # noqa: BLE001 - not ckptkit's record
        return None
    ok = (
        isinstance(record, dict)
        and isinstance(record.get("host"), str)
        and len(record["host"]) <= 255
        and isinstance(record.get("pid"), int)
        and not isinstance(record["pid"], bool)
        and isinstance(record.get("boot_id") or "", str)
        and (record.get("pid_start") is None or isinstance(record.get("pid_start"), int))
    )
    return record if ok else None


def _remove_stale_temporaries(export_dir: str) -> None:
    """Remove the ``.tmp-*`` directories of exports that provably died: real directories
    whose marker names a process on this host (same boot) that is gone, or a boot of this
    host that is over. Another host's temporary is never removed, however old: its export
    may be in progress (hosts share an export directory; no clock of theirs is trusted),
    nor one whose marker ckptkit did not write."""
    for name in storage.listdir(export_dir):
        path = os.path.join(export_dir, name)
        if not name.startswith(".tmp-") or not storage.is_real_dir(path):
            continue
        owner = _temporary_owner(path)
        if owner is None or lock_records.alive_here(owner) is not False:
            continue
        if storage.remove_tree(path):
            log.info("removed %s, left by an interrupted export (pid %d on %s)", path, owner["pid"], owner["host"])


def _make_temporary(export_dir: str) -> str:
    """A fresh, exclusively created temporary directory, ``.tmp-<host>-<pid>-<random>``, with
    ckptkit's marker in it naming this process (what :func:`_remove_stale_temporaries` checks)."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", lock_records.hostname())[:64]
    owner = {
        "host": lock_records.hostname(),
        "boot_id": lock_records.boot_id(),
        "pid": os.getpid(),
        "pid_start": lock_records.process_start(os.getpid()),
    }
    for _ in range(10):
        tmp = os.path.join(export_dir, f".tmp-{host}-{os.getpid()}-{secrets.token_hex(6)}")
        try:
            storage.make_dir_exclusive(tmp)
        except FileExistsError:
            continue
        storage.write_new(os.path.join(tmp, TMP_MARKER), json.dumps(owner).encode())
        return tmp
    raise ExportError(f"cannot create a temporary directory in {export_dir}")


def serve_with_session_loader(path: str, feeds, io_dir: str, label: str | None = None):
    """Run ``feeds`` through the SavedModel at ``path`` with TensorFlow's session loader, in
    a fresh Python process started in ``/`` (``io_dir`` carries the arrays); return its
    outputs. A ``ram://`` SavedModel exists only in this process: it is loaded here, in a
    graph of its own. Errors name ``label`` (the version it is to become), else ``path``."""
    label = label or path
    if path.startswith("ram://"):
        log.info(
            "export check: %s is in this process's memory; loading it with the session loader in this process", path
        )
        try:
            return serving_check.run_with_session_loader(path, feeds)
        except Exception as exc:
            raise ExportError(_not_servable(label, serving_check.one_line(exc))) from exc
    tf.io.gfile.makedirs(io_dir)
    serving_check.save_arrays(io_dir, serving_check.FEEDS, feeds)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="-1")  # the CPU: the GPU is this process's
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    command = [sys.executable, serving_check.__file__, _absolute(path), _absolute(io_dir)]
    log.info(
        "export check: serving %s with TensorFlow's session loader in a fresh process (TensorFlow Serving's "
        "loader; it starts TensorFlow, about as long as an import)",
        label,
    )
    try:
        # A session of its own: a Ctrl-C at the terminal reaches this process, which stops
        # the export (the check process is then killed), not the check with an error.
        done = subprocess.run(
            command,
            cwd="/",
            env=env,
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT_SECONDS,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired as exc:
        raise ExportError(
            f"export check of {label}: the session loader did not finish in {CHECK_TIMEOUT_SECONDS} s"
        ) from exc
    if done.returncode != 0 and storage.disk_full(done.stderr):
        raise ExportError(
            f"export check of {label}: the disk holding {os.path.dirname(io_dir)} is full "
            f"({storage.free_bytes(io_dir)} bytes free), so the check could not write its results; "
            "the model was not found at fault. Free space and export again"
        )
    if done.returncode != 0:
        said = [
            line[len(serving_check.ERROR_PREFIX) :]
            for line in done.stderr.splitlines()
            if line.startswith(serving_check.ERROR_PREFIX)
        ]
        tail = [line for line in done.stderr.splitlines() if line.strip()][-3:]
        raise ExportError(
            _not_servable(label, said[-1] if said else f"exit status {done.returncode}: " + " | ".join(tail))
        )
    return serving_check.load_arrays(io_dir, serving_check.OUTPUTS)


def _not_servable(label: str, reason: str) -> str:
    return (
        f"export check of {label}: TensorFlow's session loader (the one TensorFlow Serving "
        f"and saved_model_cli run use) cannot run it: {reason}"
    )


def _absolute(path: str) -> str:
    return path if not storage.is_local(path) else os.path.abspath(path)


def _publish(saved: str, export_dir: str) -> str:
    """Make the finished SavedModel ``saved`` the next version directory; return it.

    A local disk renames the directory, atomically, and takes the next number if another
    export took this one meanwhile. Other filesystems have no atomic directory rename
    (``ram://`` renames the directory entry without its files; object stores copy object by
    object): there the files are moved one by one, ``saved_model.pb`` last, which is the
    mark of a complete version for TensorFlow Serving and for ckptkit.
    """
    for _ in range(100):
        final = os.path.join(export_dir, str(_next_version(export_dir)))
        if not storage.is_local(saved):
            storage.move_files(saved, final, last=["saved_model.pb"])
            return final
        try:
            os.rename(saved, final)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                continue  # taken by a concurrent export since it was counted
            raise
        storage.fsync_path(export_dir)
        return final
    raise ExportError(f"no free version number in {export_dir}")


def _check_files(extra: str, feeds, expected) -> dict[str, Any]:
    """Write the check's inputs and the live model's outputs into ``assets.extra``."""
    index = {}
    for stem, arrays in (("inputs", feeds), ("outputs", expected)):
        data, index[stem] = serving_check.pack(arrays)
        storage.write_new(os.path.join(extra, f"{CHECK_STEM}_{stem}.npz"), data)
    return index


def read_check(version_dir: str, info: Mapping[str, Any]):
    """The check batch an export stored: ``(inputs, outputs)``, or None."""
    index = (info.get("check") or {}).get("arrays")
    if not index:
        return None
    extra = os.path.join(version_dir, "assets.extra")
    try:
        out = []
        for stem in ("inputs", "outputs"):
            with tf.io.gfile.GFile(os.path.join(extra, f"{CHECK_STEM}_{stem}.npz"), "rb") as f:
                out.append(serving_check.unpack(f.read(), index[stem]))
        return tuple(out)
    except (tf.errors.OpError, OSError, ValueError, KeyError):
        return None


def _check_before_publishing(saved: str, extra: str, feeds, expected, sources, verify: bool, label: str) -> dict:
    """Store the check batch and the live model's outputs beside the SavedModel ``saved``
    and, with ``verify``, serve it with the session loader and compare; returns the record
    of the check (``assets.extra/ckptkit_export.json``)."""
    check: dict[str, Any] = {
        "arrays": _check_files(extra, feeds, expected) if feeds else None,
        "batches": dict(sources or {}),
        "loader": None,
    }
    if verify and feeds:
        tmp = os.path.dirname(saved)
        compare(expected, serve_with_session_loader(saved, feeds, os.path.join(tmp, "check"), label), label)
        check["loader"] = (
            "session loader (tf.compat.v1.saved_model.loader, as TensorFlow Serving), fresh process"
            if not saved.startswith("ram://")
            else "session loader, in the exporting process (ram://)"
        )
    return check


def export_saved_model(
    model,
    signatures: Mapping[str, Signature],
    export_dir: str,
    *,
    info: Mapping[str, Any],
    config_yaml: str | None = None,
    feeds=None,
    expected=None,
    sources: Mapping[str, str] | None = None,
    verify: bool = True,
    fence: Callable[[], None] | None = None,
) -> str:
    """Write a SavedModel of ``model`` with ``signatures`` (from :func:`named_signatures`);
    check it with the session loader (``verify``: ``feeds`` must give ``expected``); only
    then publish it as the next version (after ``fence()``, which raises when this process
    may no longer write there). Returns the version directory."""
    if "serving_default" not in signatures:
        raise ExportError(
            f"serving_signatures() returned {sorted(signatures)}; it must include "
            "'serving_default', the signature TensorFlow Serving calls by default"
        )
    tf.io.gfile.makedirs(export_dir)
    _remove_stale_temporaries(export_dir)
    final = os.path.join(export_dir, str(_next_version(export_dir)))  # expected; see _publish
    tmp = _make_temporary(export_dir)
    saved = os.path.join(tmp, "model")
    record = dict(info)
    try:
        with own_executor_only():  # a tf.data py_function running ahead: _compat.patch_async_wait
            tf.saved_model.save(serving_root(model, signatures), saved, signatures=dict(signatures))
        extra = os.path.join(saved, "assets.extra")
        tf.io.gfile.makedirs(extra)
        check = _check_before_publishing(saved, extra, feeds, expected, sources, verify, f"{final} (not published)")
        record["check"] = check
        atomic_write_text(os.path.join(extra, EXPORT_INFO), json.dumps(record, indent=1, default=str) + "\n")
        if config_yaml is not None:
            atomic_write_text(os.path.join(extra, "config.yaml"), config_yaml)
        if fence is not None:
            fence()
        final = _publish(saved, export_dir)
    except BaseException as exc:
        storage.remove_tree(tmp)
        if not isinstance(exc, Exception):
            raise  # an interrupt: cleaned up, passed on
        if isinstance(exc, ExportError):
            raise
        if storage.disk_full(exc):
            raise ExportError(
                f"exporting the SavedModel to {final} failed: the disk holding {export_dir} is full "
                f"({storage.free_bytes(export_dir)} bytes free after removing the partial export); "
                "free space and export again"
            ) from exc
        raise ExportError(f"exporting the SavedModel to {final} failed: {exc}") from exc
    storage.remove_tree(tmp)
    if verify and feeds:
        log.info(
            "export check passed for %s with the session loader: %s",
            final,
            ", ".join(f"{k} ({v})" for k, v in sorted(check["batches"].items())),
        )
    log.info("exported SavedModel version %s to %s (step %s)", os.path.basename(final), final, info.get("step"))
    return final


def prune_versions(export_dir: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` versions that ckptkit exported; return them."""
    removed = []
    ours = [v for v in versions(export_dir) if read_export_info(os.path.join(export_dir, str(v))) is not None]
    for v in ours[:-keep] if keep else []:
        path = os.path.join(export_dir, str(v))
        if not storage.remove_tree(path):
            continue
        removed.append(path)
        log.info("deleted export version %d (export.max_to_keep=%d)", v, keep)
    return removed


def _why_not_reuse(version_dir: str, done: Mapping[str, Any], signatures, described, verify: bool):
    """None when the export at ``version_dir`` serves what ``signatures`` would; else why not."""
    if done.get("signatures") != described:
        return "its signatures differ from serving_signatures() now"
    check = done.get("check") or {}
    if verify and not check.get("loader"):
        return "it was not checked with the session loader"
    stored = read_check(version_dir, done)
    if stored is None:
        return "it holds no check batch to compare with"
    inputs, outputs = stored
    try:
        compare(outputs, live_outputs(signatures, inputs), version_dir)
    except ExportError as exc:
        return f"the signatures now serve other outputs ({exc})"
    return None


def _reusable(export_dir: str, source, signatures, described, verify: bool) -> str | None:
    """The newest export when it came from this very checkpoint (``source.uid``) and serves
    the same signatures, the same outputs on its check batch; else None (the log says why)."""
    existing = versions(export_dir)
    if not source.uid or not existing:
        return None
    newest = os.path.join(export_dir, str(existing[-1]))
    done = read_export_info(newest)
    if not done or done.get("checkpoint_uid") != source.uid:
        return None
    why = _why_not_reuse(newest, done, signatures, described, verify)
    if why is None:
        log.info(
            "reusing export %d (same checkpoint, same signatures): %s, from %s (step %d)",
            existing[-1],
            newest,
            source.path,
            source.step,
        )
        return newest
    log.info("export %d came from this checkpoint, but %s: writing a new version", existing[-1], why)
    return None


def export_checkpoint(
    model,
    source,
    make_signatures: Callable[[], Mapping[str, Signature]],
    export_dir: str,
    *,
    current_step: int | None,
    sample=None,
    verify: bool = True,
    info: Mapping[str, Any] | None = None,
    config_yaml: str | None = None,
    reuse: bool = True,
    cast_outputs_float32: bool = True,
    fence: Callable[[], None] | None = None,
) -> str:
    """Export the model weights of checkpoint ``source`` (a CheckpointInfo).

    The live ``model`` is loaded with the checkpoint's weights (unless it already is at
    ``current_step == source.step``), exported, checked with the session loader on a batch
    of ``sample`` (``verify``), and put back as it was. With ``reuse``, the newest existing
    export is returned instead when it came from this very checkpoint (the identity
    ``source.uid`` given at save time) and serves the same signatures: same inputs and
    outputs, and the same outputs on the batch it was checked with.
    """
    snapshot = [v.numpy() for v in model.variables]
    try:
        if source.step != current_step:
            status = tf.train.Checkpoint(model=model).read(source.path)
            status.assert_existing_objects_matched()
            status.expect_partial()
        signatures = named_signatures(make_signatures(), cast_outputs_float32=cast_outputs_float32)
        described = describe(signatures)
        reused = _reusable(export_dir, source, signatures, described, verify) if reuse else None
        if reused is not None:
            return reused
        feeds, sources = signature_feeds(signatures, sample)
        record = {
            "step": source.step,
            "checkpoint": os.path.basename(source.path),
            "checkpoint_uid": source.uid,
            "metrics": source.metrics,
            "layer_names": transfer.layer_names_record(model),
            "exported_at": time.time(),
            "signatures": described,
            **dict(info or {}),
        }
        path = export_saved_model(
            model,
            signatures,
            export_dir,
            info=record,
            config_yaml=config_yaml,
            feeds=feeds,
            expected=live_outputs(signatures, feeds),
            sources=sources,
            verify=verify,
            fence=fence,
        )
    finally:
        for v, value in zip(model.variables, snapshot, strict=True):
            v.assign(value)
    return path
