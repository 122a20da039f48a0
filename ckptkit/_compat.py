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
