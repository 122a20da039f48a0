"""Config schemas for the groups ckptkit owns, and their validation.

ckptkit owns the top-level keys ``name`` and ``run_dir`` and the groups ``trainer``,
``checkpoint``, ``export`` and ``strategy``. Every other key (``model``, ``optim``,
``data``, ...) belongs to the user and passes through untouched.

The schemas are registered in Hydra's ConfigStore when ``ckptkit`` is imported, as
``<group>/schema``; a YAML file of the group lists ``schema`` first in its defaults so that a
typo'd key or a wrong type fails at compose time. ``load_config`` applies the same schemas
again, so a plain dict given to ``Trainer`` (a notebook, a test) is checked just as strictly.
Validation raises :class:`~ckptkit.errors.ConfigError`; it never rewrites a value.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import logging
import math
import os
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hydra.errors import CompactHydraException
from omegaconf import BooleanNode, DictConfig, EnumNode, FloatNode, IntegerNode, OmegaConf, StringNode, ValueNode
from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException

from ckptkit import gfile, local_tier
from ckptkit.errors import ConfigError
from ckptkit.save_budget import AUTO, DEFAULT_MAX_OVERHEAD

OWNED_GROUPS = ("trainer", "checkpoint", "export", "strategy")
OWNED_KEYS = ("name", "run_dir") + OWNED_GROUPS


# Choices are Enums so Hydra rejects a bad choice at compose time, before any work starts;
# load_config hands them on as plain strings.
class BestMode(str, enum.Enum):
    min = "min"
    max = "max"


class Resume(str, enum.Enum):
    auto = "auto"
    never = "never"
    must = "must"


class DataChange(str, enum.Enum):
    """What a resume does when the training data changed since its checkpoint."""

    auto = "auto"  # changed content: the data position starts afresh; changed pipeline: error
    restart = "restart"  # any change: the data position starts afresh (weights kept)
    error = "error"  # any change: refuse to resume


class ProgressMode(str, enum.Enum):
    auto = "auto"
    bar = "bar"
    log = "log"


class OnNonFinite(str, enum.Enum):
    """What a train step whose loss or metrics are NaN or infinite does to the run."""

    stop = "stop"  # stop before anything more is saved, naming the first bad step
    warn = "warn"  # report it and go on (for a train_step that skips bad batches); saves still need finite weights


class InitWhich(str, enum.Enum):
    latest = "latest"
    best = "best"


class ExportFrom(str, enum.Enum):
    best = "best"
    last = "last"


class StrategyKind(str, enum.Enum):
    default = "default"
    mirrored = "mirrored"
    multi_worker = "multi_worker"


RESUME_MODES = tuple(m.value for m in Resume)
BEST_MODES = tuple(m.value for m in BestMode)
EXPORT_FROM = tuple(m.value for m in ExportFrom)
STRATEGY_KINDS = tuple(m.value for m in StrategyKind)


# Step counts are typed Any in the schemas so that `trainer.max_steps=1e4` (a float to
# Hydra's parser) is taken: `validate` accepts whole numbers only and makes them ints.
STEP_KEYS = (
    ("trainer", "max_steps"),
    ("trainer", "steps_per_loop"),
    ("trainer", "eval_every_steps"),
    ("trainer", "log_every_steps"),
    ("checkpoint", "save_every_steps"),
)


@dataclass
class TrainerConfig:
    max_steps: Any = 1000
    steps_per_loop: Any = 100
    eval_every_steps: Any = 1000
    log_every_steps: Any = 100
    seed: int = 0
    deterministic: bool = False
    progress: ProgressMode = ProgressMode.auto
    # Exit status after a signal's save ("resume me"; 75 is EX_TEMPFAIL), and after a lost
    # multi-worker peer (null: the same). Kubernetes' ExitCode restart policy retries >= 128.
    exit_code_preempted: int = 75
    exit_code_peer_lost: Any = None
    on_nonfinite: OnNonFinite = OnNonFinite.stop


@dataclass
class BestConfig:
    metric: str | None = None
    mode: BestMode = BestMode.min
    keep: int = 1


@dataclass
class InitFromConfig:
    path: str | None = None
    include: list[str] | None = None  # None: every variable
    exclude: list[str] = field(default_factory=list)
    rename: dict[str, str] = field(default_factory=dict)
    strict: bool = True
    which: InitWhich = InitWhich.latest
    optimizer: bool = False


@dataclass
class CheckpointConfig:
    dir: str = "${run_dir}/checkpoints"
    max_to_keep: int | None = 3
    keep_every_n_hours: float | None = None
    save_every_steps: Any = 1000
    save_every_seconds: Any = None  # seconds, or "auto" (ckptkit.save_budget)
    max_overhead: float | None = None  # with save_every_seconds=auto; None: 0.02
    save_at_steps: list[int] = field(default_factory=list)
    best: BestConfig = field(default_factory=BestConfig)
    async_save: bool = True
    resume: Resume = Resume.auto
    init_from: InitFromConfig = field(default_factory=InitFromConfig)
    # The run lock's lease: a lock whose record did not change for this long, watched from
    # the launching host, is stale (its holder rewrites it every 10 s or lease/6).
    lock_lease_seconds: float = 120.0
    # The training data changed since the checkpoint a run resumes from (ckptkit.data_position).
    on_data_change: DataChange = DataChange.auto
    # A local tier (ckptkit.local_tier): every save goes to node-local storage below local_dir,
    # some are copied to `dir`. The other three apply only with it (null: 2, 300 s, none).
    local_dir: str | None = None
    local_max_to_keep: int | None = None
    persist_every_seconds: float | None = None
    persist_every_saves: int | None = None


@dataclass
class ExportConfig:
    """``from_`` is the config key ``export.from`` (``from`` is a Python keyword)."""

    dir: str = "${run_dir}/export"
    from_: ExportFrom = ExportFrom.best
    verify: bool = True
    # float16/bfloat16 serving outputs (mixed precision) are cast to float32 for clients.
    cast_outputs_float32: bool = True
    enabled: bool = True
    on_best: bool = False
    max_to_keep: int | None = None


@dataclass
class StrategyConfig:
    kind: StrategyKind = StrategyKind.default
    # Split the CPU into this many logical devices (mirrored without GPUs: several replicas
    # on one machine, e.g. to try a strategy on a laptop). null: one CPU device.
    cpu_devices: int | None = None
    # multi_worker: how long to wait for every task of TF_CONFIG to connect before giving up
    # (exit 1, naming the tasks that never answered); null waits for ever.
    connect_timeout_seconds: float | None = 600.0


@dataclass
class RunConfig:
    """The validated, resolved settings ckptkit acts on."""

    name: str | None
    run_dir: str
    trainer: TrainerConfig
    checkpoint: CheckpointConfig
    export: ExportConfig
    strategy: StrategyConfig


_NODE_TYPES: dict[type, Callable[..., ValueNode]] = {
    str: StringNode,
    bool: BooleanNode,
    int: IntegerNode,
    float: FloatNode,
}


def _export_schema() -> DictConfig:
    """The export schema as a typed DictConfig: a dataclass cannot have a field ``from``."""
    nodes: dict[str, ValueNode] = {}
    hints = typing.get_type_hints(ExportConfig)
    for f in dataclasses.fields(ExportConfig):
        key = "from" if f.name == "from_" else f.name
        if isinstance(f.default, enum.Enum):
            nodes[key] = EnumNode(type(f.default), f.default)
            continue
        kinds = typing.get_args(hints[f.name]) or (hints[f.name],)  # X | None -> (X, NoneType)
        (kind,) = [k for k in kinds if k is not type(None)]
        nodes[key] = _NODE_TYPES[kind](f.default, is_optional=type(None) in kinds)
    node = OmegaConf.create(nodes)
    OmegaConf.set_struct(node, True)
    return node


def group_schemas() -> dict[str, Any]:
    """The schema of each owned group, as Hydra's ConfigStore and OmegaConf take it."""
    checkpoint = OmegaConf.structured(CheckpointConfig)
    # A map the user fills: `checkpoint.init_from.rename={model/backbone/: model/encoder/}`
    # merges new keys into it, which a struct node refuses (the user would need a `+`).
    OmegaConf.set_struct(checkpoint.init_from.rename, False)
    return {
        "trainer": OmegaConf.structured(TrainerConfig),
        "checkpoint": checkpoint,
        "export": _export_schema(),
        "strategy": OmegaConf.structured(StrategyConfig),
    }


