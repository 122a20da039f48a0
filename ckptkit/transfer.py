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


def resolve_source(path: str) -> str:
    """A checkpoint prefix from a prefix, a checkpoint directory or a run directory."""
    if tf.io.gfile.exists(path + ".index"):
        return path
    for directory in (path, os.path.join(path, "checkpoints")):
        if tf.io.gfile.isdir(directory):
            found = metadata.scan(directory)
            if found:
                return found[-1].path
            latest = tf.train.latest_checkpoint(directory)
            if latest:
                return latest
    raise CheckpointNotFoundError(
        f"checkpoint.init_from.path {path!r} is not a checkpoint prefix, a checkpoint "
        "directory or a run directory with checkpoints")


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


def restore_partial(
    model,
    path: str,
    *,
    include: Optional[Sequence[str]] = None,
    exclude: Sequence[str] = (),
    rename: Optional[Mapping[str, str]] = None,
    strict: bool = True,
) -> RestoreReport:
    """Copy the selected, matching variables of checkpoint ``path`` into ``model``.

    With ``strict`` a selected variable that is missing in the checkpoint or mismatched
    is an error listing every such variable, and nothing is assigned.
    """
    prefix = resolve_source(path)
    rename = dict(rename or {})
    source = {_renamed(p, rename): key for p, key in checkpoint_variable_paths(prefix).items()}
    target = model_variable_paths(model)
    reader = tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
    dtypes = reader.get_variable_to_dtype_map()
    report = RestoreReport(source=prefix)
    assignments = []
    for p in sorted(target):
        var = target[p]
        if not _selected(p, include, exclude):
            report.skipped_by_selection.append(p)
            continue
        key = source.get(p)
        if key is None:
            report.missing_in_checkpoint.append(p)
            continue
        want_shape = tf.TensorShape(var.shape)
        want_dtype = tf.as_dtype(var.dtype)
        have_shape = tf.TensorShape(shapes[key])
        have_dtype = dtypes[key]
        if not want_shape.is_compatible_with(have_shape) or want_dtype != have_dtype:
            report.mismatched.append(
                (p, f"checkpoint has {have_shape.as_list()} {have_dtype.name}, "
                    f"model has {want_shape.as_list()} {want_dtype.name}"))
            continue
        assignments.append((p, var, key))
    used = {key for _, _, key in assignments}
    report.unused_in_checkpoint = sorted(
        p for p, key in source.items()
        if key not in used and p not in target and _selected(p, include, exclude))
    if strict and (report.missing_in_checkpoint or report.mismatched):
        problems = [f"{p}: missing in checkpoint" for p in report.missing_in_checkpoint]
        problems += [f"{p}: {why}" for p, why in report.mismatched]
        raise CheckpointMismatchError(
            f"warm start from {prefix} (checkpoint.init_from.strict=true) cannot restore "
            f"{len(problems)} selected variable(s):\n  " + "\n  ".join(problems)
            + "\nExclude them with checkpoint.init_from.exclude, map them with "
            "checkpoint.init_from.rename, or set checkpoint.init_from.strict=false.")
    for p, var, key in assignments:
        var.assign(reader.get_tensor(key))
        report.restored.append(p)
    for line in report.lines():
        log.info(line)
    if report.mismatched or report.missing_in_checkpoint:
        log.warning("warm start left %d selected variable(s) freshly initialised",
                    len(report.mismatched) + len(report.missing_in_checkpoint))
    return report
