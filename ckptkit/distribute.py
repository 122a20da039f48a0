"""The distribution strategy of a run (``strategy.kind``) and what ckptkit needs from it.

``default`` is TensorFlow's default strategy (one device), ``mirrored`` a
``MirroredStrategy`` over this machine's GPUs (or, with ``strategy.cpu_devices=N`` and no
GPU, over N logical CPU devices), ``multi_worker`` a ``MultiWorkerMirroredStrategy`` over
the cluster described by ``TF_CONFIG``.

Input: the user's ``train_dataset()`` yields *global* batches, as with
``strategy.experimental_distribute_dataset``; each replica takes its contiguous share of
every batch (:meth:`Distribution.split`). ckptkit does not hand the dataset to
``experimental_distribute_dataset``, because the iterator of a distributed dataset cannot be
checkpointed (tensorflow/tensorflow#56372) and an exact resume needs the position in the
data. Every worker runs the same input pipeline (so it must be deterministic: seed its
shuffle) and keeps its replicas' rows; the iterator is then one ordinary ``tf.data`` iterator
whose state is the same on all workers and is saved in the chief's checkpoint.

Gradients are summed over replicas by the optimizer, as everywhere in ``tf.distribute``:
a ``train_step`` scales its loss by the global batch (``tf.nn.compute_average_loss``),
which under the default strategy is the plain mean. The metrics a ``train_step`` returns
are averaged over replicas; eval metrics are weighted by each replica's share of the batch.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

import tensorflow as tf

from ckptkit.config import StrategyConfig
from ckptkit.errors import ConfigError

log = logging.getLogger("ckptkit")

# A process can configure its devices and collective ops once: strategies are created once
# per process and settings, and reused by every Trainer in it (e.g. the jobs of a sweep).
_CACHE: dict[tuple[str, int | None], Distribution] = {}


@dataclasses.dataclass
class Distribution:
    kind: str
    strategy: tf.distribute.Strategy
    is_chief: bool = True
    task: str = "chief"  # e.g. "worker 1", for messages and worker directories
    task_id: int = 0
    num_workers: int = 1
    _agree_fn: Callable | None = dataclasses.field(default=None, repr=False)

    @property
    def num_replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    @property
    def distributed(self) -> bool:
        return self.kind != "default"

    @property
    def multi_worker(self) -> bool:
        return self.kind == "multi_worker"

    # --- inside the compiled loops (used only when distributed: the loops call the user's
    # step directly under the default strategy) ------------------------------------------

    def split(self, batch):
        """Per-replica values: each replica's contiguous rows of the global ``batch``."""

        def share(ctx):
            r, n = ctx.replica_id_in_sync_group, ctx.num_replicas_in_sync

            def rows(t):
                t = tf.convert_to_tensor(t)
                if not t.shape.rank:
                    return t
                size = tf.shape(t)[0]
                return t[r * size // n : (r + 1) * size // n]

            return tf.nest.map_structure(rows, batch)

        return self.strategy.experimental_distribute_values_from_function(share)

    def run(self, fn: Callable, batch):
        """``fn(batch)`` on every replica (its share of ``batch``); per-replica results."""
        return self.strategy.run(fn, args=(self.split(batch),))

    def mean(self, values: Mapping[str, Any]) -> dict[str, tf.Tensor]:
        return {k: self.strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None) for k, v in values.items()}

    def sum(self, value):
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)

    def any_true(self, flag: tf.Variable) -> tf.Tensor:
        """Whether ``flag`` (a local bool variable) is set on any worker (a collective)."""
        if not self.multi_worker:
            return flag.read_value()
        local = self.strategy.run(lambda: tf.cast(flag.read_value(), tf.int32))
        return self.sum(local) > 0

    # --- eager helpers -------------------------------------------------------------------

    def gather_ints(self, values: list[int]) -> list[list[int]]:
        """Every worker's ``values`` (a few int64s), row ``task_id``, on every worker: a sum
        of one-hot rows over all replicas (each of a worker's replicas gives its row)."""
        n = self.num_workers
        per_worker = self.num_replicas // n

        def all_rows(v):
            row = tf.one_hot(self.task_id, n, dtype=tf.int64)[:, None] * v[None, :]
            return self.sum(self.strategy.run(lambda: row)) // per_worker

        return tf.function(all_rows)(tf.constant(values, tf.int64)).numpy().tolist()

    def agree(self, decision: bool) -> bool:
        """True on every worker if ``decision`` is true on any (multi-worker); else as is."""
        if not self.multi_worker:
            return decision
        if self._agree_fn is None:

            def any_worker(flag):
                return self.sum(self.strategy.run(lambda: flag)) > 0

            self._agree_fn = tf.function(any_worker)  # eager collectives are slow and warn
        return bool(self._agree_fn(tf.constant(int(decision))).numpy())

    def create_variables(self, train_step: Callable, batch, existing) -> None:
        """Create every variable ``train_step`` creates lazily, without changing any state.

        Under ``MirroredStrategy`` a variable cannot be created on the first call of a
        ``tf.function`` (Keras optimizer slots fail with "You must feed a value for
        placeholder tensor"), so one step runs eagerly on ``batch`` first. Afterwards the
        ``existing`` variables are set back to their values and every variable the step
        created to its initial value: the train loop is then traced with all variables in
        place, and training starts from exactly the state it would have had.
        """
        before = []
        seen = set()
        for v in existing:
            if id(v) not in seen:
                seen.add(id(v))
                before.append((v, v.numpy()))
        created: list[tuple[tf.Variable, Any]] = []

        def record(next_creator, **kwargs):
            v = next_creator(**kwargs)
            created.append((v, v.numpy()))
            return v

        with self.strategy.scope(), tf.variable_creator_scope(record):
            self.run(train_step, batch)
        for v, value in before + created:
            v.assign(value)

    def describe(self) -> str:
        where = f", {self.task} of {self.num_workers} workers" if self.multi_worker else ""
        return f"{self.kind} strategy: {self.num_replicas} replica(s){where}"


