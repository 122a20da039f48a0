"""The run record: which trainer class ran a run, with which config.

``run_dir/ckptkit_run.yaml`` is written when ``fit()`` starts. ``ckptkit export RUN_DIR``
rebuilds the trainer from it, without retraining. The trainer class is imported from the
module or file named in this record, the run's own file; nothing else read from a run or
checkpoint directory is ever imported or executed (no pickle, no ``_target_``).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

import tensorflow as tf
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ckptkit import storage
from ckptkit.config import to_dict
from ckptkit.errors import CkptkitError
from ckptkit.storage import atomic_write_text

RUN_FILE = "ckptkit_run.yaml"


def trainer_location(cls) -> dict:
    """How to import ``cls`` again: its module, and its file when the module is __main__."""
    module = sys.modules.get(cls.__module__)
    where = {"module": cls.__module__, "qualname": cls.__qualname__}
    path = getattr(module, "__file__", None)
    if path:
        where["file"] = os.path.abspath(path)
    return where


def write_run_record(run_dir: str, cls, cfg: DictConfig) -> str:
    record = {
        "trainer": trainer_location(cls),
        "cwd": os.getcwd(),
        "written": time.time(),
        "config": to_dict(cfg, resolve=True),
    }
    tf.io.gfile.makedirs(run_dir)
    path = os.path.join(run_dir, RUN_FILE)
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(record)))
    return path


def read_run_record(run_dir: str) -> Mapping[str, Any]:
    path = os.path.join(run_dir, RUN_FILE)
    if not tf.io.gfile.exists(path):
        raise CkptkitError(
            f"{run_dir} has no {RUN_FILE}: it is not a ckptkit run directory "
            "(or it was trained by a ckptkit older than 0.1)"
        )
    with tf.io.gfile.GFile(path) as f:
        text = f.read()
    try:
        record = OmegaConf.create(text)
    except (yaml.YAMLError, OmegaConfBaseException) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CkptkitError(f"{path} is not a readable ckptkit run record ({reason})") from None
    if not isinstance(record, DictConfig):
        raise CkptkitError(f"{path} is not a ckptkit run record: it holds a list, not a mapping")
    return to_dict(record)


_LEFTOVER_RE = re.compile(r"^(ckptkit_run\.yaml|\.ckptkit-run-id)\.tmp-[0-9a-f]+$")


def remove_leftovers(run_dir: str) -> list[str]:
    """Delete the temporaries of the run record and the run's identity that a crash or a
    full disk left in ``run_dir`` (only those names, only real files). Call it holding the
    run lock: only the lock's holder writes them."""
    removed = [
        p
        for p in (os.path.join(run_dir, n) for n in sorted(storage.listdir(run_dir)) if _LEFTOVER_RE.match(n))
        if storage.remove_file(p)
    ]
    if removed:
        logging.getLogger("ckptkit").info(
            "removed what interrupted writes left in %s: %s", run_dir, ", ".join(os.path.basename(p) for p in removed)
        )
    return removed


def trusted_location(path: str) -> bool:
    """Whether ``path`` lies in the working directory (or below it) or in a directory Python
    already imports from (installed packages): code the user runs anyway."""
    real = os.path.realpath(path)
    roots = [os.getcwd()] + [p for p in sys.path if p and os.path.isdir(p)]
    return any(real.startswith(os.path.realpath(r).rstrip(os.sep) + os.sep) for r in roots)


def import_trainer_class(where: Mapping[str, str], *, trust_code: bool = False, how_to_trust: str = "--trust-code"):
    """Import the trainer class named in a run record. A module is imported by name from the
    current environment; a file is run only where :func:`trusted_location` holds or with
    ``trust_code`` (a run directory from elsewhere names whatever file it likes)."""
    from ckptkit.trainer import Trainer

    module_name, qualname = where.get("module"), where.get("qualname", "")
    module = None
    if module_name and module_name != "__main__":
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            module = None
    if module is None and where.get("file"):
        path = where["file"]
        if not os.path.exists(path):
            raise CkptkitError(f"the trainer's file {path} (from the run record) does not exist")
        if not trust_code and not trusted_location(path):
            raise CkptkitError(
                f"the run record names the trainer file {path}, outside the working directory and the "
                f"installed packages; importing it would run its code. If you trust it, add {how_to_trust} "
                "(or run the command from the project's directory)"
            )
        sys.path.insert(0, os.path.dirname(path))
        spec = importlib.util.spec_from_file_location(f"ckptkit_run_{abs(hash(path))}", path)
        if spec is None or spec.loader is None:
            raise CkptkitError(f"the trainer's file {path} (from the run record) is not a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    if module is None:
        raise CkptkitError(f"cannot import the trainer's module {module_name!r}")
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise CkptkitError(f"{module_name} has no trainer class {qualname!r}")
    if not (isinstance(obj, type) and issubclass(obj, Trainer)):
        raise CkptkitError(f"{module_name}.{qualname} (from the run record) is not a subclass of ckptkit.Trainer")
    return obj
