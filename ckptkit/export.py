"""SavedModel export into versioned directories, as TensorFlow Serving expects.

``export_dir/<version>/`` with ``version`` one more than the highest existing integer. The
SavedModel is written to a hidden temporary directory beside it and renamed into place, so
a crash never leaves a half-written export under a version number. ``assets.extra/
ckptkit_export.json`` records which checkpoint (step, metrics) the export came from.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np
import tensorflow as tf

from ckptkit.errors import ExportError
from ckptkit.metadata import atomic_write_text

log = logging.getLogger("ckptkit")

EXPORT_INFO = "ckptkit_export.json"


def versions(export_dir: str) -> list:
    """The integer version directories under ``export_dir``, ascending."""
    if not tf.io.gfile.isdir(export_dir):
        return []
    out = []
    for name in tf.io.gfile.listdir(export_dir):
        name = name.rstrip("/")
        if name.isdigit() and tf.io.gfile.exists(os.path.join(export_dir, name, "saved_model.pb")):
            out.append(int(name))
    return sorted(out)


def read_export_info(version_dir: str) -> Optional[dict]:
    path = os.path.join(version_dir, "assets.extra", EXPORT_INFO)
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


class _ExportRoot(tf.Module):
    """What the SavedModel tracks: the model's variables and the signature functions."""

    def __init__(self, model):
        super().__init__(name="ckptkit_export")
        self.model = model
        # Every variable, listed directly: Keras 3 does not expose some of them (the state of
        # a Dropout's seed generator) to SavedModel through the model's own children.
        self.model_variables = list(getattr(model, "variables", []))


def export_saved_model(
    model,
    signatures: Mapping[str, Callable],
    export_dir: str,
    *,
    info: Mapping[str, Any],
) -> str:
    """Write a SavedModel of ``model`` with ``signatures``; return the version directory."""
    if "serving_default" not in signatures:
        raise ExportError(
            f"serving_signatures() returned {sorted(signatures)}; it must include "
            "'serving_default', the signature TensorFlow Serving calls by default")
    tf.io.gfile.makedirs(export_dir)
    version = (versions(export_dir) or [0])[-1] + 1
    final = os.path.join(export_dir, str(version))
    tmp = os.path.join(export_dir, f".tmp-{version}-{os.getpid()}")
    if tf.io.gfile.exists(tmp):
        tf.io.gfile.rmtree(tmp)
    root = _ExportRoot(model)
    try:
        tf.saved_model.save(root, tmp, signatures=dict(signatures))
        tf.io.gfile.makedirs(os.path.join(tmp, "assets.extra"))
        atomic_write_text(os.path.join(tmp, "assets.extra", EXPORT_INFO),
                          json.dumps(dict(info), indent=1, default=str) + "\n")
        tf.io.gfile.rename(tmp, final)
    except Exception as exc:
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.rmtree(tmp)
        raise ExportError(f"exporting the SavedModel to {final} failed: {exc}") from exc
    log.info("exported SavedModel version %d to %s (step %s)", version, final, info.get("step"))
    return final


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
        live = live if isinstance(live, Mapping) else {"output_0": live}
        for key, want in live.items():
            if key not in got:
                raise ExportError(f"export check of {path}: signature {name!r} lacks output {key!r}")
            if not np.allclose(np.asarray(got[key]), np.asarray(want), rtol=1e-5, atol=1e-6):
                raise ExportError(
                    f"export check of {path}: signature {name!r} output {key!r} differs from "
                    "the live model; the SavedModel does not reproduce the trained model")
        checked.append(name)
    return checked