def _cpu_devices(n: int | None) -> list[str]:
    """Split the CPU into ``n`` logical devices (once per process); their names."""
    cpus = tf.config.list_physical_devices("CPU")
    if n is not None and n > 1:
        try:
            tf.config.set_logical_device_configuration(
                cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
            )
        except RuntimeError as exc:
            have = len(tf.config.list_logical_devices("CPU"))
            if have != n:
                raise ConfigError(
                    "strategy.cpu_devices",
                    f"is {n}, but TensorFlow already initialized {have} CPU device(s) in this "
                    "process; the logical CPU devices must be configured before TensorFlow's "
                    f"first operation (start a new process) ({exc})",
                ) from exc
    return [d.name for d in tf.config.list_logical_devices("CPU")]


def _task(strategy) -> tuple[str, int, int, bool]:
    resolver = strategy.cluster_resolver
    task_type = getattr(resolver, "task_type", None) or "worker"
    task_id = int(getattr(resolver, "task_id", None) or 0)
    try:
        jobs = resolver.cluster_spec().as_dict()
    except Exception:  # noqa: BLE001 - no cluster: a single local worker
        jobs = {}
    workers = sum(len(v) for k, v in jobs.items() if k in ("chief", "worker")) or 1
    return task_type, task_id, workers, bool(strategy.extended.should_checkpoint)


