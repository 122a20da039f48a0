"""SavedModel export into versioned directories, as TensorFlow Serving expects.

``export_dir/<version>/`` with ``version`` one more than the highest existing integer. The
SavedModel is written to a hidden temporary directory beside it (``.tmp-<pid>-<random>``,
created exclusively, holding a marker file) and renamed into place, so a crash never leaves a
half-written export under a version number. ``assets.extra/ckptkit_export.json`` records
which checkpoint (step, metrics, and the identity the checkpoint was given at save time) the
export came from; it is also the mark of a version ckptkit made: only such versions, real
directories and not links, are ever pruned or reused.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from typing import Any, Callable, Dict, List, Mapping, Optional

import numpy as np
import tensorflow as tf

from ckptkit.errors import ExportError
from ckptkit import storage
from ckptkit.storage import atomic_write_text
from ckptkit.runlock import pid_alive

log = logging.getLogger("ckptkit")

EXPORT_INFO = "ckptkit_export.json"
#: Written first into an export's temporary directory: what marks it as ckptkit's own.
TMP_MARKER = ".ckptkit-export-in-progress"


def versions(export_dir: str) -> list:
    """The integer version directories under ``export_dir`` (real ones, with a
    ``saved_model.pb``), ascending."""
    out = []
    for name in storage.listdir(export_dir):
        path = os.path.join(export_dir, name)
        if name.isdigit() and storage.is_real_dir(path) and \
                storage.is_real_file(os.path.join(path, "saved_model.pb")):
            out.append(int(name))
    return sorted(out)


def _next_version(export_dir: str) -> int:
    """One more than any integer name there, whatever it is (a link, a file, a version)."""
    return max([int(n) for n in storage.listdir(export_dir) if n.isdigit()], default=0) + 1


def read_export_info(version_dir: str) -> Optional[dict]:
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


class _ExportRoot(tf.Module):
    """What the SavedModel tracks: the model's variables and the signature functions."""

    def __init__(self, model):
        super().__init__(name="ckptkit_export")
        self.model = model
        # Every variable, listed directly: Keras 3 does not expose some of them (the state of
        # a Dropout's seed generator) to SavedModel through the model's own children.
        self.model_variables = list(getattr(model, "variables", []))


def named_signatures(signatures: Mapping[str, Callable]) -> Dict[str, Callable]:
    """Signatures whose outputs are a dict, so served outputs have names, not ``output_0``.

    A signature returning a tensor serves it as ``output``, a tuple/list as ``output_<i>``.
    Inputs keep their names (the TensorSpec's name, else the Python argument's name).
    """
    out = {}
    for name, fn in signatures.items():
        if not hasattr(fn, "get_concrete_function") or not getattr(fn, "input_signature", None):
            raise ExportError(
                f"signature {name!r} must be a tf.function with an input_signature, e.g. "
                "tf.function(f, input_signature=[tf.TensorSpec([None, 64], tf.float32)])")
        concrete = fn.get_concrete_function()
        if isinstance(concrete.structured_outputs, Mapping):
            out[name] = fn
            continue
        arg_names = list(concrete.structured_input_signature[1]) or []
        if not arg_names:
            arg_names = [f"input_{i}" for i in range(len(fn.input_signature))]
        specs = [tf.TensorSpec(spec.shape, spec.dtype, name=spec.name or arg)
                 for spec, arg in zip(fn.input_signature, arg_names)]

        out[name] = tf.function(_with_named_outputs(fn), input_signature=specs)
    return out


def _with_named_outputs(fn: Callable) -> Callable:
    def named(*args):
        result = fn(*args)
        if isinstance(result, (tuple, list)):
            return {f"output_{i}": r for i, r in enumerate(result)}
        return {"output": result}

    return named


def _remove_stale_temporaries(export_dir: str) -> None:
    """Remove ``.tmp-<pid>-<random>`` directories left by exports killed on this host: only
    real directories holding ckptkit's marker, whose process is gone."""
    for name in storage.listdir(export_dir):
        parts = name.split("-")
        if len(parts) != 3 or parts[0] != ".tmp" or not parts[1].isdigit() or pid_alive(int(parts[1])):
            continue
        path = os.path.join(export_dir, name)
        if storage.is_real_file(os.path.join(path, TMP_MARKER)) and storage.remove_tree(path):
            log.info("removed %s, left by an interrupted export", path)


def _make_temporary(export_dir: str) -> str:
    """A fresh, exclusively created temporary directory with ckptkit's marker in it."""
    for _ in range(10):
        tmp = os.path.join(export_dir, f".tmp-{os.getpid()}-{secrets.token_hex(6)}")
        try:
            storage.make_dir_exclusive(tmp)
        except FileExistsError:
            continue
        storage.write_new(os.path.join(tmp, TMP_MARKER), b"")
        return tmp
    raise ExportError(f"cannot create a temporary directory in {export_dir}")


