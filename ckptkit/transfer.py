"""Warm start: restore the matching part of another checkpoint into a fresh model.

Variables are matched by their object-graph path under the model (``model/encoder/dense/
kernel``-style paths, the attribute names of the user's code), read from the checkpoint's
own object graph. Matching by path rather than by ``tf.train.Checkpoint.restore(...)
.expect_partial()`` lets a restore rename prefixes, skip shape mismatches instead of failing
half-way, and report every variable: restored, skipped by selection, missing in the
checkpoint, mismatched in shape or dtype, and checkpoint values nothing used.

``include`` / ``exclude`` are ``fnmatch`` globs over the paths as the *new* model sees them
(after ``rename``), so a new head is left out with ``exclude: ["model/head/*"]``.
"""

from __future__ import annotations

import collections
import fnmatch
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from ckptkit import metadata
from ckptkit.errors import CheckpointMismatchError, CheckpointNotFoundError

log = logging.getLogger("ckptkit")

_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
_VALUE_ATTR = "VARIABLE_VALUE"
ROOT = "model"


@dataclass
class RestoreReport:
    """What a partial restore did, variable by variable (paths as the new model has them)."""

    source: str
    restored: List[str] = field(default_factory=list)
    skipped_by_selection: List[str] = field(default_factory=list)
    missing_in_checkpoint: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, str]] = field(default_factory=list)  # (path, why)
    unused_in_checkpoint: List[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"warm start from {self.source}: {len(self.restored)} restored, "
                f"{len(self.skipped_by_selection)} skipped by selection, "
                f"{len(self.missing_in_checkpoint)} missing in checkpoint, "
                f"{len(self.mismatched)} mismatched, "
                f"{len(self.unused_in_checkpoint)} unused in checkpoint")

    def lines(self) -> List[str]:
        out = [self.summary()]
        for title, paths in (("restored", self.restored),
                             ("skipped by selection (kept fresh)", self.skipped_by_selection),
                             ("missing in checkpoint (kept fresh)", self.missing_in_checkpoint),
                             ("unused in checkpoint", self.unused_in_checkpoint)):
            if paths:
                out.append(f"  {title}: " + ", ".join(paths))
        for path, why in self.mismatched:
            out.append(f"  mismatched (kept fresh): {path}: {why}")
        return out


def resolve_source(path: str, which: str = "latest") -> str:
    """A checkpoint prefix from a prefix, a checkpoint directory, a run directory or a
    SavedModel directory; ``which`` (``latest`` or ``best``) picks within a directory."""
    if tf.io.gfile.exists(path + ".index"):
        return path
    saved = os.path.join(path, "variables", "variables")
    if tf.io.gfile.exists(os.path.join(path, "saved_model.pb")) and tf.io.gfile.exists(saved + ".index"):
        return saved
    for directory in (path, os.path.join(path, "checkpoints")):
        if not tf.io.gfile.isdir(directory):
            continue
        found = metadata.scan(directory)
        if found and which == "best":
            doc = metadata.read_document(directory)
            best = [c for c in found if c.step in (doc.get("best") or [])]
            if not best:
                raise CheckpointNotFoundError(
                    f"checkpoint.init_from.which=best but {directory} records no best checkpoint")
            return sorted(best, key=lambda c: (doc["best"].index(c.step)))[0].path
        if found:
            return found[-1].path
        latest = tf.train.latest_checkpoint(directory)
        if latest:
            return latest
    raise CheckpointNotFoundError(
        f"{path!r} is not a checkpoint prefix, a checkpoint directory, a run directory with "
        "checkpoints or a SavedModel directory" + _what_to_pass_instead(path))


def _what_to_pass_instead(path: str) -> str:
    """A sentence for the files people pass where a checkpoint prefix is meant."""
    name = os.path.basename(path.rstrip("/"))
    if name.endswith(".index") or ".data-" in name:
        stem = name[: -len(".index")] if name.endswith(".index") else name[: name.index(".data-")]
        prefix = os.path.join(os.path.dirname(path), stem)
        return (f": it is one file of a checkpoint; pass the checkpoint's prefix, {prefix!r} "
                "(the path without .index or .data-*)")
    if name.endswith((".h5", ".hdf5")):
        return (": it is a Keras HDF5 weights file, not a TensorFlow checkpoint; load it in "
                "build_model() with model.load_weights(path), or write a checkpoint of the loaded "
                "model with tf.train.Checkpoint(model=model).write(prefix) and pass that prefix")
    if name.endswith(".keras"):
        return (": it is a Keras model archive, not a TensorFlow checkpoint; load it in "
                "build_model() with keras.models.load_model(path), or write a checkpoint of it with "
                "tf.train.Checkpoint(model=model).write(prefix) and pass that prefix")
    if not tf.io.gfile.exists(path):
        return ": nothing exists at that path"
    return ""