#: Keys that do not name a sweep job's directory: changing them (train longer, say) resumes
#: the same jobs.
SWEEP_EXCLUDE_KEYS = ["trainer.max_steps", "trainer.progress", "trainer.log_every_steps", "checkpoint.resume"]

#: Hydra's settings that come with ``trainer: default`` (a project's own ``hydra:`` block,
#: after it in the defaults list, wins): Hydra's files go into the run directory (for an
#: object store's ``run_dir``, under ``outputs/``), a sweep's job ``j`` runs in
#: ``<run_dir>/<its overrides>`` without the keys above, and a signal to a sweep whose jobs
#: run in other processes stops every job (``StopJobsOnSignal``).
HYDRA_DEFAULTS = {
    "run": {"dir": "${ckptkit.hydra_dir:${oc.select:run_dir,runs/${name}}}"},
    "sweep": {
        "dir": "${ckptkit.hydra_dir:${oc.select:run_dir,runs/${name}}}",
        "subdir": "${hydra.job.override_dirname}",
    },
    "job": {"config": {"override_dirname": {"exclude_keys": SWEEP_EXCLUDE_KEYS}}},
    "callbacks": {"stop_jobs": {"_target_": "ckptkit.hydra_callbacks.StopJobsOnSignal"}},
}


def register_configs() -> None:
    """Register ``<group>/schema`` and ``<group>/default`` for each owned group in Hydra's
    ConfigStore: a project outside this repository lists ``trainer: default`` (and so on)
    in its defaults and gets every key with its default value, checked. A YAML file of the
    same name in the project's own config directory comes first on Hydra's search path."""
    from hydra.core.config_store import ConfigStore

    OmegaConf.register_new_resolver("ckptkit.hydra_dir", hydra_dir, replace=True)
    cs = ConfigStore.instance()
    for group, node in group_schemas().items():
        cs.store(group=group, name="schema", node=node, provider="ckptkit")
        if group == "trainer":  # with Hydra's settings that every ckptkit project wants
            cs.store(
                group=group,
                name="default",
                node={"trainer": node, "hydra": HYDRA_DEFAULTS},
                package="_global_",
                provider="ckptkit",
            )
        else:
            cs.store(group=group, name="default", node=node, provider="ckptkit")