def slurm_tasks() -> int:
    """How many tasks this SLURM job step runs (0 outside SLURM)."""
    try:
        return int(os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS") or 0)
    except ValueError:
        return 0


def slurm_cluster_resolver():
    """TensorFlow's SlurmClusterResolver for this job step (``srun`` with one task per
    worker): the cluster from SLURM's variables (node list, tasks per node, this task's
    rank), ports from 8888 up on each node; with GPUs, each task gets its share of the
    node's GPUs through CUDA_VISIBLE_DEVICES."""
    gpus = len(tf.config.list_physical_devices("GPU"))  # does not initialize TensorFlow
    if gpus:
        return tf.distribute.cluster_resolver.SlurmClusterResolver(gpus_per_node=gpus)
    # Without GPUs: the resolver still hands out "GPU slots" to place tasks on a node, one per
    # task (up to 256 tasks a node), and leaves CUDA_VISIBLE_DEVICES alone.
    return tf.distribute.cluster_resolver.SlurmClusterResolver(gpus_per_node=256, gpus_per_task=1, auto_set_gpu=False)


def _cluster(resolver=None) -> tuple[dict[str, list[str]], str, int]:
    """The cluster (TF_CONFIG's, or ``resolver``'s), and this task's type and index."""
    if resolver is not None:
        return dict(resolver.cluster_spec().as_dict()), str(resolver.task_type), int(resolver.task_id)
    try:
        config = json.loads(os.environ.get("TF_CONFIG") or "{}")
        task = config.get("task") or {}
        return dict(config.get("cluster") or {}), str(task.get("type", "worker")), int(task.get("index", 0))
    except (ValueError, TypeError, AttributeError):
        return {}, "worker", 0


# Run by the watchdog process: wait for "up" on stdin (the cluster came up), EOF (the task
# ended, by a signal: say so) or the timeout (a negative one: none); at the timeout, name the
# tasks whose address does not accept a connection. TensorFlow swallows SIGTERM while it
# waits (its preemption notifier's handler), so a SIGTERM that reaches the watchdog too (a
# process group's, as SLURM and a terminal deliver it) ends the task with SIGINT, whose
# default action the task has meanwhile.
_WATCHDOG = """
import json, os, select, signal, socket, sys
wait, timeout, others = float(sys.argv[1]), float(sys.argv[2]), json.loads(sys.argv[3])
signal.signal(signal.SIGINT, signal.SIG_IGN)
def on_sigterm(signum, frame):
    sys.stderr.write("ckptkit: stopped by SIGTERM while waiting for the cluster's other tasks; "
                     "nothing was trained or written; run the same command again\\n")
    sys.stderr.flush()
    os.kill(os.getppid(), signal.SIGINT)
    os._exit(0)
signal.signal(signal.SIGTERM, on_sigterm)
if select.select([sys.stdin], [], [], None if wait < 0 else wait)[0]:
    if sys.stdin.read(2) != "up":
        sys.stderr.write("ckptkit: stopped by a signal while waiting for the cluster's other tasks; "
                         "nothing was trained or written; run the same command again\\n")
    sys.exit(0)
def answers(address):
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
        return True
    except (OSError, ValueError):
        return False
missing = [f"{job} {i} at {a}" for job, i, a in others if not answers(a)]
sys.stderr.write("ckptkit: error: strategy.connect_timeout_seconds=%g: the cluster did not come up; %s. "
                 "Start every task of the cluster (or raise the timeout); exiting with status 1\\n"
                 % (timeout, ("not answering: " + ", ".join(missing)) if missing else
                    "every task answers, but not all of them joined (another cluster or run?)"))
sys.stderr.flush()
"""


class _ConnectWatchdog:
    """While MultiWorkerMirroredStrategy() waits for every task of the cluster to connect
    (TensorFlow waits for ever, silently, holding the GIL, so no Python thread can act):
    say what it waits for; after ``strategy.connect_timeout_seconds`` a small process names
    the tasks that never answered, and faulthandler's C watchdog ends this one with status 1."""

    def __init__(self, timeout: float | None, resolver=None):
        cluster, task_type, task_id = _cluster(resolver)
        others = [
            (job, i, address)
            for job, addresses in cluster.items()
            for i, address in enumerate(addresses)
            if (job, i) != (task_type, task_id)
        ]
        self._proc: subprocess.Popen | None = None
        self._devnull = None
        if not others:
            return
        log.info(
            "waiting for the %d other task(s) of the cluster to connect (%s); this is %s %d; "
            "giving up after strategy.connect_timeout_seconds=%s",
            len(others),
            ", ".join(f"{j} {i} at {a}" for j, i, a in others),
            task_type,
            task_id,
            timeout,
        )
        for handler in logging.getLogger().handlers + log.handlers:
            handler.flush()
        wait = max(timeout - 1.0, 0.1) if timeout else -1.0
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(wait), str(timeout or 0), json.dumps(others)],
            stdin=subprocess.PIPE,
            text=True,
        )
        if timeout:
            self._devnull = open(os.devnull, "w")  # noqa: SIM115 - held until cancel()
            faulthandler.dump_traceback_later(timeout, exit=True, file=self._devnull)

    def cancel(self) -> None:
        if self._devnull is not None:
            faulthandler.cancel_dump_traceback_later()
            self._devnull.close()
            self._devnull = None
        if self._proc is not None:
            if self._proc.stdin is not None:
                try:
                    self._proc.stdin.write("up")  # the cluster is up: the watchdog process exits
                    self._proc.stdin.close()
                except OSError:
                    pass
            self._proc.wait(timeout=10)
            self._proc = None


