"""Work-arounds for bugs in the libraries ckptkit builds on, each applied once, on demand.

Keras 3 async checkpoints: TensorFlow's async checkpointing copies every variable to a CPU
twin with ``_copy_trackable_to_cpu`` inside a ``tf.function``, on the first save and again
on every later one. Keras 3's TensorFlow ``Variable`` (keras/src/backend/tensorflow/core.py)
creates a *new* ``tf.Variable`` on each call, so the second async save of any Keras model
fails with "tf.function only supports singleton tf.Variables created on the first call".
The fix below maps the Keras variable to the CPU twin TensorFlow already keeps (and
refreshes) for the variable it wraps. ``tests/test_checkpointer.py`` has the regression
test (two async saves of a Keras model, restored bit for bit).

TensorFlow's ``context.async_wait()`` while ``tf.py_function`` runs: see
:func:`patch_async_wait`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading

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


_waits = threading.local()  # .scope: nesting depth of own_executor_only(); .saver: a save thread
_async_wait_patched = False


def patch_async_wait() -> None:
    """Make ``context.async_wait()`` wait for the calling thread's own executor only, in the
    threads of ckptkit's saves (see :func:`own_executor_only` and :func:`mark_save_thread`).

    TensorFlow calls ``context.async_wait()`` in every ``Checkpoint.write``: in the training
    thread once the variables are copied (async_checkpoint_helper.py) and in the background
    save thread after the files are written (checkpoint.py). It runs
    ``EagerContext::SyncExecutors``, which copies the map of *every* thread's executor and
    then waits on each through a raw pointer. ``tf.py_function`` gives each of its calls an
    executor of its own, set for its thread and destroyed when the call returns
    (python/lib/core/py_func.cc). A save that overlaps a ``py_function`` call (in
    ``train_step``, or in a ``tf.data`` map that runs ahead in its own threads) can wait on
    an executor already freed: the process aborts with abseil's "Mutex corrupt" (about 1 run
    in 25 of the kill -9 test's 375 saves with a ``py_function`` in its step; in seconds
    when the two run in a loop). The copies and the writes of a save run in the saving
    thread's own executor, so waiting for that one is all the save needs. The export's
    ``tf.saved_model.save`` (which calls it too) runs in the same scope.
    """
    global _async_wait_patched
    if _async_wait_patched:
        return
    _async_wait_patched = True
    from tensorflow.python.eager import context

    original = context.async_wait

    def async_wait():
        if getattr(_waits, "scope", 0) or getattr(_waits, "saver", False):
            if context.context()._context_handle is not None:
                context.context().executor.wait()  # this thread's executor: never freed under us
            return
        original()

    async_wait.__doc__ = original.__doc__
    context.async_wait = async_wait


@contextlib.contextmanager
def own_executor_only():
    """Within: ``context.async_wait()`` in this thread waits for its own executor only."""
    patch_async_wait()
    _waits.scope = getattr(_waits, "scope", 0) + 1
    try:
        yield
    finally:
        _waits.scope -= 1


def mark_save_thread() -> None:
    """The calling thread is TensorFlow's background save thread (it only ever saves):
    ``context.async_wait()`` in it waits for its own executor only, from now on. Does
    nothing in a thread inside :func:`own_executor_only` (a synchronous save's callback)."""
    if not getattr(_waits, "scope", 0):
        _waits.saver = True