def has_object_graph(prefix: str) -> bool:
    """TF2 object-based checkpoints carry their object graph; TF1 Saver checkpoints do not."""
    return tf.train.load_checkpoint(prefix).has_tensor(_GRAPH_KEY)


def checkpoint_name_paths(prefix: str) -> Dict[str, str]:
    """For a TF1 name-based checkpoint: variable name -> key (the same string)."""
    return {name: name for name, _ in tf.train.list_variables(prefix)}


def variable_name(var) -> str:
    """A variable's name as a TF1 Saver would have written it: no ``:0``; a Keras 3
    variable's ``path`` (``dense/kernel``)."""
    name = getattr(var, "path", None) or var.name
    return name[:-2] if name.endswith(":0") else name


def checkpoint_variable_paths(prefix: str, root: str = ROOT) -> Dict[str, str]:
    """Object-graph path -> checkpoint key of every variable under ``root`` in ``prefix``.

    If the checkpoint's root has no child named ``root`` the whole graph is used. Paths
    start with ``root/``. A variable reachable by several paths keeps the shortest.
    """
    reader = tf.train.load_checkpoint(prefix)
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor(_GRAPH_KEY))
    start = 0
    for child in graph.nodes[0].children:
        if child.local_name == root:
            start = child.node_id
            break
    out: Dict[str, str] = {}
    seen = {start}
    queue = collections.deque([(start, root)])
    while queue:
        node_id, path = queue.popleft()
        node = graph.nodes[node_id]
        for attr in node.attributes:
            if attr.name == _VALUE_ATTR:
                out[path] = attr.checkpoint_key
        for child in node.children:
            if child.node_id not in seen:
                seen.add(child.node_id)
                queue.append((child.node_id, f"{path}/{child.local_name}"))
    return out


def _is_variable(obj) -> bool:
    return isinstance(obj, tf.Variable) or (
        hasattr(obj, "assign") and hasattr(obj, "shape") and hasattr(obj, "dtype")
        and hasattr(obj, "_serialize_to_tensors"))


def model_variable_paths(model, root: str = ROOT) -> Dict[str, object]:
    """Object-graph path -> variable for every variable of ``model`` (shortest path wins)."""
    view = tf.train.TrackableView(model)
    out: Dict[str, object] = {}
    seen = {id(model)}
    queue = collections.deque([(model, root)])
    while queue:
        obj, path = queue.popleft()
        if _is_variable(obj):
            out[path] = obj
            continue
        for name, child in view.children(obj).items():
            if id(child) not in seen:
                seen.add(id(child))
                queue.append((child, f"{path}/{name}"))
    return out


def unreachable_variables(model) -> List[str]:
    """Names of the model's variables that its object graph does not reach.

    Such variables are not written by path into a checkpoint (at best through the
    optimizer), so a model-only restore would silently leave them as they are.
    """
    reachable = {id(v) for v in model_variable_paths(model).values()}
    return [getattr(v, "path", None) or v.name for v in getattr(model, "variables", [])
            if id(v) not in reachable]


def _renamed(path: str, rename: Mapping[str, str]) -> str:
    for old in sorted(rename, key=len, reverse=True):
        if path.startswith(old):
            return rename[old] + path[len(old):]
    return path


def _selected(path: str, include: Optional[Sequence[str]], exclude: Sequence[str]) -> bool:
    if include is not None and not any(fnmatch.fnmatchcase(path, g) for g in include):
        return False
    return not any(fnmatch.fnmatchcase(path, g) for g in exclude)


Spec = Tuple[tf.TensorShape, tf.DType]


def checkpoint_specs(prefix: str) -> Dict[str, Tuple[str, Spec]]:
    """Variable path -> (checkpoint key, (shape, dtype)); paths under ``model/`` for TF2
    checkpoints and SavedModels, variable names for TF1 name-based checkpoints."""
    reader = tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
    dtypes = reader.get_variable_to_dtype_map()
    paths = checkpoint_variable_paths(prefix) if has_object_graph(prefix) else checkpoint_name_paths(prefix)
    return {p: (key, (tf.TensorShape(shapes[key]), dtypes[key])) for p, key in paths.items()}


