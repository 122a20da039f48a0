"""The config reference (``docs/config-reference.md``), generated from the schemas.

Keys, types and defaults come from the dataclasses of :mod:`ckptkit.config` (the schemas
ckptkit registers in Hydra's ConfigStore); the meaning of each key is written here.
``python -m ckptkit.config_reference > docs/config-reference.md`` regenerates the page;
tests/test_docs.py fails when the page and the schemas disagree.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from typing import Any

from ckptkit import config

MEANINGS: dict[str, str] = {
    "name": "run name; the run directory is derived from it",
    "run_dir": "where everything of a run lives",
    "trainer.max_steps": "total optimizer steps (whole numbers in any notation: `1e4`); 0 trains nothing: the model "
    "as built and warm-started is saved as step 0 and exported",
    "trainer.steps_per_loop": "steps inside one `tf.function` call",
    "trainer.eval_every_steps": "eval period (null: only at the end)",
    "trainer.log_every_steps": "train-metric logging period",
    "trainer.seed": "seed for Python, NumPy and TensorFlow",
    "trainer.deterministic": "TensorFlow op determinism",
    "trainer.progress": "`auto` (a live bar on a terminal, log lines elsewhere), `bar`, `log`",
    "trainer.exit_code_preempted": "exit status after a signal's save (\"resume me\"); 143 suits Kubernetes' "
    "ExitCode restart policy",
    "trainer.exit_code_peer_lost": "exit status when a multi-worker peer was lost (null: the same as "
    "`exit_code_preempted`)",
    "trainer.on_nonfinite": "a step with a NaN or infinite loss or metric: `stop` (before anything more is saved, "
    "naming the first such step) or `warn` (go on, for a `train_step` that skips bad batches; saves still "
    "require finite weights)",
    "checkpoint.dir": "checkpoint directory (any `tf.io.gfile` path)",
    "checkpoint.max_to_keep": "newest checkpoints kept (null: all)",
    "checkpoint.keep_every_n_hours": "also keep one checkpoint per this many hours",
    "checkpoint.save_every_steps": "periodic save by steps",
    "checkpoint.save_every_seconds": (
        "periodic save by wall clock (a monotonic clock); `auto`: as often as `max_overhead` allows, "
        "from the measured cost of each save (docs/performance.md)"
    ),
    "checkpoint.max_overhead": (
        "with `save_every_seconds=auto`: the share of training time saves may cost (0.02 when null)"
    ),
    "checkpoint.save_at_steps": "also save at these steps",
    "checkpoint.best.metric": 'eval metric that defines "best"',
    "checkpoint.best.mode": "`min` or `max`",
    "checkpoint.best.keep": "best checkpoints kept, never deleted by the newest-N rule",
    "checkpoint.async_save": "write in the background while training goes on",
    "checkpoint.resume": "`auto`, `never` (move old checkpoints aside, start fresh), `must`",
    "checkpoint.init_from.path": "warm start: a checkpoint prefix, a checkpoint dir, a run dir, a SavedModel or a "
    "Keras file",
    "checkpoint.init_from.include": "`fnmatch` globs over variable paths to restore (null: all)",
    "checkpoint.init_from.exclude": "globs over variable paths to leave as built",
    "checkpoint.init_from.rename": "prefix map, old path prefix -> new path prefix",
    "checkpoint.init_from.strict": "fail when a selected variable is missing or mis-shaped",
    "checkpoint.init_from.which": "from a checkpoint directory or run: its `latest` or `best` checkpoint",
    "checkpoint.init_from.optimizer": "also restore the optimizer's slots where they match",
    "checkpoint.lock_lease_seconds": "a run lock whose record did not change for this long, watched on the "
    "launching host's monotonic clock, is stale (its holder rewrites it every 10 s or lease/6)",
    "checkpoint.on_data_change": "the training data changed since the checkpoint a run resumes from: `auto` "
    "(changed content: the data position starts afresh; changed pipeline: error), `restart`, `error`",
    "checkpoint.local_dir": "a local tier: every save goes to this host's own storage (`/dev/shm`, "
    "`${oc.env:SLURM_TMPDIR,null}`), into a directory per run below it; some are copied to `checkpoint.dir` "
    "(docs/running.md)",
    "checkpoint.local_max_to_keep": "with `local_dir`: newest checkpoints kept in the local tier (2 when null)",
    "checkpoint.persist_every_seconds": "with `local_dir`: copy a save to `checkpoint.dir` at least this often "
    "(300 when it and `persist_every_saves` are null); a best, last or signal's save is always copied",
    "checkpoint.persist_every_saves": "with `local_dir`: also copy every n-th save to `checkpoint.dir`",
    "export.dir": "SavedModel destination, versioned subdirectories",
    "export.from": "`best` or `last`",
    "export.verify": "before publishing, run every signature through TF Serving's loader in a fresh process and "
    "compare with the live model",
    "export.cast_outputs_float32": "serve float16/bfloat16 outputs (mixed precision) as float32",
    "export.enabled": "export at the end of `fit()`",
    "export.on_best": "also export on every new best eval metric",
    "export.max_to_keep": "newest export versions kept (null: all)",
    "strategy.kind": "`default`, `mirrored`, `multi_worker` (see [scaling out](scaling-out.md))",
    "strategy.cpu_devices": "split the CPU into this many logical devices (a mirrored strategy without GPUs)",
    "strategy.connect_timeout_seconds": "multi_worker: how long to wait for every task to connect (null: for ever)",
}

#: Keys whose schema type is Any (checked by ckptkit's own validation, not by OmegaConf).
ANY_TYPES: dict[str, str] = {
    "trainer.max_steps": "int",
    "trainer.steps_per_loop": "int",
    "trainer.eval_every_steps": "int or null",
    "trainer.log_every_steps": "int",
    "trainer.exit_code_peer_lost": "int or null",
    "checkpoint.save_every_steps": "int or null",
    "checkpoint.save_every_seconds": "float, `auto` or null",
}


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return ", ".join(f"`{m.value}`" for m in tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"`{value}`" if isinstance(value, str) else str(value)


def rows(cls: type = config.RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, type, default) of every leaf key of the schema ``cls``, in schema order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        key = prefix + ("from" if f.name == "from_" else f.name)
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += rows(typing.cast(type, tp), key + ".")
            continue
        name = ANY_TYPES.get(key, "any") if tp is Any else _type_name(tp)
        default = _default(f)
        if key == "name":
            default = "per example"
        elif key == "run_dir":
            default = "`runs/${name}`"
        out.append((key, name, default))
    return out


def markdown() -> str:
    lines = [
        "# Config reference",
        "",
        "Every key ckptkit owns, with its type and default, generated from the schemas it registers in",
        "Hydra's ConfigStore (`python -m ckptkit.config_reference > docs/config-reference.md`;",
        "`tests/test_docs.py` fails when this page and the schemas disagree). Every key is a Hydra",
        "override (`trainer.max_steps=3000`); an unknown key or a wrong type in these groups is an error",
        "before anything runs. Every other group (`model`, `optim`, `data`, ...) is yours.",
        "",
        "| key | type | default | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for key, tp, default in rows():
        lines.append(f"| `{key}` | {tp} | {default} | {MEANINGS.get(key, '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
