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
import difflib
import fnmatch
import io
import json
import logging
import os
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from ckptkit import gfile, metadata
from ckptkit._compat import patch_keras_checkpoint_children
from ckptkit.errors import CheckpointMismatchError, CheckpointNotFoundError

log = logging.getLogger("ckptkit")

_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
_VALUE_ATTR = "VARIABLE_VALUE"
ROOT = "model"


@dataclass
class RestoreReport:
    """What a partial restore did, variable by variable (paths as the new model has them)."""

    source: str
    restored: list[str] = field(default_factory=list)
    skipped_by_selection: list[str] = field(default_factory=list)
    missing_in_checkpoint: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    unused_in_checkpoint: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"warm start from {self.source}: {len(self.restored)} restored, "
            f"{len(self.skipped_by_selection)} skipped by selection, "
            f"{len(self.missing_in_checkpoint)} missing in checkpoint, "
            f"{len(self.mismatched)} mismatched, "
            f"{len(self.unused_in_checkpoint)} unused in checkpoint"
        )

    def lines(self) -> list[str]:
        out = [self.summary()]
        for title, paths in (
            ("restored", self.restored),
            ("skipped by selection (kept fresh)", self.skipped_by_selection),
            ("missing in checkpoint (kept fresh)", self.missing_in_checkpoint),
            ("unused in checkpoint", self.unused_in_checkpoint),
        ):
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
                    f"checkpoint.init_from.which=best but {directory} records no best checkpoint"
                )
            return sorted(best, key=lambda c: doc["best"].index(c.step))[0].path
        if found:
            return found[-1].path
        latest = tf.train.latest_checkpoint(directory)
        if latest:
            return latest
    raise CheckpointNotFoundError(
        f"{path!r} is not a checkpoint prefix, a checkpoint directory, a run directory with "
        "checkpoints or a SavedModel directory" + _what_to_pass_instead(path)
    )


def locate_source(path: str, which: str = "latest") -> str:
    """What a warm start from ``path`` reads: a Keras weights file as it is (it must exist),
    else the checkpoint prefix :func:`resolve_source` finds. Cheap: names and listings only,
    so ``fit()`` calls it before building the model."""
    if is_keras_file(path):
        if not tf.io.gfile.exists(path):
            raise CheckpointNotFoundError(f"{path!r}: nothing exists at that path")
        return path
    return resolve_source(path, which)


def _what_to_pass_instead(path: str) -> str:
    """A sentence for the files people pass where a checkpoint prefix is meant."""
    name = os.path.basename(path.rstrip("/"))
    if name.endswith(".index") or ".data-" in name:
        stem = name[: -len(".index")] if name.endswith(".index") else name[: name.index(".data-")]
        prefix = os.path.join(os.path.dirname(path), stem)
        return (
            f": it is one file of a checkpoint; pass the checkpoint's prefix, {prefix!r} "
            "(the path without .index or .data-*)"
        )
    if name.endswith(KERAS_FILE_SUFFIXES):
        return (
            ": it is a Keras weights file, not a TensorFlow checkpoint; a warm start reads it "
            "(checkpoint.init_from.path, restore_partial), matching layers by name"
        )
    if name.endswith((".h5", ".hdf5")):
        return (
            ": it is a Keras HDF5 weights file, not a TensorFlow checkpoint; load it in "
            "build_model() with model.load_weights(path), or write a checkpoint of the loaded "
            "model with tf.train.Checkpoint(model=model).write(prefix) and pass that prefix"
        )
    if not tf.io.gfile.exists(path):
        return ": nothing exists at that path"
    return ""


def has_object_graph(prefix: str) -> bool:
    """TF2 object-based checkpoints carry their object graph; TF1 Saver checkpoints do not."""
    return tf.train.load_checkpoint(prefix).has_tensor(_GRAPH_KEY)


# --- paths -----------------------------------------------------------------------------
#
# A variable's *path* is its object-graph path under ``model/`` with Keras's layer names in
# place of list positions. A functional or Sequential model keeps its layers in a list
# (``model/_operations/3/_kernel`` in a checkpoint) whose positions shift when a layer is
# added, so ckptkit calls that variable ``model/head/kernel``; the object-graph path stays
# an alias for include, exclude and rename. Layers a user keeps in a list attribute keep
# their positions (``model/blocks/0/kernel``): that list is the user's own structure, and
# Keras's generated names (``dense_7``) depend on what else the process built.