def plan_restore(
    source: Mapping[str, Tuple[str, Spec]],
    target: Mapping[str, Spec],
    *,
    include: Optional[Sequence[str]] = None,
    exclude: Sequence[str] = (),
    rename: Optional[Mapping[str, str]] = None,
    source_name: str = "",
) -> Tuple[RestoreReport, Dict[str, str]]:
    """Match ``source`` (path -> (key, spec)) against ``target`` (path -> spec).

    Returns the report (``restored`` lists what would be restored) and target path ->
    checkpoint key for those. Pure: ``ckptkit diff`` and ``restore_partial`` share it.
    """
    renamed = {_renamed(p, dict(rename or {})): entry for p, entry in source.items()}
    report = RestoreReport(source=source_name)
    matches: Dict[str, str] = {}
    for p in sorted(target):
        want_shape, want_dtype = target[p]
        if not _selected(p, include, exclude):
            report.skipped_by_selection.append(p)
            continue
        if p not in renamed:
            report.missing_in_checkpoint.append(p)
            continue
        key, (have_shape, have_dtype) = renamed[p]
        if not want_shape.is_compatible_with(have_shape) or want_dtype != have_dtype:
            report.mismatched.append(
                (p, f"checkpoint has {have_shape.as_list()} {have_dtype.name}, "
                    f"model has {want_shape.as_list()} {want_dtype.name}"))
            continue
        matches[p] = key
        report.restored.append(p)
    report.unused_in_checkpoint = sorted(
        p for p in renamed if p not in target and _selected(p, include, exclude))
    return report, matches


def restore_partial(
    model,
    path: str,
    *,
    include: Optional[Sequence[str]] = None,
    exclude: Sequence[str] = (),
    rename: Optional[Mapping[str, str]] = None,
    strict: bool = True,
    which: str = "latest",
) -> RestoreReport:
    """Copy the selected, matching variables of checkpoint ``path`` into ``model``.

    TF2 checkpoints (and SavedModels) are matched by object-graph path under ``model/``;
    a TF1 name-based checkpoint (``tf.compat.v1.train.Saver``) by variable name, which
    ``rename`` can map. With ``strict`` a selected variable that is missing in the
    checkpoint or mismatched is an error listing every such variable, and nothing is
    assigned.
    """
    prefix = resolve_source(path, which)
    if has_object_graph(prefix):
        variables = model_variable_paths(model)
    else:
        variables = {}
        for v in model_variable_paths(model).values():
            name = variable_name(v)
            if name in variables:
                raise CheckpointMismatchError(
                    f"{prefix} is a name-based (TF1) checkpoint, matched by variable name, but "
                    f"several variables of the model are named {name!r}; give them unique names")
            variables[name] = v
        log.info("%s is a name-based (TF1) checkpoint: matching variables by name", prefix)
    target = {p: (tf.TensorShape(v.shape), tf.as_dtype(v.dtype)) for p, v in variables.items()}
    report, matches = plan_restore(checkpoint_specs(prefix), target, include=include,
                                   exclude=exclude, rename=rename, source_name=prefix)
    if strict and (report.missing_in_checkpoint or report.mismatched):
        problems = [f"{p}: missing in checkpoint" for p in report.missing_in_checkpoint]
        problems += [f"{p}: {why}" for p, why in report.mismatched]
        raise CheckpointMismatchError(
            f"warm start from {prefix} (checkpoint.init_from.strict=true) cannot restore "
            f"{len(problems)} selected variable(s):\n  " + "\n  ".join(problems)
            + "\nExclude them with checkpoint.init_from.exclude, map them with "
            "checkpoint.init_from.rename, or set checkpoint.init_from.strict=false.")
    reader = tf.train.load_checkpoint(prefix)
    for p, key in matches.items():
        variables[p].assign(reader.get_tensor(key))
    for line in report.lines():
        log.info(line)
    if report.mismatched or report.missing_in_checkpoint:
        log.warning("warm start left %d selected variable(s) freshly initialised",
                    len(report.mismatched) + len(report.missing_in_checkpoint))
    return report


def restore_optimizer(optimizer, prefix: str) -> None:
    """Carry a checkpoint's optimizer state (slots, iteration count) over as a whole.

    Needs the same trainable variables in the same order and shapes as the source run;
    anything else is an error naming the checkpoint. The learning rate stays the one this
    run configured (a fine-tune usually sets its own).
    """
    lr = getattr(optimizer, "_learning_rate", None)
    configured_lr = lr.numpy() if hasattr(lr, "assign") and hasattr(lr, "numpy") else None
    try:
        status = tf.train.Checkpoint(optimizer=optimizer).read(prefix)
        status.assert_existing_objects_matched()
        status.expect_partial()
    except (AssertionError, ValueError, tf.errors.OpError) as exc:
        raise CheckpointMismatchError(
            f"checkpoint.init_from.optimizer=true: the optimizer state in {prefix} does not fit "
            f"this model's optimizer ({str(exc).splitlines()[0]}); it carries over only between "
            "models with the same trainable variables") from exc
    if configured_lr is not None:
        lr.assign(configured_lr)
    log.info("warm start: optimizer state (slots, %s iterations) restored from %s",
             int(optimizer.iterations.numpy()) if hasattr(optimizer, "iterations") else "?", prefix)
