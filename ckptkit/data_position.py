"""What a checkpoint holds of the training data, and whether the data changed since.

**A position, not examples.** A tf.data iterator's saved state holds, by default, every
element its transformations buffer: ``prefetch``'s batches, ``map(num_parallel_calls)``'s
elements in flight, ``batch``'s partial batch and ``shuffle``'s buffer, serialized at every
save (12.8 MB a save for 96 examples of 400 kB). With ``tf.data.Options.
experimental_symbolic_checkpoint`` (TensorFlow 2.13+) the transformations that support it
save their position instead and recompute what they buffered on restore; together with
``ckptkit.data.shuffle``'s global shuffle the whole position is an index, a seed and a few
counters (about 1 kB, whatever the examples' or the dataset's size). :func:`prepare` turns it
on for the training dataset unless the pipeline has a buffered ``shuffle`` (which does not
support it, and whose state would then be stored twice over) or the user set the option;
:func:`buffer_report` says which transformation still holds how many bytes per save.

**A record of the data.** :func:`record` describes the training data once per launch: its
length per pass, its element spec, its transformations with their settings (the pipeline),
and a SHA-256 over the first elements it yields (``SAMPLE_ELEMENTS`` batches, read from the
training iterator and put back). Every checkpoint's ``metadata.json`` entry carries it. On
resume :func:`changes` compares the checkpoint's record with the current one and tells a
changed *pipeline* (the saved position does not fit it) from changed *content* (the
position fits, but points into data that is gone): the Trainer acts on it
(``checkpoint.on_data_change``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import tensorflow as tf

log = logging.getLogger("ckptkit")

#: Elements of the training iterator (batches, mostly) hashed into a record's ``sample``.
SAMPLE_ELEMENTS = 4
_SETTINGS = {
    "_buffer_size": "buffer_size",
    "_batch_size": "batch_size",
    "_drop_remainder": "drop_remainder",
    "_num_parallel_calls": "num_parallel_calls",
    "_count": "count",
    "_window_size": "size",
}


def _inputs(node: tf.data.Dataset) -> list:
    try:
        return list(node._inputs())
    except Exception:  # noqa: BLE001 - a dataset kind without inputs to follow
        return []


def pipeline_nodes(ds: tf.data.Dataset) -> list[tf.data.Dataset]:
    """The datasets of the pipeline, outermost first (the inputs' inputs, not the datasets
    built inside ``interleave``/``flat_map`` functions)."""
    out, seen, todo = [], set(), [ds]
    while todo:
        node = todo.pop(0)
        if id(node) in seen:
            continue
        seen.add(id(node))
        out.append(node)
        todo.extend(_inputs(node))
    return out


def _kind(node: tf.data.Dataset) -> str:
    name = type(node).__name__.strip("_")
    for suffix in ("DatasetV2", "DatasetV1", "Dataset"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return "".join("_" + c.lower() if c.isupper() and i else c.lower() for i, c in enumerate(name))


def _value(v: Any) -> Any:
    try:
        v = v.numpy() if hasattr(v, "numpy") else v
        return v.item() if hasattr(v, "item") else v
    except Exception:  # noqa: BLE001 - a symbolic value: unknown here
        return "?"


def describe_pipeline(ds: tf.data.Dataset) -> tuple[str, ...]:
    """The pipeline's transformations with their settings, outermost first, e.g.
    ``("prefetch(buffer_size=-1)", "batch(batch_size=16, drop_remainder=True)", ...)``."""
    steps = []
    for node in pipeline_nodes(ds):
        kind = _kind(node)
        if kind == "options":  # with_options: not a transformation of the data
            continue
        settings = [
            f"{label}={_value(getattr(node, attr))}" for attr, label in _SETTINGS.items() if hasattr(node, attr)
        ]
        steps.append(f"{kind}({', '.join(settings)})" if settings else kind)
    return tuple(steps)


def element_bytes(spec: Any) -> int | None:
    """Bytes of one element of ``spec`` when every shape is fully known, else None."""
    total = 0
    for s in tf.nest.flatten(spec):
        shape = getattr(s, "shape", None)
        dtype = getattr(s, "dtype", None)
        if shape is None or dtype is None or not shape.is_fully_defined() or dtype == tf.string:
            return None
        total += int(np.prod(shape.as_list(), dtype=np.int64)) * dtype.size
    return total


def _size(n: float | None) -> str:
    if n is None:
        return "? bytes"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def has_buffered_shuffle(ds: tf.data.Dataset) -> bool:
    return any(_kind(n) in ("shuffle", "shuffle_and_repeat") for n in pipeline_nodes(ds))


def prepare(ds: tf.data.Dataset, resumed_symbolic: bool | None = None) -> tuple[tf.data.Dataset, bool]:
    """``ds`` with symbolic checkpointing where it helps; and whether it is on.

    ``resumed_symbolic``: how the checkpoint the run resumes from saved its position (a
    position saved with buffers and restored symbolically silently skips what was
    buffered, so a run keeps the way it started with)."""
    chosen = ds.options().experimental_symbolic_checkpoint
    if chosen is not None:
        return ds, bool(chosen)
    want = resumed_symbolic if resumed_symbolic is not None else not has_buffered_shuffle(ds)
    if not want:
        return ds, False
    options = tf.data.Options()
    options.experimental_symbolic_checkpoint = True
    return ds.with_options(options), True


def buffer_report(ds: tf.data.Dataset, symbolic: bool) -> list[str]:
    """Each transformation that still stores elements in a checkpoint: how many, how big."""
    out = []
    for node in pipeline_nodes(ds):
        kind = _kind(node)
        try:
            each = element_bytes(node._inputs()[0].element_spec) if node._inputs() else None
        except Exception:  # noqa: BLE001 - no input spec: unknown size
            each = None
        n: Any = None
        if kind in ("shuffle", "shuffle_and_repeat"):
            n = _value(node._buffer_size)
        elif symbolic:
            continue  # prefetch, map and batch store positions
        elif kind == "prefetch":
            n = _value(node._buffer_size)
            n = "autotuned" if n == -1 else n
        elif kind == "parallel_map":
            n = _value(node._num_parallel_calls)
            n = "autotuned" if n == -1 else n
        elif kind == "batch":
            n = _value(node._batch_size)
            n = n - 1 if isinstance(n, int) else n
        else:
            continue
        total = each * n if isinstance(n, int) and each is not None else None
        out.append(f"{kind} holds up to {n} elements of {_size(each)} ({_size(total)})")
    return out


def position_bytes(tensors: Mapping[str, tf.Tensor]) -> int:
    """The serialized size of a saved iterator state (what a checkpoint stores for it)."""
    return sum(len(tf.io.serialize_tensor(t).numpy()) for t in tensors.values())


@dataclass(frozen=True)
class DataRecord:
    """What a checkpoint records of the training data (see the module docstring)."""

    cardinality: int  # elements per pass before ckptkit's repeat: -1 infinite, -2 unknown
    element_spec: str
    pipeline: tuple[str, ...]
    sample: str  # SHA-256 of the first `sample_elements` elements
    sample_elements: int
    custom: str | None = None  # Trainer.data_fingerprint()
    symbolic: bool = False  # the position was saved symbolically (no buffered elements)
    sources: tuple[int, ...] = ()  # the length of each source dataset (examples, mostly)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["pipeline"] = list(self.pipeline)
        out["sources"] = list(self.sources)
        return out

    @staticmethod
    def from_json(raw: Any) -> DataRecord | None:
        if not isinstance(raw, dict):
            return None
        try:
            rec = DataRecord(
                cardinality=raw["cardinality"],
                element_spec=raw["element_spec"],
                pipeline=tuple(raw["pipeline"]),
                sample=raw["sample"],
                sample_elements=raw["sample_elements"],
                custom=raw.get("custom"),
                symbolic=raw.get("symbolic", False),
                sources=tuple(raw.get("sources", ())),
            )
        except (KeyError, TypeError):
            return None
        ok = (
            isinstance(rec.cardinality, int)
            and isinstance(rec.element_spec, str)
            and all(isinstance(p, str) for p in rec.pipeline)
            and isinstance(rec.sample, str)
            and isinstance(rec.sample_elements, int)
            and isinstance(rec.custom, (str, type(None)))
            and isinstance(rec.symbolic, bool)
            and all(isinstance(n, int) and not isinstance(n, bool) for n in rec.sources)
        )
        return rec if ok else None


def _hash_element(h: Any, element: Any) -> None:
    for t in tf.nest.flatten(element):
        a = np.asarray(t.numpy() if hasattr(t, "numpy") else t)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes() if a.dtype != object else b"".join(bytes(x) for x in a.ravel()))


def sample_hash(iterator: Any, n: int = SAMPLE_ELEMENTS) -> tuple[str, int]:
    """SHA-256 over the next ``n`` elements of ``iterator`` (fewer at the end), which is then
    put back where it was."""
    state = iterator._serialize_to_tensors()
    h, count = hashlib.sha256(), 0
    try:
        for _ in range(n):
            try:
                element = next(iterator)
            except (StopIteration, tf.errors.OutOfRangeError):
                break
            _hash_element(h, element)
            count += 1
    finally:
        iterator._restore_from_tensors(state)
    return h.hexdigest(), count


def record(ds: tf.data.Dataset, iterator: Any, *, symbolic: bool, custom: str | None = None) -> DataRecord:
    """The record of ``ds`` (the training dataset as the user built it), sampled through the
    fresh training ``iterator`` over it."""
    sample, count = sample_hash(iterator)
    return DataRecord(
        cardinality=int(ds.cardinality()),
        element_spec=str(ds.element_spec),
        pipeline=describe_pipeline(ds),
        sample=sample,
        sample_elements=count,
        custom=custom,
        symbolic=symbolic,
        sources=tuple(int(n.cardinality()) for n in pipeline_nodes(ds) if not _inputs(n)),
    )


def _length(n: int) -> str:
    return {-1: "infinite", -2: "unknown"}.get(n, str(n))


def changes(old: DataRecord, new: DataRecord) -> tuple[list[str], list[str]]:
    """(pipeline changes, content changes) from ``old`` to ``new``, in words."""
    pipeline, content = [], []
    if old.element_spec != new.element_spec:
        pipeline.append(f"element spec {old.element_spec} -> {new.element_spec}")
    if old.pipeline != new.pipeline:
        gone = [p for p in old.pipeline if p not in new.pipeline]
        came = [p for p in new.pipeline if p not in old.pipeline]
        if gone or came:
            pipeline.append(f"pipeline {', '.join(gone) or '(nothing)'} -> {', '.join(came) or '(nothing)'}")
        else:
            pipeline.append(f"pipeline order {' <- '.join(old.pipeline)} -> {' <- '.join(new.pipeline)}")
    if old.sources and new.sources and old.sources != new.sources:
        content.append(
            f"source elements {', '.join(map(_length, old.sources))} -> {', '.join(map(_length, new.sources))}"
        )
    if old.cardinality != new.cardinality:
        content.append(f"elements per pass {_length(old.cardinality)} -> {_length(new.cardinality)}")
    if old.sample != new.sample and not pipeline:
        content.append(f"the first {min(old.sample_elements, new.sample_elements)} elements differ")
    if old.custom != new.custom:
        content.append(f"data_fingerprint() {old.custom!r} -> {new.custom!r}")
    return pipeline, content


def resumed_symbolic(checkpoint_cfg: Any) -> bool | None:
    """How the checkpoint a launch with ``checkpoint_cfg`` would resume from saved its data
    position (None: a fresh start; False also for an older ckptkit's, saved with buffers)."""
    if checkpoint_cfg.resume == "never":
        return None
    from ckptkit import metadata

    try:
        found = metadata.scan(checkpoint_cfg.dir)
    except Exception:  # noqa: BLE001 - unreadable here: the restore reports it
        return None
    if not found:
        return None
    rec = DataRecord.from_json(found[-1].data)
    return rec.symbolic if rec is not None else False


def decide(policy: str, info: Any, current: DataRecord) -> bool:
    """Whether a resume from checkpoint ``info`` restores its data position (True) or starts it
    afresh (False), by ``checkpoint.on_data_change`` (``policy``) against what changed;
    raises DataPipelineError where the policy refuses."""
    from ckptkit.errors import DataPipelineError

    old = DataRecord.from_json(info.data)
    if old is None:
        if policy == "restart":
            log.warning(
                "%s records nothing of its training data: starting the data position afresh "
                "(checkpoint.on_data_change=restart)",
                info.path,
            )
            return False
        log.info(
            "%s records nothing of its training data (an older ckptkit, or metadata.json rebuilt): "
            "its data position is restored as it is",
            info.path,
        )
        return True
    pipeline, content = changes(old, current)
    if not pipeline and not content:
        return True
    what = "; ".join(pipeline + content)
    if policy == "error" or (pipeline and policy == "auto"):
        fix = (
            "Change train_dataset() back to resume exactly, or relaunch with checkpoint.on_data_change=restart "
            "to keep the weights, optimizer and step and start the data position afresh."
            if pipeline
            else "Restore the data to resume exactly, or relaunch with checkpoint.on_data_change=auto to "
            "continue with the data position started afresh over the current data."
        )
        raise DataPipelineError(
            f"the training data {'pipeline ' if pipeline else ''}changed since checkpoint {info.path} "
            f"(step {info.step}) was saved; nothing was trained. {fix}\n  " + "\n  ".join(pipeline + content)
        )
    log.warning(
        "the training data changed since %s (step %d) was saved: %s. Continuing from step %d with the "
        "weights, optimizer and step restored and the data position started afresh over the current "
        "data; a resume is exact only over unchanged data (checkpoint.on_data_change=error refuses instead)",
        info.path,
        info.step,
        what,
        info.step,
    )
    return False