_KERAS_LAYER_LISTS = ("_operations", "_layers")  # Keras 3: the layers of a Functional
_TF_KERAS_LAYER_EDGE = re.compile(r"layer(_with_weights)?-\d+")  # tf-keras functional/Sequential
_TRANSPARENT_EDGES = ("_functional",)  # Keras 3: the Functional inside a Sequential


@dataclass
class Paths:
    """The variables of a model or checkpoint: path -> leaf (a variable or checkpoint key)
    for each naming asked for, and each path's object-graph path (its alias)."""

    by_naming: list[dict[str, Any]]  # leaves: tf.Variables, checkpoint keys or node ids
    raw: list[dict[str, str]]  # per naming: path -> object-graph path
    named_layers: dict[str, tuple[str | None, ...]]  # object-graph path -> name per naming


def _walk(root, root_identity, children: Callable, full_name: Callable, namings: Sequence[Callable]) -> Paths:
    """Breadth-first over an object graph from ``root``; the shortest object-graph path wins.

    ``children(node)`` yields ``(edge, child, identity)``. ``full_name(node)`` is None for
    anything but a variable, else the variable's own name (``head/kernel``, or ""); its last
    part replaces a leaf edge that is that name behind underscores (Keras 3's ``_kernel``).
    Each of ``namings`` gives a listed layer's name from ``(node, object-graph path)``, or None
    to keep its position. Two variables that would share a path both keep the object-graph one.
    """
    n = len(namings)
    found: list[tuple[str, Any, tuple[str, ...]]] = []
    named: dict[str, tuple[str | None, ...]] = {}
    queue = collections.deque([(root, ROOT, (ROOT,) * n, None)])
    seen = {root_identity}
    while queue:
        node, raw, paths, in_list = queue.popleft()
        for edge, child, identity in children(node):
            if identity in seen:
                continue
            seen.add(identity)
            child_raw, child_list = f"{raw}/{edge}", None
            name = full_name(child)
            if name is not None:
                leaf = name.rsplit("/", 1)[-1]
                segment = leaf if leaf and edge.lstrip("_") == leaf else edge
                found.append((child_raw, child, tuple(f"{p}/{segment}" for p in paths)))
                continue
            if edge in _TRANSPARENT_EDGES:
                child_paths = paths
            elif edge in _KERAS_LAYER_LISTS:
                child_paths, child_list = paths, edge
            elif (in_list and edge.isdigit()) or _TF_KERAS_LAYER_EDGE.fullmatch(edge):
                names = tuple(naming(child, child_raw) for naming in namings)
                named[child_raw] = names
                spelled = f"{in_list}/{edge}" if in_list else edge
                child_paths = tuple(f"{p}/{nm or spelled}" for p, nm in zip(paths, names, strict=True))
            else:
                child_paths = tuple(f"{p}/{edge}" for p in paths)
            queue.append((child, child_raw, child_paths, child_list))
    out = Paths([{} for _ in range(n)], [{} for _ in range(n)], named)
    for i in range(n):
        counts = collections.Counter(paths[i] for _, _, paths in found)
        for raw, leaf, paths in found:
            path = paths[i] if counts[paths[i]] == 1 else raw
            out.by_naming[i][path] = leaf
            out.raw[i][path] = raw
    return out


def _own_layer_name(variable_names: Sequence[str]) -> str | None:
    """A layer's name as its own variables carry it (``head`` of ``head/kernel``)."""
    owners = {name.split("/")[-2] for name in variable_names if name.count("/") >= 1}
    return owners.pop() if len(owners) == 1 else None


def _checkpoint_graph(prefix: str, reader=None):
    reader = reader or tf.train.load_checkpoint(prefix)
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor(_GRAPH_KEY))
    return graph


def checkpoint_paths(prefix: str, layer_names: Mapping[str, str] | None = None, *, graph=None) -> Paths:
    """The variables of ``prefix`` under ``model`` (the whole graph if the root has no child
    ``model``): path -> checkpoint key. A listed layer is named by ``layer_names``
    (object-graph path -> name, as ckptkit records it next to a checkpoint), else by the
    names its own variables carry; a layer with no variables of its own and no record keeps
    its position. ``graph``: the checkpoint's object graph, if already parsed."""
    graph = graph or _checkpoint_graph(prefix)
    start = next((c.node_id for c in graph.nodes[0].children if c.local_name == ROOT), 0)
    value = {i: next((a for a in node.attributes if a.name == _VALUE_ATTR), None) for i, node in enumerate(graph.nodes)}
    record = dict(layer_names or {})

    def children(node_id):
        return [(c.local_name, c.node_id, c.node_id) for c in graph.nodes[node_id].children]

    def full_name(node_id):
        attr = value[node_id]
        return None if attr is None else attr.full_name

    def naming(node_id, raw):
        if raw in record:
            return record[raw]
        return _own_layer_name(
            [full_name(c.node_id) for c in graph.nodes[node_id].children if value[c.node_id] is not None]
        )

    paths = _walk(start, start, children, full_name, [naming])
    keys = {node_id: attr.checkpoint_key for node_id, attr in value.items() if attr is not None}
    paths.by_naming[0] = {p: keys[node_id] for p, node_id in paths.by_naming[0].items()}
    return paths


