"""Run a SavedModel's signatures the way TensorFlow Serving does: TF1's session loader.

``tf.saved_model.load`` (TF2) and the session loader that ``saved_model_cli run``, TensorFlow
Serving and the C++ ``LoadSavedModel`` use do not initialize a SavedModel the same way: an
export whose variables the TF1 saver does not restore into the very resources the signature
functions capture loads fine in TF2 and fails at the first Predict in serving ("Could not
find variable ..."). So ckptkit checks its exports with the session loader, in a fresh
process (nothing of the exporting process can help it), from another working directory
(relative asset paths would break).

This file is run as a script by its path (``python serving_check.py EXPORT IO_DIR``) and
imports only TensorFlow and NumPy, not ckptkit: the check process starts as fast as TF does.
``IO_DIR`` holds ``feeds.npz`` and ``feeds.json`` (``{signature: {input key: array name}}``);
the script writes ``outputs.npz`` and ``outputs.json`` in the same form.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

FEEDS, OUTPUTS = "feeds", "outputs"
#: Starts the line on stderr that says why the check failed.
ERROR_PREFIX = "ckptkit-serving-check: "


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type and the line of TensorFlow's message that says
    what went wrong (not "Graph execution error:", the graph node or the traceback)."""
    message = getattr(exc, "message", None) or str(exc)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    said = [line for line in lines if not (line.endswith(":") or line.startswith(("[[", "Detected at node", "File ")))]
    first = (said or lines or [""])[0].split(" Debug info:")[0]
    return f"{type(exc).__name__}: {first}"


def pack(arrays: Mapping[str, Mapping[str, np.ndarray]]) -> tuple[bytes, dict]:
    """``{signature: {key: array}}`` as the bytes of one ``.npz`` and an index naming them.

    String arrays (numpy object arrays of bytes) are stored without pickle, as their bytes
    joined, each string's length and the shape (``<name>_bytes``, ``_lengths``, ``_shape``):
    these files are read back from export directories, and nothing read from a run
    directory is ever unpickled.
    """
    flat: dict[str, Any] = {}  # arrays by name (Any: savez also has a bool keyword)
    index: dict[str, dict[str, str]] = {}
    for sig, values in arrays.items():
        index[sig] = {}
        for key, value in values.items():
            value = np.asarray(value)
            if value.dtype.kind in "OSU":
                name = f"s{len(flat)}"
                items = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in value.reshape(-1)]
                flat[name + "_bytes"] = np.frombuffer(b"".join(items), dtype=np.uint8)
                flat[name + "_lengths"] = np.array([len(v) for v in items], dtype=np.int64)
                flat[name + "_shape"] = np.array(value.shape, dtype=np.int64)
            else:
                name = f"a{len(flat)}"
                flat[name] = value
            index[sig][key] = name
    buffer = io.BytesIO()
    np.savez(buffer, **flat)
    return buffer.getvalue(), index


def unpack(data: bytes, index: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, np.ndarray]]:
    """The arrays :func:`pack` stored (strings as object arrays of bytes); never unpickles."""
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:

        def array(name: str) -> np.ndarray:
            if not name.startswith("s"):
                return arrays[name]
            joined = arrays[name + "_bytes"].tobytes()
            ends = np.cumsum(arrays[name + "_lengths"])
            items = [joined[a:b] for a, b in zip(np.concatenate([[0], ends[:-1]]).astype(int), ends, strict=True)]
            out = np.empty(len(items), dtype=object)
            out[:] = items
            return out.reshape(tuple(arrays[name + "_shape"]))

        return {sig: {key: array(name) for key, name in keys.items()} for sig, keys in index.items()}


def save_arrays(io_dir: str, stem: str, arrays: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    import tensorflow as tf  # through gfile: an export directory may be on gs:// or s3://

    data, index = pack(arrays)
    with tf.io.gfile.GFile(os.path.join(io_dir, stem + ".npz"), "wb") as f:
        f.write(data)
    with tf.io.gfile.GFile(os.path.join(io_dir, stem + ".json"), "w") as f:
        f.write(json.dumps(index))


def load_arrays(io_dir: str, stem: str) -> dict[str, dict[str, np.ndarray]]:
    import tensorflow as tf

    with tf.io.gfile.GFile(os.path.join(io_dir, stem + ".json")) as f:
        index = json.loads(f.read())
    with tf.io.gfile.GFile(os.path.join(io_dir, stem + ".npz"), "rb") as f:
        return unpack(f.read(), index)


def run_with_session_loader(path: str, feeds: Mapping[str, Mapping[str, np.ndarray]]):
    """Load ``path`` (tag ``serve``) into a TF1 session and run each signature of ``feeds``."""
    import tensorflow as tf

    try:  # the loader is deprecated for TF2 code; here it is the point (it is TF Serving's)
        from tensorflow.python.util import deprecation

        quiet = deprecation.silence()
    except (ImportError, AttributeError):
        quiet = contextlib.nullcontext()
    out = {}
    with tf.compat.v1.Session(graph=tf.Graph()) as sess:
        with quiet:
            meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], path)
        for name, inputs in feeds.items():
            signature = meta.signature_def[name]
            feed = {signature.inputs[key].name: value for key, value in inputs.items()}
            fetch = {key: tensor.name for key, tensor in signature.outputs.items()}
            out[name] = sess.run(fetch, feed)
    return out


def main(argv) -> int:
    path, io_dir = argv[1], argv[2]
    try:
        outputs = run_with_session_loader(path, load_arrays(io_dir, FEEDS))
    except Exception as exc:  # the parent shows this line as the reason
        print(ERROR_PREFIX + one_line(exc), file=sys.stderr)
        return 1
    save_arrays(io_dir, OUTPUTS, outputs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