def export_saved_model(
    model,
    signatures: Mapping[str, Callable],
    export_dir: str,
    *,
    info: Mapping[str, Any],
    config_yaml: Optional[str] = None,
) -> str:
    """Write a SavedModel of ``model`` with ``signatures``; return the version directory."""
    if "serving_default" not in signatures:
        raise ExportError(
            f"serving_signatures() returned {sorted(signatures)}; it must include "
            "'serving_default', the signature TensorFlow Serving calls by default")
    tf.io.gfile.makedirs(export_dir)
    _remove_stale_temporaries(export_dir)
    version = _next_version(export_dir)
    final = os.path.join(export_dir, str(version))
    tmp = _make_temporary(export_dir)
    root = _ExportRoot(model)
    try:
        tf.saved_model.save(root, tmp, signatures=dict(signatures))
        extra = os.path.join(tmp, "assets.extra")
        tf.io.gfile.makedirs(extra)
        atomic_write_text(os.path.join(extra, EXPORT_INFO),
                          json.dumps(dict(info), indent=1, default=str) + "\n")
        if config_yaml is not None:
            atomic_write_text(os.path.join(extra, "config.yaml"), config_yaml)
        storage.remove_file(os.path.join(tmp, TMP_MARKER))
        tf.io.gfile.rename(tmp, final)
    except BaseException as exc:
        storage.remove_tree(tmp)
        if not isinstance(exc, Exception):
            raise  # an interrupt: cleaned up, passed on
        raise ExportError(f"exporting the SavedModel to {final} failed: {exc}") from exc
    log.info("exported SavedModel version %d to %s (step %s)", version, final, info.get("step"))
    return final


def prune_versions(export_dir: str, keep: int) -> List[str]:
    """Delete all but the newest ``keep`` versions that ckptkit exported; return them."""
    removed = []
    ours = [v for v in versions(export_dir)
            if read_export_info(os.path.join(export_dir, str(v))) is not None]
    for v in ours[:-keep] if keep else []:
        path = os.path.join(export_dir, str(v))
        if not storage.remove_tree(path):
            continue
        removed.append(path)
        log.info("deleted export version %d (export.max_to_keep=%d)", v, keep)
    return removed


def verify_export(path: str, signatures: Mapping[str, Callable], sample) -> list:
    """Reload ``path`` and compare each signature that ``sample`` can feed with the live one.

    Returns the names of the signatures compared; raises ExportError on any difference.
    A signature whose inputs ``sample`` does not fit is left out (and logged).
    """
    loaded = tf.saved_model.load(path)
    checked = []
    for name, fn in signatures.items():
        served = loaded.signatures[name]
        _, kwspec = served.structured_input_signature
        if len(kwspec) != 1:
            log.info("export check: skipping signature %r (%d inputs)", name, len(kwspec))
            continue
        (arg, spec), = kwspec.items()
        x = tf.convert_to_tensor(sample)
        if not spec.is_compatible_with(tf.TensorSpec(x.shape, x.dtype)):
            log.info("export check: skipping signature %r (sample %s does not fit %s)",
                     name, x.shape, spec)
            continue
        live = fn(x)
        got = served(**{arg: x})
        live = live if isinstance(live, Mapping) else {"output": live}
        for key, want in live.items():
            if key not in got:
                raise ExportError(f"export check of {path}: signature {name!r} lacks output {key!r}")
            if not np.allclose(np.asarray(got[key]), np.asarray(want), rtol=1e-5, atol=1e-6):
                raise ExportError(
                    f"export check of {path}: signature {name!r} output {key!r} differs from "
                    "the live model; the SavedModel does not reproduce the trained model")
        checked.append(name)
    return checked


def export_checkpoint(
    model,
    source,
    make_signatures: Callable[[], Mapping[str, Callable]],
    export_dir: str,
    *,
    current_step: Optional[int],
    sample=None,
    verify: bool = True,
    info: Optional[Mapping[str, Any]] = None,
    config_yaml: Optional[str] = None,
    reuse: bool = True,
) -> str:
    """Export the model weights of checkpoint ``source`` (a CheckpointInfo).

    The live ``model`` is loaded with the checkpoint's weights (unless it already is at
    ``current_step == source.step``), exported, optionally verified, and put back as it was.
    With ``reuse``, an existing newest export of the same checkpoint is returned instead:
    only when it provably came from it (the identity ``source.uid`` given at save time).
    """
    if reuse and source.uid:
        existing = versions(export_dir)
        if existing:
            newest = os.path.join(export_dir, str(existing[-1]))
            done = read_export_info(newest)
            if done and done.get("checkpoint_uid") == source.uid:
                log.info("reusing export %d of checkpoint %s (step %d): %s", existing[-1],
                         source.path, source.step, newest)
                return newest
    snapshot = [v.numpy() for v in model.variables]
    try:
        if source.step != current_step:
            status = tf.train.Checkpoint(model=model).read(source.path)
            status.assert_existing_objects_matched()
            status.expect_partial()
        signatures = named_signatures(make_signatures())
        record = {"step": source.step, "checkpoint": os.path.basename(source.path),
                  "checkpoint_uid": source.uid,
                  "metrics": source.metrics, "exported_at": time.time(), **dict(info or {})}
        path = export_saved_model(model, signatures, export_dir, info=record, config_yaml=config_yaml)
        if verify and sample is not None:
            checked = verify_export(path, signatures, sample)
            log.info("export check passed for %s: %s", path,
                     ", ".join(checked) or "no signature fits the sample batch")
    finally:
        for v, value in zip(model.variables, snapshot):
            v.assign(value)
    return path