def optimizer_slots(prefix: str, paths: Mapping[str, str], root: str = "optimizer") -> dict[str, str]:
    """Checkpoint key -> ``<slot> of <variable path>`` for a Keras 3 optimizer's slot
    variables (``optimizer/_variables/7`` is ``velocity of model/head/kernel``).

    Keras keeps the slots in one list, the same number per trainable variable, in the order
    of ``_trainable_variables``; each is checked to have its variable's shape, else nothing
    is claimed. ``paths`` is path -> checkpoint key of the model's variables."""
    graph = _checkpoint_graph(prefix)
    shapes = tf.train.load_checkpoint(prefix).get_variable_to_shape_map()

    def child(node_id, name):
        return next((c.node_id for c in graph.nodes[node_id].children if c.local_name == name), None)

    def key(node_id):
        return next((a.checkpoint_key for a in graph.nodes[node_id].attributes if a.name == _VALUE_ATTR), None)

    opt = child(0, root)
    listed = [child(opt, n) if opt is not None else None for n in ("_trainable_variables", "_variables")]
    if None in listed:
        return {}
    owners = [key(c.node_id) for c in graph.nodes[listed[0]].children]
    own = {child(opt, n) for n in ("_iterations", "_learning_rate")}
    slots = [c.node_id for c in graph.nodes[listed[1]].children if c.node_id not in own]
    if not owners or not slots or len(slots) % len(owners):
        return {}
    per = len(slots) // len(owners)
    path_of = {k: p for p, k in paths.items()}
    out = {}
    for j, node_id in enumerate(slots):
        owner, slot = owners[j // per], key(node_id)
        if owner not in path_of or slot is None or shapes.get(slot) != shapes.get(owner):
            return {}
        name = next(a.full_name for a in graph.nodes[node_id].attributes if a.name == _VALUE_ATTR)
        out[slot] = f"{name.rsplit('_', 1)[-1]} of {path_of[owner]}"
    return out


def checkpoint_variable_paths(prefix: str) -> dict[str, str]:
    """Path -> checkpoint key of every variable under ``model`` in ``prefix``, named with the
    layer names ckptkit recorded for it (see :func:`recorded_layer_names`)."""
    return checkpoint_paths(prefix, recorded_layer_names(prefix)).by_naming[0]


def _is_variable(obj) -> bool:
    return isinstance(obj, tf.Variable) or (
        hasattr(obj, "assign")
        and hasattr(obj, "shape")
        and hasattr(obj, "dtype")
        and hasattr(obj, "_serialize_to_tensors")
    )


def variable_name(var) -> str:
    """A variable's name as a TF1 Saver would have written it: no ``:0``; a Keras 3
    variable's ``path`` (``dense/kernel``)."""
    name = getattr(var, "path", None) or var.name
    return name[:-2] if name.endswith(":0") else name


def _model_walk(model) -> Paths:
    """The model's variables named two ways: by the layers' real names, and as a checkpoint
    of it without ckptkit's record would name them (by the names their variables carry)."""
    patch_keras_checkpoint_children()
    view = tf.train.TrackableView(model)

    def children(obj):
        if _is_variable(obj):
            return []
        return [(edge, child, id(child)) for edge, child in view.children(obj).items()]

    def full_name(obj):
        return variable_name(obj) if _is_variable(obj) else None

    def real_name(obj, raw):
        name = getattr(obj, "name", None)
        return name if isinstance(name, str) and name and "/" not in name else None

    def carried_name(obj, raw):
        return _own_layer_name([variable_name(c) for c in view.children(obj).values() if _is_variable(c)])

    return _walk(model, id(model), children, full_name, [real_name, carried_name])


def model_variable_paths(model) -> dict[str, Any]:
    """Path -> variable for every variable of ``model`` (shortest object-graph path wins)."""
    return _model_walk(model).by_naming[0]


def layer_names_record(model) -> dict[str, str]:
    """What a checkpoint of ``model`` cannot tell by itself: object-graph path -> name of
    each listed layer whose name its own variables do not carry (a nested model, a layer
    made only of sublayers). ckptkit keeps it in ``metadata.json`` and the export's
    ``ckptkit_export.json``, so its checkpoints and exports are named in full."""
    walked = _model_walk(model)
    holding = set(walked.raw[0].values())
    return {
        raw: real
        for raw, (real, carried) in walked.named_layers.items()
        if real is not None and real != carried and any(r.startswith(raw + "/") for r in holding)
    }


def recorded_layer_names(prefix: str) -> dict[str, str]:
    """The layer names ckptkit recorded for the checkpoint or export at ``prefix``."""
    directory, base = os.path.split(prefix)
    step = metadata.step_of(prefix)
    if step is not None:
        entry = metadata.read_entries(directory).get(step)
        return dict(entry.layer_names or {}) if entry is not None else {}
    if base == "variables" and os.path.basename(directory) == "variables":
        info = os.path.join(os.path.dirname(directory), "assets.extra", "ckptkit_export.json")
        try:
            with tf.io.gfile.GFile(info) as f:
                names = json.load(f).get("layer_names")
        except (tf.errors.OpError, ValueError, AttributeError):
            return {}
        if isinstance(names, dict):
            return {k: v for k, v in names.items() if isinstance(k, str) and isinstance(v, str)}
    return {}


def unreachable_variables(model, reached=None) -> list[str]:
    """Names of the model's variables that its object graph does not reach (``reached``:
    the variables a walk of it found, if already walked).

    Such variables are not written by path into a checkpoint (at best through the
    optimizer), so a model-only restore would silently leave them as they are.
    """
    reachable = {id(v) for v in (model_variable_paths(model).values() if reached is None else reached)}
    return [getattr(v, "path", None) or v.name for v in getattr(model, "variables", []) if id(v) not in reachable]


def _renamed(path: str, rename: Mapping[str, str]) -> str:
    for old in sorted(rename, key=len, reverse=True):
        if path.startswith(old):
            return rename[old] + path[len(old) :]
    return path


def _selected(spellings: Sequence[str], include: Sequence[str] | None, exclude: Sequence[str]) -> bool:
    """Whether a variable known by ``spellings`` (its path, then its aliases) is selected:
    ``include`` (if given) must match one of them, ``exclude`` none."""

    def matches(globs):
        return any(fnmatch.fnmatchcase(s, g) for s in spellings for g in globs)

    return (include is None or matches(include)) and not matches(exclude)


Spec = tuple[tf.TensorShape, tf.DType]


@dataclass(frozen=True)
class Entry:
    """One variable of a source or a target: its key in the source (a checkpoint key, an
    HDF5 dataset; "" in a target), its shape and dtype, and the other spellings of its path
    (the object-graph path; in a model also the path a checkpoint of it would have had
    without ckptkit's record of layer names)."""

    key: str
    spec: Spec
    aliases: tuple[str, ...] = ()


def _flat_variable_list(paths: Mapping[str, str]) -> bool:
    """A SavedModel that keeps its variables in one list (Keras's ``model.export()``:
    ``variables/0``, ``variables/1``, ...) says nothing by path: match it by variable name."""
    return bool(paths) and all(re.fullmatch(rf"{ROOT}/[^/]+/\d+", p) for p in paths)


def checkpoint_specs(prefix: str, reader=None) -> dict[str, Entry]:
    """Variable path -> Entry: layer-name paths under ``model/`` for TF2 checkpoints and
    SavedModels, variable names for TF1 name-based checkpoints and flat variable lists.
    ``reader``: the checkpoint's reader, if already open."""
    reader = reader or tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
    dtypes = reader.get_variable_to_dtype_map()

    def spec(key):
        return tf.TensorShape(shapes[key]), dtypes[key]

    if not reader.has_tensor(_GRAPH_KEY):  # a TF1 name-based checkpoint
        return {name: Entry(name, spec(name)) for name in shapes}
    graph = _checkpoint_graph(prefix, reader)
    walked = checkpoint_paths(prefix, recorded_layer_names(prefix), graph=graph)
    keys, raw = walked.by_naming[0], walked.raw[0]
    if _flat_variable_list(keys):
        names = {
            a.checkpoint_key: a.full_name
            for node in graph.nodes
            for a in node.attributes
            if a.name == _VALUE_ATTR and a.full_name
        }
        if all(k in names for k in keys.values()):
            by_name: dict[str, Entry] = {}
            for p, k in keys.items():  # Keras lists each variable twice (variables, _all_variables)
                by_name.setdefault(names[k], Entry(k, spec(k), (p,)))
            return by_name
    return {p: Entry(k, spec(k), (raw[p],) if raw[p] != p else ()) for p, k in keys.items()}


def by_variable_name(entries: Mapping[str, Entry]) -> bool:
    """Whether ``checkpoint_specs`` keyed these by variable name rather than by path."""
    return not any(p == ROOT or p.startswith(ROOT + "/") for p in entries)


def plan_restore(
    source: Mapping[str, Entry],
    target: Mapping[str, Entry],
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    rename: Mapping[str, str] | None = None,
    source_name: str = "",
) -> tuple[RestoreReport, dict[str, str]]:
    """Match ``source`` against ``target`` (both path -> Entry).

    ``rename`` maps prefixes of source paths (or of their aliases) to target paths; a target
    variable takes the source of its path, else of one of its aliases. Returns the report
    (``restored`` lists what would be restored) and target path -> source key for those.
    Pure: ``ckptkit diff`` and ``restore_partial`` share it.
    """
    rename = dict(rename or {})
    renamed: dict[str, Entry] = {}
    for p, entry in source.items():
        q = _renamed(p, rename)
        for alias in entry.aliases if q == p else ():
            if _renamed(alias, rename) != alias:
                q = _renamed(alias, rename)
                break
        renamed[q] = entry
    report = RestoreReport(source=source_name)
    matches: dict[str, str] = {}
    claimed = set()
    for p in sorted(target):
        want = target[p]
        if not _selected((p, *want.aliases), include, exclude):
            report.skipped_by_selection.append(p)
            continue
        found = next((q for q in (p, *want.aliases) if q in renamed and q not in claimed), None)
        if found is None:
            report.missing_in_checkpoint.append(p)
            continue
        claimed.add(found)
        have = renamed[found]
        (want_shape, want_dtype), (have_shape, have_dtype) = want.spec, have.spec
        if not want_shape.is_compatible_with(have_shape) or want_dtype != have_dtype:
            report.mismatched.append(
                (
                    p,
                    f"checkpoint has {have_shape.as_list()} {have_dtype.name}, "
                    f"model has {want_shape.as_list()} {want_dtype.name}",
                )
            )
            continue
        matches[p] = have.key
        report.restored.append(p)
    report.unused_in_checkpoint = sorted(
        q for q, e in renamed.items() if q not in claimed and _selected((q, *e.aliases), include, exclude)
    )
    return report, matches


def _rename_between(source: str, target: str) -> tuple[str, str] | None:
    """The prefix rename that maps ``source`` onto ``target`` (their differing leading parts)."""
    s, t = source.split("/"), target.split("/")
    n = 0
    while n < min(len(s), len(t)) - 1 and s[-1 - n] == t[-1 - n]:
        n += 1
    if n == 0:
        return None
    return "/".join(s[:-n]) + "/", "/".join(t[:-n]) + "/"


def nearest_hints(report: RestoreReport, limit: int = 10) -> list[str]:
    """For each missing variable the nearest unused checkpoint names, and the renames that
    would map them (most variables first), as lines of an error message."""
    lines: list[str] = []
    renames: collections.Counter[tuple[str, str]] = collections.Counter()
    for p in report.missing_in_checkpoint:
        near = difflib.get_close_matches(p, report.unused_in_checkpoint, n=2, cutoff=0.5)
        if near and len(lines) < limit:
            lines.append(f"{p}: nearest in checkpoint: {', '.join(near)}")
        if near and (rename := _rename_between(near[0], p)):
            renames[rename] += 1
    for (old, new), count in renames.most_common(3):
        lines.append(
            f"checkpoint.init_from.rename='{{{old}: {new}}}' would map {count} of them (one command-line override)"
        )
    return lines


def _target(
    model,
    names_only: bool,
    extra_aliases: Mapping[int, str] | None = None,
) -> tuple[dict[str, Entry], dict[str, Any]]:
    """The model's variables as a restore target: path -> Entry, and path -> variable.
    ``extra_aliases`` (id(variable) -> spelling) adds a spelling to each variable's."""
    walked = _model_walk(model)
    variables = walked.by_naming[0]
    if names_only:
        by_name: dict[str, Any] = {}
        for v in variables.values():
            name = variable_name(v)
            if name in by_name:
                raise CheckpointMismatchError(
                    f"the checkpoint is matched by variable name, but several variables of the "
                    f"model are named {name!r}; give them unique names"
                )
            by_name[name] = v
        return {p: Entry("", _spec_of(v)) for p, v in by_name.items()}, by_name
    carried = {id(v): p for p, v in walked.by_naming[1].items()}
    target = {}
    for p, v in variables.items():
        spellings = (carried.get(id(v)), walked.raw[0][p], (extra_aliases or {}).get(id(v)))
        aliases = tuple(dict.fromkeys(a for a in spellings if a and a != p))
        target[p] = Entry("", _spec_of(v), aliases)
    return target, variables


def _spec_of(v) -> Spec:
    return tf.TensorShape(v.shape), tf.as_dtype(v.dtype)


# --- Keras weights files ---------------------------------------------------------------
#
# Keras 3 writes ``.weights.h5`` (and the ``model.weights.h5`` inside a ``.keras`` archive)
# as one HDF5 group per layer, keyed by class names and counters (``layers/dense_1/vars/0``),
# with the layer's own name in the attribute ``name`` of its ``vars`` group. ckptkit matches
# such a file by layer name: a variable is ``model/<layer names from the root>/<position
# among its layer's own variables>`` there (``model/bb/body/0``), and the new model's
# variables carry that spelling as an alias of their paths (``model/bb/body/kernel``).

KERAS_FILE_SUFFIXES = (".weights.h5", ".keras")


def is_keras_file(path: str) -> bool:
    return path.endswith(KERAS_FILE_SUFFIXES) and not tf.io.gfile.isdir(path)


def _sublayers(layer) -> list:
    flatten = getattr(layer, "_flatten_layers", None)
    return list(flatten(include_self=False, recursive=False)) if flatten else []


def _own_variables(layer) -> list:
    return list(getattr(layer, "_trainable_variables", [])) + list(getattr(layer, "_non_trainable_variables", []))


def keras_layer_aliases(model) -> dict[int, str]:
    """id(variable) -> ``model/<layer names>/<position>``, the spelling a Keras weights file
    gives the variable (see above)."""
    out: dict[int, str] = {}
    queue = collections.deque((layer, f"{ROOT}/{layer.name}") for layer in _sublayers(model))
    for i, v in enumerate(_own_variables(model)):
        out.setdefault(id(v), f"{ROOT}/{i}")
    seen = set()
    while queue:
        layer, path = queue.popleft()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        for i, v in enumerate(_own_variables(layer)):
            out.setdefault(id(v), f"{path}/{i}")
        queue.extend((sub, f"{path}/{sub.name}") for sub in _sublayers(layer))
    return out


def _refuse_outside_storage(h5file, path: str) -> None:
    """Refuse an HDF5 file any of whose datasets h5py would read from somewhere else: a
    dataset with *external* storage (raw bytes of any file named in it), a *virtual* dataset
    (its sources are other files), an external link (another file's object). Keras writes
    none of them, and following one would copy bytes from outside the file into the model,
    and from there into every checkpoint and export. Links are inspected without being
    followed; soft links stay inside the file and are visited where they point."""
    import h5py

    def refuse(name: str, why: str):
        raise CheckpointMismatchError(
            f"{path}: HDF5 object /{name} {why}; Keras never writes one, and ckptkit does not read "
            "data from outside the weights file (refused)"
        )

    stack = [("", h5file)]
    seen: set = set()
    while stack:
        prefix, group = stack.pop()
        for key in group:
            name = f"{prefix}{key}"
            link = group.get(key, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                refuse(name, f"is an external link to {link.filename}:{link.path}")
            if isinstance(link, h5py.SoftLink):
                continue  # names an object of this file, which the walk reaches by its hard link
            obj = group.get(key)
            if isinstance(obj, h5py.Dataset):
                if obj.is_virtual:
                    sources = sorted({m.file_name for m in obj.virtual_sources()})
                    refuse(name, "is a virtual dataset reading " + ", ".join(sources))
                if obj.external:
                    refuse(name, "stores its bytes in external file(s) " + ", ".join(str(e[0]) for e in obj.external))
            elif isinstance(obj, h5py.Group) and obj.id not in seen:
                seen.add(obj.id)
                stack.append((f"{name}/", obj))


class _KerasFile:
    """The variables of a ``.weights.h5`` or ``.keras`` file, by layer name."""

    def __init__(self, path: str):
        import h5py  # a dependency of Keras 3

        self.path = path
        try:
            if path.endswith(".keras"):
                self._file = h5py.File(self._weights_of_archive(path), "r")
            elif not gfile.is_local(path):  # h5py reads local files; anything else is read into memory
                with tf.io.gfile.GFile(path, "rb") as f:
                    self._file = h5py.File(io.BytesIO(f.read()), "r")
            else:
                self._file = h5py.File(path, "r")
        except OSError as exc:
            raise CheckpointNotFoundError(f"{path} is not a Keras weights file (HDF5): {exc}") from exc
        try:
            _refuse_outside_storage(self._file, path)
        except BaseException:
            self._file.close()
            raise

    @staticmethod
    def _weights_of_archive(path: str) -> io.BytesIO:
        try:
            with tf.io.gfile.GFile(path, "rb") as raw, zipfile.ZipFile(raw) as archive:
                if "model.weights.h5" not in archive.namelist():
                    raise CheckpointNotFoundError(
                        f"{path} is a .keras archive without model.weights.h5 (the weights of a "
                        "Keras 3 model); it holds: " + ", ".join(archive.namelist()[:10])
                    )
                info = archive.getinfo("model.weights.h5")
                if info.file_size > 100 * max(info.compress_size, 1):  # weights barely compress
                    raise CheckpointNotFoundError(
                        f"{path}: model.weights.h5 would expand {info.compress_size} bytes to "
                        f"{info.file_size}; not a weights file Keras wrote (refused)"
                    )
                with archive.open(info) as member:
                    return io.BytesIO(member.read())
        except (zipfile.BadZipFile, tf.errors.OpError) as exc:  # OpError: seeking before the start
            reason = getattr(exc, "message", None) or str(exc)
            raise CheckpointNotFoundError(f"{path} is not a .keras archive (not a zip file: {reason})") from exc

    def entries(self) -> dict[str, Entry]:
        import h5py

        groups = {}  # HDF5 path of a layer group -> its layer name

        def visit(name, obj):
            if isinstance(obj, h5py.Group) and name.endswith("vars") and "name" in obj.attrs:
                groups[name[: -len("vars")].rstrip("/")] = str(obj.attrs["name"])

        self._file.visititems(visit)
        if not groups:
            raise CheckpointMismatchError(
                f"{self.path} records no layer names (written by a Keras older than 3.x, or by "
                "tf-keras), so ckptkit cannot match it by name; load it in build_model() with "
                "model.load_weights(path), which matches by position"
            )
        out: dict[str, Entry] = {}
        for group, _ in sorted(groups.items()):
            chain = [groups[g] for g in self._ancestors(group) if g in groups and g != ""]
            for i, ds in sorted(self._file[f"{group}/vars" if group else "vars"].items()):
                if isinstance(ds, h5py.Dataset):
                    key = f"{group}/vars/{i}" if group else f"vars/{i}"
                    out["/".join([ROOT, *chain, i])] = Entry(key, (tf.TensorShape(ds.shape), tf.as_dtype(ds.dtype)))
        return out

    @staticmethod
    def _ancestors(group: str) -> list[str]:
        parts = group.split("/") if group else []
        return ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]

    def read(self, key: str):
        return self._file[key][()]

    def close(self) -> None:
        self._file.close()


# --- warm start --------------------------------------------------------------------------


def _open_source(model, prefix: str):
    """What a warm start reads from ``prefix`` and writes into ``model``: (source specs, a
    reader of one entry, the model's target specs, the model's variables by path)."""
    if is_keras_file(prefix):
        keras_file = _KerasFile(prefix)
        log.info("%s is a Keras weights file: matching layers by the names it records", prefix)
        target, variables = _target(model, False, keras_layer_aliases(model))
        return keras_file.entries(), keras_file.read, target, variables
    reader = tf.train.load_checkpoint(prefix)
    source = checkpoint_specs(prefix, reader)
    names_only = by_variable_name(source)
    if names_only:
        log.info(
            "%s is matched by variable name (%s)",
            prefix,
            "a name-based TF1 checkpoint"
            if not reader.has_tensor(_GRAPH_KEY)
            else "a SavedModel that lists its variables without structure",
        )
    target, variables = _target(model, names_only)
    return source, reader.get_tensor, target, variables


def _strict_refusal(prefix: str, report: RestoreReport, hidden: Sequence[str]) -> CheckpointMismatchError:
    problems = [f"{p}: missing in checkpoint" for p in report.missing_in_checkpoint]
    problems += [f"{p}: {why}" for p, why in report.mismatched]
    problems += [
        f"{n}: not reachable through the model's attributes, so no checkpoint holds it by path" for n in hidden
    ]
    hints = nearest_hints(report)
    return CheckpointMismatchError(
        f"warm start from {prefix} (checkpoint.init_from.strict=true) cannot restore "
        f"{len(problems)} selected variable(s):\n  "
        + "\n  ".join(problems)
        + ("\n  " + "\n  ".join(hints) if hints else "")
        + "\nExclude them with checkpoint.init_from.exclude, map them with "
        "checkpoint.init_from.rename, or set checkpoint.init_from.strict=false."
    )


def restore_partial(
    model,
    path: str,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    rename: Mapping[str, str] | None = None,
    strict: bool = True,
    which: str = "latest",
) -> RestoreReport:
    """Copy the selected, matching variables of checkpoint ``path`` into ``model``.

    TF2 checkpoints and SavedModels are matched by path under ``model/`` (Keras layers by
    name, see above); a TF1 name-based checkpoint (``tf.compat.v1.train.Saver``) and a
    SavedModel that lists its variables flat (``model.export()``) by variable name, which
    ``rename`` can map. With ``strict`` every selected variable of the model must be filled,
    checked by count over all of the model's variables: anything missing, mismatched or
    unreachable is one error listing each, and nothing is assigned.
    """
    prefix = locate_source(path, which)
    source, read, target, variables = _open_source(model, prefix)
    report, matches = plan_restore(source, target, include=include, exclude=exclude, rename=rename, source_name=prefix)
    hidden = unreachable_variables(model, variables.values())
    if strict and (report.missing_in_checkpoint or report.mismatched or hidden):
        raise _strict_refusal(prefix, report, hidden)
    if strict:
        _check_filled(model, variables, report)
    for p, key in matches.items():
        variables[p].assign(read(key))
    for line in report.lines():
        log.info(line)
    if report.mismatched or report.missing_in_checkpoint or hidden:
        log.warning(
            "warm start left %d selected variable(s) freshly initialised%s",
            len(report.mismatched) + len(report.missing_in_checkpoint) + len(hidden),
            f" ({len(hidden)} not reachable by path: {', '.join(hidden)})" if hidden else "",
        )
    return report


def _check_filled(model, variables: Mapping[str, Any], report: RestoreReport) -> None:
    """Strict, by count: every variable of the model is restored or skipped by selection."""
    every = {id(v): v for v in (*getattr(model, "variables", ()), *variables.values())}
    accounted = {id(variables[p]) for p in (*report.restored, *report.skipped_by_selection)}
    left = [variable_name(v) for i, v in every.items() if i not in accounted]
    if left:
        raise CheckpointMismatchError(
            f"warm start from {report.source}: {len(report.restored)} restored and "
            f"{len(report.skipped_by_selection)} skipped of the model's {len(every)} variables; "
            f"not filled: {', '.join(left)}"
        )


def restore_optimizer(optimizer, prefix: str) -> None:
    """Carry a checkpoint's optimizer state (slots, iteration count) over as a whole.

    Needs the same trainable variables in the same order and shapes as the source run;
    anything else is an error naming the checkpoint. The learning rate stays the one this
    run configured (a fine-tune usually sets its own).
    """
    if is_keras_file(prefix):
        raise CheckpointMismatchError(
            f"checkpoint.init_from.optimizer=true, but {prefix} is a Keras weights file, which "
            "holds no optimizer state; set checkpoint.init_from.optimizer=false"
        )
    lr = getattr(optimizer, "_learning_rate", None)
    if not (hasattr(lr, "assign") and hasattr(lr, "numpy")):
        lr = None  # a schedule, or no learning rate to keep
    configured_lr = None if lr is None else lr.numpy()
    try:
        status = tf.train.Checkpoint(optimizer=optimizer).read(prefix)
        status.assert_existing_objects_matched()
        status.expect_partial()
    except (AssertionError, ValueError, tf.errors.OpError) as exc:
        raise CheckpointMismatchError(
            f"checkpoint.init_from.optimizer=true: the optimizer state in {prefix} does not fit "
            f"this model's optimizer ({str(exc).splitlines()[0]}); it carries over only between "
            "models with the same trainable variables"
        ) from exc
    if lr is not None:
        lr.assign(configured_lr)
    log.info(
        "warm start: optimizer state (slots, %s iterations) restored from %s",
        int(optimizer.iterations.numpy()) if hasattr(optimizer, "iterations") else "?",
        prefix,
    )