def _default_signal_actions() -> dict[int, Any]:
    """Give SIGTERM and SIGINT their default action; return the handlers to put back."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in old:
        signal.signal(s, signal.SIG_DFL)
    return {s: h if h is not None else signal.SIG_DFL for s, h in old.items()}


def _cluster_resolver():
    """SLURM's cluster for a multi-task step without TF_CONFIG (None: TF_CONFIG's, checked to
    be JSON, or no cluster at all)."""
    resolver = None
    if not os.environ.get("TF_CONFIG") and slurm_tasks() > 1:
        resolver = slurm_cluster_resolver()
        log.info(
            "strategy.kind=multi_worker: the cluster from SLURM (job %s, %d tasks): %s",
            os.environ.get("SLURM_JOB_ID", "?"),
            slurm_tasks(),
            resolver.cluster_spec().as_dict(),
        )
    elif not os.environ.get("TF_CONFIG"):
        log.warning(
            "strategy.kind=multi_worker without TF_CONFIG or a multi-task SLURM job step: running as a single worker"
        )
    else:
        try:
            json.loads(os.environ["TF_CONFIG"])
        except ValueError as exc:
            raise ConfigError(
                "strategy.kind",
                f"is multi_worker but TF_CONFIG is not JSON ({exc}): {os.environ['TF_CONFIG'][:200]}",
            ) from exc
    return resolver


def _multi_worker(cfg: StrategyConfig) -> Distribution:
    """The MultiWorkerMirroredStrategy of TF_CONFIG or of a multi-task SLURM step, created
    while a watchdog says what it waits for (see :class:`_ConnectWatchdog`)."""
    if cfg.cpu_devices and cfg.cpu_devices > 1:
        _cpu_devices(cfg.cpu_devices)
    resolver = _cluster_resolver()
    watchdog = _ConnectWatchdog(cfg.connect_timeout_seconds, resolver)
    # TensorFlow waits for the other tasks inside one C++ call: no Python signal handler
    # runs until it returns. Nothing is trained or written yet, so SIGTERM and SIGINT take
    # their default action meanwhile (the process ends at once; the watchdog says why).
    defaults = _default_signal_actions()
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(
            "strategy.kind",
            f"cannot create the MultiWorkerMirroredStrategy "
            f"(check TF_CONFIG; the strategy must be created before TensorFlow's "
            f"first operation in the process): {exc}",
        ) from exc
    finally:
        for signum, handler in defaults.items():
            signal.signal(signum, handler)
        watchdog.cancel()
    task_type, task_id, workers, chief = _task(strategy)
    return Distribution(
        "multi_worker",
        strategy,
        is_chief=chief,
        task=f"{task_type} {task_id}",
        task_id=task_id,
        num_workers=workers,
    )


def create(cfg: StrategyConfig) -> Distribution:
    """The Distribution for ``cfg``; created once per process and settings."""
    key = (cfg.kind, cfg.cpu_devices)
    if key in _CACHE:
        return _CACHE[key]
    if cfg.kind == "default":
        if cfg.cpu_devices and cfg.cpu_devices > 1:
            _cpu_devices(cfg.cpu_devices)  # harmless, and lets a test compare like with like
        dist = Distribution("default", tf.distribute.get_strategy())
    elif cfg.kind == "mirrored":
        # (listing physical devices does not initialize TensorFlow's devices; logical does)
        if tf.config.list_physical_devices("GPU"):
            strategy = tf.distribute.MirroredStrategy()  # every GPU
        else:
            strategy = tf.distribute.MirroredStrategy(_cpu_devices(cfg.cpu_devices))
        dist = Distribution("mirrored", strategy)
    else:
        dist = _multi_worker(cfg)
    _CACHE[key] = dist
    log.info("%s", dist.describe())
    return dist