def to_dict(node: DictConfig, **options: Any) -> dict[str, Any]:
    """A DictConfig as a plain dict (``options`` as OmegaConf.to_container takes them)."""
    out = OmegaConf.to_container(node, **options)
    if not isinstance(out, dict):
        raise TypeError(f"expected a mapping of settings, got {type(out).__name__}")
    return {str(k): v for k, v in out.items()}


def _as_dictconfig(cfg: Mapping[str, Any] | DictConfig) -> DictConfig:
    if isinstance(cfg, DictConfig):
        return cfg
    if isinstance(cfg, Mapping):
        return OmegaConf.create(dict(cfg))
    raise ConfigError("<root>", f"expected a DictConfig or a dict, got {type(cfg).__name__}")


def _config_error(exc: OmegaConfBaseException, prefix: str = "") -> ConfigError:
    key = getattr(exc, "full_key", None) or "<root>"
    if prefix and not key.startswith(prefix):
        key = f"{prefix}.{key}"
    msg = (getattr(exc, "msg", None) or str(exc)).splitlines()[0]
    if "not in" in msg and "Key" in msg:
        msg = f"unknown key ({msg}); check the spelling against the ckptkit config reference"
    return ConfigError(key, msg)


def _unknown_key(schema: DictConfig, given: Any, prefix: str) -> ConfigError | None:
    """The first key of ``given`` that the schema does not have, with the nearest known
    key: Hydra's ``+key``/``++key`` and a group file bypass the schema's struct flag, so the
    keys are compared here, whatever way they arrived."""
    if not isinstance(given, (DictConfig, Mapping)) or not isinstance(schema, DictConfig):
        return None
    if OmegaConf.is_struct(schema) is False:
        return None  # a map the user fills (checkpoint.init_from.rename)
    known = [str(k) for k in schema.keys()]
    for key in given.keys() if isinstance(given, DictConfig) else given:
        full = f"{prefix}.{key!s}"
        if str(key) not in known:
            near = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f"; did you mean {prefix}.{near[0]}?" if near else f"; {prefix} has: {', '.join(known)}"
            return ConfigError(full, f"unknown key{hint}")
        sub_schema = schema._get_node(str(key))
        if isinstance(sub_schema, DictConfig):
            sub_given = given._get_node(str(key)) if isinstance(given, DictConfig) else given[key]
            found = _unknown_key(sub_schema, sub_given, full)
            if found is not None:
                return found
    return None


