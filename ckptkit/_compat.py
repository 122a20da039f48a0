"""Work-arounds for bugs in the libraries ckptkit builds on, each applied once, on demand.

Keras 3 async checkpoints: TensorFlow's async checkpointing copies every variable to a CPU
twin with ``_copy_trackable_to_cpu`` inside a ``tf.function``, on the first save and again
on every later one. Keras 3's TensorFlow ``Variable`` (keras/src/backend/tensorflow/core.py)
creates a *new* ``tf.Variable`` on each call, so the second async save of any Keras model
fails with "tf.function only supports singleton tf.Variables created on the first call".
The fix below maps the Keras variable to the CPU twin TensorFlow already keeps (and
refreshes) for the variable it wraps. ``tests/test_checkpointer.py`` has the regression
test (two async saves of a Keras model, restored bit for bit).
"""

from __future__ import annotations

import atexit
import logging

log = logging.getLogger("ckptkit")

_patched = False


def patch_keras_async_checkpoint() -> None:
    global _patched
    if _patched:
        return
    _patched = True
    try:
        from keras.src.backend.tensorflow.core import Variable
    except ImportError:  # another Keras layout or backend: nothing to fix
        return
    if not hasattr(Variable, "_copy_trackable_to_cpu"):
        return

    def _copy_trackable_to_cpu(self, object_map):
        self.value._copy_trackable_to_cpu(object_map)  # creates once, then refreshes
        object_map[self] = object_map[self.value]

    Variable._copy_trackable_to_cpu = _copy_trackable_to_cpu


def patch_keras_checkpoint_children() -> None:
    """Make layers held in lists and dicts part of a Keras 3 model's checkpoint graph.

    Keras 3 tracks ``self.blocks = [Dense(...), ...]`` with its own tracker and shows such
    collections to TensorFlow only when writing a SavedModel, not a checkpoint
    (keras/src/backend/tensorflow/layer.py, ``_trackable_children``). In a
    ``tf.train.Checkpoint`` their variables are then reachable only through the optimizer's
    list of trainable variables: a model-only restore (warm start, export of the best
    checkpoint) silently skips them, and their object-graph paths do not exist. The patch
    adds each tracked collection as a child under its attribute name, as Keras already does
    for SavedModel; the wrappers are cached so the checkpoint graph stays stable. The state
    of the layer's seed generators is added as ``_seed_generators`` for the same reason.
    """
    global _children_patched
    if _children_patched:
        return
    _children_patched = True
    try:
        from keras.src.backend.tensorflow.layer import TFLayer
        from keras.src.utils import tracking
        from tensorflow.python.trackable import data_structures
    except ImportError:
        return
    original = TFLayer._trackable_children

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        children = original(self, save_type, **kwargs)
        if save_type != "checkpoint":
            return children
        cache = self.__dict__.setdefault("_ckptkit_collection_views", {})
        for attr in getattr(self, "_tracked", ()):
            if attr in children or attr.startswith("_"):
                continue
            item = getattr(self, attr, None)
            value: list | dict
            if isinstance(item, (tracking.TrackedList, tracking.TrackedSet)):
                value = list(item)
            elif isinstance(item, (tracking.TrackedDict, tracking.TrackedOrderedDict)):
                value = dict(item)
            else:
                continue
            ids = [id(v) for v in (value.values() if isinstance(value, dict) else value)]
            key: tuple = (tuple(value) if isinstance(value, dict) else None, tuple(ids))
            cached = cache.get(attr)
            if cached is None or cached[0] != key:
                cached = (key, data_structures.wrap_or_unwrap(value))
                cache[attr] = cached
            children[attr] = cached[1]
        # The state of a layer's random seed generators (Dropout's, for one): Keras keeps
        # them out of the checkpoint graph too, so a resumed run would draw other masks.
        states = [
            sg.state for sg in getattr(self, "_seed_generators", ()) or () if getattr(sg, "state", None) is not None
        ]
        if states and "_seed_generators" not in children:
            key = ("seed", tuple(id(s) for s in states))
            cached = cache.get("_seed_generators")
            if cached is None or cached[0] != key:
                cached = (key, data_structures.wrap_or_unwrap(states))
                cache["_seed_generators"] = cached
            children["_seed_generators"] = cached[1]
        return children

    TFLayer._trackable_children = _trackable_children


_children_patched = False


def end_async_save_thread(checkpoint) -> None:
    """End the background save thread of ``checkpoint`` (a tf.train.Checkpoint), after the
    save in flight.

    TensorFlow keeps one thread (with an executor of its own) per async checkpoint for the
    life of the process; a process that runs many trainings (a notebook, a sweep in one
    process, the test suite) would keep them all. Errors of the save in flight are logged
    here, never raised (this runs while another error may be on its way out)."""
    impl = getattr(checkpoint, "_async_checkpointer_impl", None)
    if impl is None:
        return
    try:
        impl._join_async_save_thread()
    except Exception as exc:  # noqa: BLE001 - reported by Checkpointer.wait(); here only logged
        log.warning("the background save ended with an error: %s", str(exc).splitlines()[0][:300])
    atexit.unregister(impl._join_async_save_thread)
    checkpoint._async_checkpointer_impl = None