def merge_with_schema(cfg: Mapping[str, Any] | DictConfig) -> DictConfig:
    """Return a copy of ``cfg`` whose owned groups are checked against their schemas.

    Keys missing from an owned group take their defaults, unknown keys and wrong types raise
    ConfigError naming the full key. User keys are copied unchanged (interpolations intact).
    """
    src = _as_dictconfig(cfg)
    out = OmegaConf.create(to_dict(src, resolve=False))
    OmegaConf.set_struct(out, False)
    for group, schema in group_schemas().items():
        given = src.get(group) if group in src else None
        if given is not None and not isinstance(given, (DictConfig, Mapping)):
            raise ConfigError(group, f"must be a mapping of settings, got {given!r}")
        unknown = _unknown_key(schema, given, group)
        if unknown is not None:
            raise unknown
        try:
            merged = OmegaConf.merge(schema, given) if given is not None else schema
        except OmegaConfBaseException as exc:
            raise _config_error(exc, group) from None
        out[group] = merged
    if out.get("run_dir") is None:
        if out.get("name") is None:
            raise ConfigError("run_dir", "set `name` (run_dir defaults to runs/${name}) or `run_dir`")
        out["run_dir"] = "runs/${name}"
    return out


def _positive(key: str, value: float | None, *, allow_none: bool, integer: bool, allow_zero: bool = False) -> None:
    if value is None:
        if not allow_none:
            raise ConfigError(key, "must be set")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, f"must be a number, got {value!r}")
    if integer and not float(value).is_integer():
        raise ConfigError(key, f"must be a whole number, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(key, f"must be {'zero or ' if allow_zero else ''}positive, got {value!r}")


def _save_every_seconds(c: CheckpointConfig) -> None:
    """A number of seconds, ``auto`` (with ``max_overhead``, a fraction: 0.02 when unset), or null."""
    auto = c.save_every_seconds == AUTO
    if isinstance(c.save_every_seconds, str) and not auto:
        raise ConfigError(
            "checkpoint.save_every_seconds", f"must be a number of seconds, auto or null; got {c.save_every_seconds!r}"
        )
    if not auto:
        _positive("checkpoint.save_every_seconds", c.save_every_seconds, allow_none=True, integer=False)
        if c.max_overhead is not None:
            raise ConfigError(
                "checkpoint.max_overhead",
                f"applies only with checkpoint.save_every_seconds=auto (it is {c.save_every_seconds!r})",
            )
        return
    if c.max_overhead is None:
        c.max_overhead = DEFAULT_MAX_OVERHEAD
    _positive("checkpoint.max_overhead", c.max_overhead, allow_none=False, integer=False)
    if not c.max_overhead < 1:
        raise ConfigError(
            "checkpoint.max_overhead", f"is a fraction of training time, e.g. 0.02 for 2%; got {c.max_overhead!r}"
        )


def _local_tier(run: RunConfig) -> None:
    """``checkpoint.local_dir``: a path of this host's own, outside ``checkpoint.dir``, one
    process (not multi_worker); its three keys only with it, their defaults filled in."""
    c = run.checkpoint
    keys = ("local_max_to_keep", "persist_every_seconds", "persist_every_saves")
    if not c.local_dir:
        c.local_dir = None
        for key in keys:
            if getattr(c, key) is not None:
                raise ConfigError(f"checkpoint.{key}", "applies only with checkpoint.local_dir (it is null)")
        return
    if not gfile.is_local(c.local_dir):
        raise ConfigError(
            "checkpoint.local_dir",
            f"is {c.local_dir}: the local tier is this host's own storage (a local disk, /dev/shm, $SLURM_TMPDIR); "
            "a remote path belongs in checkpoint.dir",
        )
    if gfile.is_local(c.dir):
        a, b = os.path.abspath(c.local_dir), os.path.abspath(c.dir)
        if os.path.commonpath([a, b]) == b:
            raise ConfigError(
                "checkpoint.local_dir", f"is {c.local_dir}, inside checkpoint.dir {c.dir}: give it a place of its own"
            )
    if run.strategy.kind == StrategyKind.multi_worker:
        raise ConfigError(
            "checkpoint.local_dir",
            "is not supported with strategy.kind=multi_worker: every worker restores from the chief's checkpoints, "
            "and the others cannot read the chief's node-local ones; leave it null",
        )
    if c.local_max_to_keep is None:
        c.local_max_to_keep = local_tier.DEFAULT_MAX_TO_KEEP
    if c.persist_every_seconds is None and c.persist_every_saves is None:
        c.persist_every_seconds = local_tier.DEFAULT_PERSIST_EVERY_SECONDS
    _positive("checkpoint.local_max_to_keep", c.local_max_to_keep, allow_none=False, integer=True)
    _positive("checkpoint.persist_every_seconds", c.persist_every_seconds, allow_none=True, integer=False)
    _positive("checkpoint.persist_every_saves", c.persist_every_saves, allow_none=True, integer=True)


def _one_of(key: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(key, f"must be one of {', '.join(choices)}; got {value!r}")


def validate(run: RunConfig) -> RunConfig:
    t, c, e = run.trainer, run.checkpoint, run.export
    # 0: no training; the model as built (and warm-started) is saved at step 0 and exported.
    _positive("trainer.max_steps", t.max_steps, allow_none=False, integer=True, allow_zero=True)
    _positive("trainer.steps_per_loop", t.steps_per_loop, allow_none=False, integer=True)
    _positive("trainer.eval_every_steps", t.eval_every_steps, allow_none=True, integer=True)
    _positive("trainer.log_every_steps", t.log_every_steps, allow_none=False, integer=True)
    for key in ("exit_code_preempted", "exit_code_peer_lost"):
        code = getattr(t, key)
        if code is None and key == "exit_code_peer_lost":
            continue
        if isinstance(code, bool) or not isinstance(code, int) or not 1 <= code <= 255:
            raise ConfigError(f"trainer.{key}", f"must be a whole number from 1 to 255 (an exit status), got {code!r}")
    if t.seed < 0:
        raise ConfigError("trainer.seed", f"must be zero or positive, got {t.seed}")
    _positive("checkpoint.max_to_keep", c.max_to_keep, allow_none=True, integer=True)
    _positive("checkpoint.keep_every_n_hours", c.keep_every_n_hours, allow_none=True, integer=False)
    _positive("checkpoint.save_every_steps", c.save_every_steps, allow_none=True, integer=True)
    _save_every_seconds(c)
    _positive("checkpoint.best.keep", c.best.keep, allow_none=False, integer=True)
    _positive("checkpoint.lock_lease_seconds", c.lock_lease_seconds, allow_none=False, integer=False)
    for step in c.save_at_steps:
        _positive("checkpoint.save_at_steps", step, allow_none=False, integer=True)
    _one_of("checkpoint.best.mode", c.best.mode, BEST_MODES)
    _one_of("checkpoint.resume", c.resume, RESUME_MODES)
    _one_of("export.from", e.from_, EXPORT_FROM)
    _positive("export.max_to_keep", e.max_to_keep, allow_none=True, integer=True)
    _one_of("strategy.kind", run.strategy.kind, STRATEGY_KINDS)
    _positive("strategy.cpu_devices", run.strategy.cpu_devices, allow_none=True, integer=True)
    _positive("strategy.connect_timeout_seconds", run.strategy.connect_timeout_seconds, allow_none=True, integer=False)
    if not run.run_dir:
        raise ConfigError("run_dir", "must not be empty")
    if not c.dir:
        raise ConfigError("checkpoint.dir", "must not be empty")
    _local_tier(run)
    for group, key in STEP_KEYS:
        value = getattr(getattr(run, group), key)
        if isinstance(value, float):
            setattr(getattr(run, group), key, int(value))
    return run


def load_config(cfg: Mapping[str, Any] | DictConfig) -> tuple[RunConfig, DictConfig]:
    """Check ``cfg`` and return (typed ckptkit settings, the full resolved config).

    The full config keeps the user's groups; it is what hooks see as ``self.cfg``.
    """
    full = merge_with_schema(cfg)
    launched_in = _launch_dir()
    try:
        job_dir = sweep_job_dir()
        if job_dir:  # the base is resolved first: checkpoint.dir etc. follow the job's run_dir
            full.run_dir = f"{str(full.run_dir).rstrip('/')}/{job_dir}"
        if launched_in:
            full.run_dir = anchored(launched_in, str(full.run_dir))
        OmegaConf.resolve(full)
    except OmegaConfBaseException as exc:
        raise _config_error(exc) from None
    for key in ("run_dir", "checkpoint.dir", "checkpoint.local_dir", "export.dir", "checkpoint.init_from.path"):
        value = OmegaConf.select(full, key)
        if isinstance(value, str) and value.startswith("file:"):
            OmegaConf.update(full, key, file_url_path(key, value))
    if launched_in:  # paths given relative are relative to where the command was typed
        full.checkpoint.dir = anchored(launched_in, str(full.checkpoint.dir))
        if full.checkpoint.local_dir:
            full.checkpoint.local_dir = anchored(launched_in, str(full.checkpoint.local_dir))
        full.export.dir = anchored(launched_in, str(full.export.dir))
    if gfile.is_local(str(full.run_dir)):
        refuse_file_as_run_dir(str(full.run_dir))
    _warn_if_hydra_writes_elsewhere(str(full.run_dir))
    export = to_dict(full.export, enum_to_str=True)
    export["from_"] = export.pop("from")
    run = RunConfig(
        name=full.get("name"),
        run_dir=str(full.run_dir),
        trainer=_plain(OmegaConf.to_object(full.trainer)),
        checkpoint=_plain(OmegaConf.to_object(full.checkpoint)),
        export=ExportConfig(**export),
        strategy=_plain(OmegaConf.to_object(full.strategy)),
    )
    for group in ("trainer", "checkpoint", "export", "strategy"):  # enums as strings for the user's code too
        full[group] = OmegaConf.create(OmegaConf.to_container(full[group], enum_to_str=True))
    run = validate(run)
    for group, key in STEP_KEYS:  # the user's code sees the same whole numbers
        full[group][key] = getattr(getattr(run, group), key)
    return run, full


class _RunDirError(InterpolationResolutionError, CompactHydraException):
    """A refusal raised while Hydra resolves ``hydra.run.dir``: OmegaConf passes its own
    interpolation errors through unwrapped, and Hydra prints a compact one without a traceback."""


def refuse_file_as_run_dir(run_dir: str) -> None:
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError("run_dir", f"is {run_dir}, which is a file: give run_dir a directory's path")


def file_url_path(key: str, url: str) -> str:
    """The local path of a ``file://`` URL (TensorFlow's filesystems read it as that path; as
    a path ckptkit's local-disk safety applies: no following links, atomic renames, flock)."""
    import urllib.parse

    parsed = urllib.parse.urlparse(url)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
        raise ConfigError(key, f"is {url}: a file URL must name an absolute local path, e.g. file:///data/runs/x")
    return urllib.parse.unquote(parsed.path)


def hydra_dir(run_dir: str) -> str:
    """Where Hydra's own files of a run go (``hydra.run.dir: ${ckptkit.hydra_dir:${run_dir}}``):
    the run directory itself, or for a ``run_dir`` on an object store (``gs://bucket/runs/x``),
    which Hydra can only write as a local path, ``outputs/gs/bucket/runs/x`` under the launch
    directory (Hydra's own default root), instead of ``./gs:/bucket/...``."""
    run_dir = str(run_dir)
    if run_dir.startswith("file:"):
        run_dir = file_url_path("run_dir", run_dir)
    if gfile.is_local(run_dir):
        try:
            refuse_file_as_run_dir(run_dir)
        except ConfigError as exc:  # raised inside an interpolation: see _RunDirError
            raise _RunDirError(str(exc)) from None
        return run_dir
    scheme, _, rest = run_dir.partition("://")
    return os.path.join("outputs", scheme, rest.strip("/"))


def _launch_dir() -> str | None:
    """Where the command was launched, if Hydra has since changed the working directory
    (``hydra.job.chdir=true``); else None. A relative ``run_dir`` means the same run from
    the same launch directory, whatever Hydra does with the working directory."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    original = HydraConfig.get().runtime.cwd
    return original if original and os.path.abspath(original) != os.path.abspath(os.getcwd()) else None


def anchored(base: str, path: str) -> str:
    """``path`` if it is absolute or a URL, else ``path`` under ``base``."""
    return path if not gfile.is_local(path) or os.path.isabs(path) else os.path.join(base, path)


def _warn_if_hydra_writes_elsewhere(run_dir: str) -> None:
    """Hydra's own files of a run (``.hydra/config.yaml``, the job log) belong in the run
    directory; say so once when Hydra's output directory is another one."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or not gfile.is_local(run_dir):
        return
    hc = HydraConfig.get()
    if hc.mode != RunMode.RUN or not hc.runtime.output_dir:
        return
    base = hc.runtime.cwd or os.getcwd()
    if os.path.realpath(os.path.join(base, run_dir)) != os.path.realpath(hc.runtime.output_dir):
        logging.getLogger("ckptkit").warning(
            "Hydra writes its own files of this run (.hydra/config.yaml, the job log) to %s, not "
            "to the run directory %s; put `hydra: {run: {dir: ${run_dir}}}` in your config to keep "
            "them together",
            hc.runtime.output_dir,
            run_dir,
        )


def sweep_job_dir() -> str | None:
    """In a Hydra multirun, the job's own subdirectory of ``run_dir``; else None.

    It is Hydra's ``hydra.job.override_dirname`` (the job's overrides, e.g.
    ``optim.lr=0.003``, without the keys in ``hydra.job.config.override_dirname.exclude_keys``):
    stable across launches, so relaunching the sweep resumes every job in its directory.
    """
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:  # pragma: no cover - hydra-core is a dependency
        return None
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    return hc.job.override_dirname or None


def _plain(obj):
    """``obj`` (a schema dataclass) with Enum values replaced by their strings."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, enum.Enum):
            setattr(obj, f.name, value.value)
        elif dataclasses.is_dataclass(value):
            _plain(value)
    return obj
