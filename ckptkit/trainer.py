"""The Trainer: the user writes the hooks, ckptkit owns the outer loop.

A subclass overrides ``build_model``, ``build_optimizer``, ``train_dataset`` and
``train_step`` (and optionally ``eval_dataset``, ``eval_step``, ``serving_signatures``);
``fit()`` builds everything, resumes or warm-starts, runs the loop with evaluation, logging
and checkpointing, and exports a SavedModel at the end.

Nothing happens in ``__init__`` beyond checking the config: building, restoring and training
all happen in ``fit()``, so a Trainer can be constructed cheaply (for ``--help``, a test,
a notebook) without touching the run directory.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf
from omegaconf import DictConfig, OmegaConf

from ckptkit import data as data_lib
from ckptkit import data_position, distribute, launch_record, metadata, storage
from ckptkit import export as export_lib
from ckptkit import loop as loop_lib
from ckptkit.checkpointer import Checkpointer
from ckptkit.claims import RunClaims, refuse_if_sweep_stopping
from ckptkit.config import RunConfig, load_config, to_dict
from ckptkit.errors import (
    CheckpointMismatchError,
    CheckpointSaveError,
    ConfigError,
    DataPipelineError,
    ExportError,
    NonFiniteError,
)
from ckptkit.iterator_state import peek
from ckptkit.metadata import checkpoint_prefix as metadata_prefix
from ckptkit.ownership import claim_checkpoint_dir
from ckptkit.policies import (
    AnySave,
    CheckpointInfo,
    SaveAtEnd,
    SaveAtSteps,
    SaveContext,
    SaveEveryNSeconds,
    SaveEveryNSteps,
    SaveOnNewBest,
    SaveOnPreemption,
    SavePolicy,
    is_better,
)
from ckptkit.preemption import (
    ExportInterrupted,
    Interrupted,
    PeerLost,
    Preempted,
    PreemptionWatch,
    stop_exception,
)
from ckptkit.progress import Progress
from ckptkit.resume import config_changes, format_changes, require_checkpoint, restore_newest_readable
from ckptkit.runinfo import RUN_FILE, read_run_record, write_run_record
from ckptkit.state import TrainState
from ckptkit.summaries import NoSummaries, SummaryWriters, flat_hparams
from ckptkit.transfer import RestoreReport, locate_source, restore_optimizer, restore_partial, unreachable_variables

log = logging.getLogger("ckptkit")


@dataclass(frozen=True)
class FitResult:
    """What ``fit()`` returns."""

    step: int
    metrics: dict[str, float]  # the last eval's, else the last train metrics
    best_metric: float | None = None
    best_step: int | None = None
    best_checkpoint: str | None = None
    export_path: str | None = None
    resumed_from: int | None = None
    steps_run: int = 0
    elapsed_seconds: float = 0.0  # training time over all launches of the run
    warm_start: RestoreReport | None = field(default=None, compare=False)


def _ensure_logging() -> None:
    """Show ckptkit's INFO lines when nobody (Hydra, the user) configured logging.

    Also keeps TensorFlow's per-save INFO chatter (its async checkpoint thread logs through
    absl) out of an INFO-level console, unless the user set that logger's level.
    """
    for name in ("absl", "tensorflow"):
        other = logging.getLogger(name)
        if other.level == logging.NOTSET:
            other.setLevel(logging.WARNING)
    if not logging.getLogger().handlers and not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(asctime)s][ckptkit] %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False  # a root handler added later (basicConfig) must not double lines


def _below_saved_step(max_steps: int, step: int, how: str, where: str) -> ConfigError:
    return ConfigError(
        "trainer.max_steps",
        f"is {max_steps}, below step {step} that the run {how} "
        f"from ({where}); raise it, or set checkpoint.resume=never to start over",
    )


def _features(batch):
    """The model input of a batch: the first element of a tuple/list, else the batch."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


class Trainer:
    """Base class of a training script; see the README for a complete example."""

    #: Clock of the time-based save policy: monotonic, so a wall clock stepped back (NTP,
    #: daylight saving) does not stop periodic saves. Tests replace it with a fake clock.
    clock: Callable[[], float] = staticmethod(time.monotonic)

    # Created by build() (which fit() calls); reading one before is an AttributeError that
    # says so (__getattr__), so the hooks see them without None in their types.
    model: Any
    optimizer: Any
    global_step: tf.Variable
    strategy: tf.distribute.Strategy
    distribution: distribute.Distribution
    checkpointer: Checkpointer
    rng: tf.random.Generator
    train_state: TrainState
    _train_ds: tf.data.Dataset
    _iterator: Any
    _train_fn: Callable[[int], dict[str, Any]]
    _finite: loop_lib.FiniteCheck
    _data_record: data_position.DataRecord

    def __init__(self, cfg: DictConfig | Mapping[str, Any]):
        self.settings: RunConfig
        self.settings, self.cfg = load_config(cfg)
        self.run_dir: str = self.settings.run_dir
        self._built = False
        self._watch: PreemptionWatch | None = None  # created with the first build() or fit()
        self._eval_fn: Callable | None = None
        self._summaries: SummaryWriters | NoSummaries = NoSummaries()
        self._progress = Progress("log", 0, 0)
        self._stopped = False  # a worker (this or, with several, any) was preempted
        self._claims = RunClaims(0.0)  # the chief's locks while fit() runs
        self._position_reported = False  # the data position's size, logged at the first save

    def __getattr__(self, name: str):  # only for names not set yet
        if name in Trainer.__annotations__:  # the attributes build() sets (clock has a value)
            raise AttributeError(
                f"{type(self).__name__}.{name} does not exist before build(): fit() calls build() "
                "first, and the hooks (train_step, ...) run after it"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def watch(self) -> PreemptionWatch:
        """Turns SIGTERM, SIGINT, SIGUSR1/2 into the train loop's stop flag (one per trainer)."""
        if self._watch is None:
            self._watch = PreemptionWatch()
        return self._watch

    @property
    def is_chief(self) -> bool:
        """Whether this process writes the run's files (false on the non-chief workers of a
        multi-worker run, which write nothing to the run directory)."""
        return "distribution" not in vars(self) or self.distribution.is_chief

    # --- hooks the user overrides --------------------------------------------------------

    def build_model(self):
        """Return the model: a ``tf.Module`` or a ``keras.Model``."""
        raise NotImplementedError(f"{type(self).__name__} must override build_model()")

    def build_optimizer(self):
        """Return the optimizer, e.g. ``tf.keras.optimizers.Adam(self.cfg.optim.lr)``."""
        raise NotImplementedError(f"{type(self).__name__} must override build_optimizer()")

    def train_dataset(self) -> tf.data.Dataset:
        """Return the training ``tf.data.Dataset`` of batches (repeated if finite)."""
        raise NotImplementedError(f"{type(self).__name__} must override train_dataset()")

    def eval_dataset(self) -> tf.data.Dataset | None:
        """Return a finite evaluation dataset, or None for no evaluation."""
        return None

    def train_step(self, batch) -> Mapping[str, tf.Tensor]:
        """One optimizer step on ``batch``; return scalar metrics (traced by tf.function)."""
        raise NotImplementedError(f"{type(self).__name__} must override train_step()")

    def eval_step(self, batch) -> Mapping[str, tf.Tensor]:
        """Metrics of one eval batch (means over the batch); traced by tf.function."""
        raise NotImplementedError(f"{type(self).__name__} has an eval_dataset() but does not override eval_step()")

    def serving_signatures(self) -> dict[str, Callable]:
        """Functions the exported SavedModel serves, by signature name.

        The default serves the model's call on the training data's features:
        ``serving_default(inputs) -> {"outputs": model(inputs)}``.
        """
        spec = _features(self._train_ds.element_spec)
        if not isinstance(spec, tf.TensorSpec):
            raise ExportError(
                "the training batches' features are not a single tensor "
                f"({spec}); override serving_signatures() to say what to export"
            )
        spec = tf.TensorSpec([None] + spec.shape.as_list()[1:], spec.dtype, name="inputs")
        model = self.model
        call_kwargs = {"training": False} if isinstance(model, tf.keras.Model) else {}

        def serve(inputs):
            return {"outputs": model(inputs, **call_kwargs)}

        return {"serving_default": tf.function(serve, input_signature=[spec])}

    # --- the outer loop ------------------------------------------------------------------

    def build(self) -> None:
        """Create strategy, model, optimizer, global step, data iterator and checkpointer.

        Also traces the train loop once, which creates every variable (Keras layers and
        optimizer slots are otherwise built lazily) so a restore can check that it filled
        all of them. Idempotent.
        """
        if self._built:
            return
        s = self.settings
        tf.keras.utils.set_random_seed(s.trainer.seed)
        if s.trainer.deterministic:
            tf.config.experimental.enable_op_determinism()
        self.distribution = distribute.create(s.strategy)
        self.strategy = self.distribution.strategy
        with self.strategy.scope():
            self.train_state = TrainState(s.trainer.seed)
            self.rng = self.train_state.rng
            self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
            self.model = self.build_model()
            self.optimizer = self.build_optimizer()
        ds = self.train_dataset()
        if not isinstance(ds, tf.data.Dataset):
            raise TypeError(f"train_dataset() must return a tf.data.Dataset, got {type(ds).__name__}")
        if int(ds.cardinality()) == 0:
            raise DataPipelineError(
                "train_dataset() yields no batch (its cardinality is 0): check "
                "the data path, filters and batch size (drop_remainder with "
                "fewer examples than one batch?)"
            )
        user_ds = ds
        if ds.cardinality() != tf.data.INFINITE_CARDINALITY:
            ds = ds.repeat()
        ds, symbolic = data_position.prepare(ds, data_position.resumed_symbolic(self.settings.checkpoint))
        log.info(
            "data position: checkpoints hold %s%s",
            data_lib.describe_position(ds),
            "; saved symbolically (tf.data's experimental_symbolic_checkpoint: positions, not buffered elements)"
            if symbolic
            else "",
        )
        held = data_position.buffer_report(ds, symbolic)
        if held:
            log.warning("data position: every checkpoint stores elements of the data: %s", "; ".join(held))
        self._train_ds = ds
        self._iterator = iter(ds)
        self._data_record = data_position.record(
            user_ds, self._iterator, symbolic=symbolic, custom=self.data_fingerprint()
        )
        dist = self.distribution
        if dist.distributed:
            dist.create_variables(
                self.train_step,
                peek(self._iterator),
                [
                    self.global_step,
                    self.rng.state,
                    *self.train_state.variables,
                    *self.model.variables,
                    *self.optimizer.variables,
                ],
            )
        c = s.checkpoint
        self.checkpointer = Checkpointer(
            c.dir,
            max_to_keep=c.max_to_keep,
            best_metric=c.best.metric,
            best_mode=c.best.mode,
            best_keep=c.best.keep,
            keep_every_n_hours=c.keep_every_n_hours,
            async_save=c.async_save,
            worker_dir=None if dist.is_chief else os.path.join(c.dir, f".worker-{dist.task_id}"),
            fence=self._check_locks,
            model=self.model,
            optimizer=self.optimizer,
            global_step=self.global_step,
            data=self._iterator,
            train_state=self.train_state,
        )
        self.checkpointer.data_record = self._data_record.to_json()
        self.checkpointer.data_check = self._data_decision
        self._train_fn = loop_lib.TrainLoop(
            self.train_step, self.global_step, self._iterator, self.watch.flag, dist if dist.distributed else None
        )
        self._train_fn.trace(s.trainer.steps_per_loop)
        self._finite = loop_lib.FiniteCheck([*self.model.variables, *self.optimizer.variables])
        self._finite.trace()
        hidden = unreachable_variables(self.model)
        if hidden:
            raise CheckpointMismatchError(
                f"{len(hidden)} variable(s) of the model are not reachable through its "
                f"attributes, so checkpoints would not hold them by path: {', '.join(hidden)}. "
                "Assign every layer and variable to an attribute of the model (a list or dict "
                "attribute is fine)."
            )
        self._built = True

    def data_fingerprint(self) -> str | None:
        """Optional: a string that changes when the training data changes (a dataset
        version, a manifest's hash). Each checkpoint records it with ckptkit's own record of
        the data (length, element spec, pipeline, a hash of the first batches); a resume
        compares both (``checkpoint.on_data_change``). Called once per launch, in ``build()``."""
        return None

    def _data_decision(self, info: CheckpointInfo) -> bool:
        """Restore the data position of ``info`` (True) or start it afresh (False), or raise."""
        return data_position.decide(self.settings.checkpoint.on_data_change, info, self._data_record)

    def _save_policy(self) -> AnySave:
        c = self.settings.checkpoint
        policies: list[SavePolicy] = [SaveOnNewBest(), SaveAtEnd(), SaveOnPreemption()]
        if c.save_every_steps:
            policies.append(SaveEveryNSteps(c.save_every_steps))
        if c.save_every_seconds:
            policies.append(SaveEveryNSeconds(c.save_every_seconds))
        if c.save_at_steps:
            policies.append(SaveAtSteps(frozenset(int(s) for s in c.save_at_steps)))
        return AnySave(tuple(policies))

    def _config_changes(self):
        """Differences between the config this run was started with and the current one."""
        try:
            old = read_run_record(self.run_dir).get("config")
        except Exception as exc:  # noqa: BLE001 - a missing or bad record only loses the diff
            log.warning("cannot compare with the run's previous config (%s)", exc)
            return []
        changes = config_changes(old or {}, to_dict(self.cfg, resolve=True))
        if changes:
            log.warning(
                "config changed since the run's last launch (%s): %s",
                os.path.join(self.run_dir, RUN_FILE),
                format_changes(changes),
            )
        return changes

    def _resume_or_warm_start(self) -> tuple[int | None, RestoreReport | None]:
        c = self.settings.checkpoint
        if c.resume == "never" and self.distribution.agree(bool(self.checkpointer.checkpoints)):
            # Every worker takes this path when the chief does (building again creates the
            # variables with collectives, in step on all workers); the chief moves the files.
            if self.is_chief:
                moved = f"{c.dir.rstrip('/')}-moved-{datetime.datetime.now():%Y%m%d-%H%M%S}"
                self._claims.let_go_of(c.dir)  # its lock records move with it; the fresh one gets a new lock
                storage.rename(c.dir, moved)
                log.warning(
                    "checkpoint.resume=never: moved the existing checkpoints aside to %s "
                    "(nothing deleted); starting fresh",
                    moved,
                )
            self.checkpointer.close()
            self._built = False
            self.build()
            if self.is_chief:  # the lock and owner record moved with them
                self._claims.take_checkpoint_dir(self.run_dir, c.dir)
                claim_checkpoint_dir(c.dir, self.run_dir)
            else:
                self.checkpointer._forget_existing()  # what it listed before the chief's move
        ckpt = self.checkpointer
        if ckpt.checkpoints and c.resume != "never":
            changes = self._config_changes()
            info = restore_newest_readable(ckpt, changes)
            assert info is not None  # None only when there is no checkpoint at all
            log.info("resumed from %s at step %d", info.path, int(self.global_step.numpy()))
            if c.init_from.path:
                log.info("checkpoint.init_from.path ignored: the run resumes from its own checkpoint")
            return info.step, None
        if c.resume == "must":
            raise require_checkpoint(c.dir)
        if c.init_from.path:
            f = c.init_from
            report = restore_partial(
                self.model,
                c.init_from.path,
                include=f.include,
                exclude=f.exclude,
                rename=f.rename,
                strict=f.strict,
                which=f.which,
            )
            if f.optimizer:
                restore_optimizer(self.optimizer, report.source)
            return None, report
        return None, None

    def _next_boundary(self, step: int) -> int:
        """The step at which the current loop call must stop for an event."""
        t, c = self.settings.trainer, self.settings.checkpoint
        target = min(t.max_steps, step + t.steps_per_loop)
        for period in (t.log_every_steps, t.eval_every_steps, c.save_every_steps):
            if period:
                target = min(target, (step // period + 1) * period)
        later = [int(s) for s in c.save_at_steps if int(s) > step]
        return min([target] + later)

    def _evaluate(self, eval_ds, step: int) -> dict[str, float]:
        if self._eval_fn is None:
            dist = self.distribution
            self._eval_fn = loop_lib.make_eval_step(self.eval_step, dist if dist.distributed else None)
        metrics = loop_lib.run_eval(self._eval_fn, eval_ds)
        self._summaries.scalars("eval", step, metrics)
        log.info("eval at step %d: %s", step, _fmt(metrics))
        return metrics

    def fit(self) -> FitResult:
        """Train to ``trainer.max_steps`` (resuming if possible), then export.

        On SIGTERM, SIGINT, SIGUSR1 or SIGUSR2 it saves at the step reached and raises
        :class:`~ckptkit.Preempted` (a SystemExit with code 75); after a Ctrl-C in an
        interactive session, :class:`~ckptkit.Interrupted` (a KeyboardInterrupt: the session
        stays). Holds the run directory's
        lock throughout: a second launch on the same run directory is refused.

        With ``strategy.kind=multi_worker`` every worker runs ``fit()``; the chief alone
        holds the lock and writes the run's files (checkpoints, metadata, logs, export).
        """
        _ensure_logging()
        # Until this launch is accepted (lock taken, checks passed), nothing it logs reaches
        # the log files in the run directory, and a refusal puts back Hydra's record of the
        # run (.hydra/config.yaml) as the last accepted launch wrote it.
        self._held_logs = launch_record.HeldLogs(self.run_dir)
        self._accepted = False
        try:
            self.distribution = distribute.create(self.settings.strategy)
            return self._fit_watched()
        except BaseException:
            if not self._accepted and self.is_chief:
                launch_record.restore(self.run_dir)
            raise
        finally:
            self._held_logs.release()

    def _accept_launch(self) -> None:
        """This launch trains (or finishes) the run: it becomes the run's record."""
        if self.is_chief:
            write_run_record(self.run_dir, type(self), self.cfg)
            launch_record.keep(self.run_dir)
        self._accepted = True
        self._held_logs.accept()

    def _fit_watched(self) -> FitResult:
        # Signals are watched over all of fit(): one arriving while building, tracing,
        # restoring, evaluating, waiting for the last save or exporting still ends in a
        # durable checkpoint and a clear exit, never in the default action.
        with self.watch:
            self._claims = RunClaims(self.settings.checkpoint.lock_lease_seconds)
            try:
                if self.is_chief:
                    self._claims.take(self.run_dir, self.settings.checkpoint.dir)
                refuse_if_sweep_stopping(self.settings.trainer.exit_code_preempted)
                try:
                    return self._fit()
                except (
                    tf.errors.UnavailableError,
                    tf.errors.DeadlineExceededError,
                    tf.errors.CancelledError,
                    tf.errors.AbortedError,
                    tf.errors.InternalError,
                ) as exc:
                    if not self.distribution.multi_worker:
                        raise
                    lost = self._peer_lost(exc)
                    log.error("%s", lost)
                    raise lost from exc
            finally:
                if "checkpointer" in vars(self):  # its background thread ends with the run
                    self.checkpointer.close()
                self._claims.release()

    @property
    def _exit(self) -> dict[str, int]:
        return {"exit_code": self.settings.trainer.exit_code_preempted}

    def _check_locks(self, quick: bool = False) -> None:
        """The fence of every commit point (see :meth:`ckptkit.claims.RunClaims.check`)."""
        self._claims.check(quick)

    def _peer_lost(self, exc: Exception) -> PeerLost:
        """A collective failed under multi_worker: a peer died or became unreachable. The
        strategy cannot save without it; the last checkpoint is where the run resumes."""
        me = self.distribution.task.split()[-1]
        message = getattr(exc, "message", None) or str(exc)
        tasks = sorted(
            {
                f"{job} {task}"
                for job, task in re.findall(r"/job:(\w+)/(?:replica:\d+/)?task:(\d+)", message)
                if task != me
            }
        )
        # TensorFlow's first line is "Graph execution error:"; the reason is further down
        reason = next(
            (
                line.strip()
                for line in message.splitlines()
                if "task:" in line or "unhealthy" in line or "connect" in line.lower()
            ),
            message.splitlines()[0] if message else type(exc).__name__,
        )
        latest = self._newest_on_disk()
        t = self.settings.trainer
        return PeerLost(
            t.exit_code_peer_lost if t.exit_code_peer_lost is not None else t.exit_code_preempted,
            f"{self.distribution.task} lost contact with "
            f"{', '.join(tasks) if tasks else 'another worker'} ({type(exc).__name__}: "
            f"{reason[:300]}); a multi-worker "
            "run cannot save without every worker. "
            + (f"The last checkpoint is {latest.path} (step {latest.step}): " if latest else "")
            + "start every worker again to resume from it.",
        )

    def _newest_on_disk(self) -> CheckpointInfo | None:
        """The newest checkpoint in the checkpoint directory as it is now (a non-chief's own
        list is the chief's at launch)."""
        if "checkpointer" not in vars(self):
            return None
        try:
            found = metadata.scan(self.checkpointer.directory)
        except Exception:  # noqa: BLE001 - unreadable now: what this process knew
            return self.checkpointer.latest
        return found[-1] if found else None

    def _check_workers_restored_alike(self, resumed_from: int | None) -> None:
        """Every worker of a multi-worker run must have restored the same checkpoint: one
        that did not see the chief's files (a node-local run_dir, NFS attribute caching)
        would start elsewhere, and the all-reduces would silently mix the two states."""
        dist = self.distribution
        if not dist.multi_worker:
            return
        info = self.checkpointer.find(resumed_from) if resumed_from is not None else None
        uid = int(info.uid[:15], 16) if info is not None and info.uid else 0
        mine = [int(self.global_step.numpy()), -1 if resumed_from is None else resumed_from, uid]
        rows = dist.gather_ints(mine)
        if all(row == rows[0] for row in rows):
            return

        def said(task, row):
            step, frm, u = row
            where = "nothing (a fresh start)" if frm < 0 else f"step {frm} (checkpoint id {u:x})"
            return f"worker {task} restored {where}, at step {step}"

        where = (
            f"the chief writes its checkpoints to {self.checkpointer.directory}"
            if dist.is_chief
            else f"{dist.task} reads the chief's checkpoints from {self.checkpointer.directory}"
        )
        raise CheckpointMismatchError(
            "the workers did not restore the same state: "
            + "; ".join(said(i, r) for i, r in enumerate(rows))
            + f". Here {where}: every worker must see that very directory (a shared filesystem, "
            "the same path on every host); nothing was trained."
        )

    def _stop_if_requested(self, step: int) -> None:
        """Between phases of fit(): stop now if a signal came (one process only; several
        workers stop together inside the loop)."""
        if self.watch.requested and not self.distribution.multi_worker:
            latest = self.checkpointer.latest if self.checkpointer else None
            self._stop(
                stop_exception(self.watch.signum, step, latest.path if latest else None, trained=False, **self._exit)
            )

    def _stop(self, stop: Preempted | Interrupted) -> None:
        """Say why the run stops, hand the signal to the handler installed before, raise."""
        log.warning("%s", stop)
        self.watch.chain()
        if isinstance(stop, Preempted) and stop.signum == signal.SIGINT:
            self.watch.exiting_on_sigint = True  # the process ends: a 2nd Ctrl-C exits quietly
        raise stop

    def _precheck(self) -> None:
        """What can be refused before building and tracing (which take most of a launch):
        a resumable checkpoint past ``trainer.max_steps``, and a warm-start source that is
        not there."""
        c, max_steps = self.settings.checkpoint, self.settings.trainer.max_steps
        found = metadata.scan(c.dir) if c.resume != "never" and tf.io.gfile.isdir(c.dir) else []
        # Resume takes the newest readable checkpoint, falling back to older ones; refused
        # here only when every one of them is past max_steps (readability is known only by
        # reading every tensor, which is what resume does).
        if found and found[0].step > max_steps:
            raise _below_saved_step(max_steps, found[-1].step, "would resume", found[-1].path)
        if c.init_from.path and not found:
            locate_source(c.init_from.path, c.init_from.which)

    def _fit(self) -> FitResult:
        self._precheck()
        self.build()
        s = self.settings
        if self.is_chief:
            claim_checkpoint_dir(s.checkpoint.dir, self.run_dir)
            self.checkpointer.remove_leftovers()
        self._stop_if_requested(0)
        resumed_from, report = self._resume_or_warm_start()
        self._check_workers_restored_alike(resumed_from)
        step_now = int(self.global_step.numpy())
        self._stop_if_requested(step_now)
        if resumed_from is not None and step_now > s.trainer.max_steps:
            raise _below_saved_step(s.trainer.max_steps, step_now, "resumed", self.checkpointer.directory)
        self._accept_launch()
        eval_ds = self.eval_dataset()
        if s.checkpoint.best.metric and eval_ds is None:
            raise ConfigError(
                "checkpoint.best.metric", f"is {s.checkpoint.best.metric!r} but the trainer has no eval_dataset()"
            )
        self._summaries = SummaryWriters(os.path.join(self.run_dir, "logs")) if self.is_chief else NoSummaries()
        start_step = int(self.global_step.numpy())
        if resumed_from is not None:
            self._summaries.resume_at(start_step)
        self._summaries.run_info(start_step, OmegaConf.to_yaml(self.cfg), flat_hparams(to_dict(self.cfg, resolve=True)))
        if s.trainer.max_steps == 0 and not self.checkpointer.checkpoints:
            log.info("trainer.max_steps=0: %s converts, it does not train", s.name or self.run_dir)
        elif start_step >= s.trainer.max_steps:
            log.info(
                "run %s already finished: step %d of trainer.max_steps=%d, nothing to train",
                s.name or self.run_dir,
                start_step,
                s.trainer.max_steps,
            )
        else:
            log.info("training %s from step %d to %d", s.name or self.run_dir, start_step, s.trainer.max_steps)
        self._progress = Progress(s.trainer.progress if self.is_chief else "log", s.trainer.max_steps, start_step)
        if self.checkpointer.latest is not None:  # a resumed run's bar starts where it was
            self._progress.saved(self.checkpointer.latest.step)
        best_value, best_step = self.train_state.best()
        if best_step is not None and best_value is not None and s.checkpoint.best.metric:
            self._progress.best(s.checkpoint.best.metric, best_value, best_step)
        try:
            with self._progress:
                step, train_metrics, eval_metrics = self._train(eval_ds, start_step)
        finally:
            self.checkpointer.wait()
            self._log_completed_saves()
            self._summaries.flush()
        if not self.distribution.multi_worker and self.watch.requested:
            self._stopped = True  # also when the signal came after the last loop
        latest = self.checkpointer.latest  # a worker's list is the chief's at its start
        saved = latest.path if latest and self.is_chief else metadata_prefix(self.checkpointer.directory, step)
        if self._stopped and step < s.trainer.max_steps:
            self._summaries.close()
            self._stop(stop_exception(self.watch.signum, step, saved, **self._exit))
        export_path = None
        if s.export.enabled and self.is_chief:
            export_path = self._final_export(step, saved)
        self._summaries.close()
        if self.is_chief:
            best = self.checkpointer.best
            best_metric = self.checkpointer.best_value()
            best_step, best_path = (best.step, best.path) if best else (None, None)
        else:  # a worker does not track the chief's files; the best is in the train state
            best_metric, best_step = self.train_state.best()
            best_path = None if best_step is None else metadata_prefix(self.checkpointer.directory, best_step)
        return FitResult(
            step=step,
            metrics=dict(eval_metrics or train_metrics),
            best_metric=best_metric,
            best_step=best_step,
            best_checkpoint=best_path,
            export_path=export_path,
            resumed_from=resumed_from,
            steps_run=step - start_step,
            elapsed_seconds=float(self.train_state.elapsed_seconds.numpy()),
            warm_start=report,
        )

    def _final_export(self, step: int, saved: str) -> str | None:
        """The export at the end of fit(). A signal before or during it skips it (training is
        complete and saved): the process exits 0 and says how to export."""
        s = self.settings
        how = f"the export was skipped; run the same command again, or `ckptkit export {self.run_dir}`, to export"
        watch = self.watch
        export_path = None
        try:
            if not watch.requested:
                watch.interrupt_python = True
                try:
                    export_path = self.export()
                finally:
                    watch.interrupt_python = False
        except ExportInterrupted:
            pass
        if watch.requested:
            self._summaries.close()
            self._stop(stop_exception(watch.signum, step, saved, complete=True, detail=how, **self._exit))
        if export_path and s.export.max_to_keep:
            self._check_locks()
            export_lib.prune_versions(s.export.dir, s.export.max_to_keep)
        return export_path

    def _log_completed_saves(self) -> None:
        for info in self.checkpointer.drain_completed():
            self._summaries.scalars(
                "checkpoint",
                info.step,
                {  # one "checkpoint" section of cards
                    "checkpoint/save_seconds": info.save_seconds or 0.0,
                    "checkpoint/blocking_seconds": info.blocking_seconds or 0.0,
                    "checkpoint/size_mb": (info.size or 0) / 2**20,
                },
            )
            self._progress.saved(info.step)

    def _check_new_best(self, step: int, step_eval: dict[str, float] | None) -> bool:
        metric, mode = self.settings.checkpoint.best.metric, self.settings.checkpoint.best.mode
        if step_eval is None or not metric:
            return False
        if metric not in step_eval:
            raise ConfigError(
                "checkpoint.best.metric", f"{metric!r} is not among the eval metrics ({', '.join(sorted(step_eval))})"
            )
        value = step_eval[metric]
        best_value, _ = self.train_state.best()
        if not np.isfinite(value) or not is_better(value, best_value, mode):
            return False
        log.info(
            "new best %s=%.6g at step %d (was %s)",
            metric,
            value,
            step,
            "none" if best_value is None else f"{best_value:.6g}",
        )
        self.train_state.set_best(value, step)
        self._progress.best(metric, value, step)
        return True

    def _train(self, eval_ds, step: int):
        """The outer loop; returns (step, last train metrics, last eval metrics)."""
        s = self.settings
        t = s.trainer
        ckpt = self.checkpointer
        policy = self._save_policy()
        train_metrics: dict[str, float] = {}
        eval_metrics: dict[str, float] = {}
        start_step = step
        last_save_step = ckpt.latest.step if ckpt.latest else None
        last_save_time = self.clock()
        log_start, log_start_step = time.time(), step
        unsaved_seconds = 0.0  # training time not yet added to train_state (done before saves)
        # With several workers every decision to stop or save must be the same on all of
        # them (each save and each step is a collective): the loop combines the workers'
        # stop flags, and each save decision is agreed on. A worker only learns that another
        # was preempted from a loop that ran fewer steps than asked.
        coordinated = self.distribution.multi_worker
        self._stopped = False
        while step < t.max_steps and not self._stopped and (coordinated or not self.watch.requested):
            self._check_locks(quick=True)
            n = self._next_boundary(step) - step
            began = time.time()
            try:
                out = self._train_fn(n)
            except tf.errors.OutOfRangeError as exc:
                raise DataPipelineError(
                    "train_dataset() yielded no batch"
                    + (f" after step {step}" if step > start_step else "")
                    + ": it is empty (check the data path, filters and batch size)"
                ) from exc
            unsaved_seconds += time.time() - began
            if coordinated:
                reached = int(self.global_step.numpy())
                self._stopped = reached < step + n  # identical on every worker
                if reached == step:
                    break  # stopped before its first step; saved below if unsaved
                step = reached
            elif self.watch.requested:
                step = int(self.global_step.numpy())
                self._stopped = True
            else:
                step += n
            final = step >= t.max_steps
            log_due = step % t.log_every_steps == 0 or final
            step_eval = None
            if eval_ds is not None and ((t.eval_every_steps and step % t.eval_every_steps == 0) or final):
                step_eval = eval_metrics = self._evaluate(eval_ds, step)
            new_best = self._check_new_best(step, step_eval)
            ctx = SaveContext(
                step=step,
                now=self.clock(),
                last_save_step=last_save_step,
                last_save_time=last_save_time,
                new_best=new_best,
                final=final,
                preempted=self._stopped,
            )
            save_due = policy.should_save(ctx)
            if coordinated:
                save_due = self.distribution.agree(save_due)
            # Metrics leave the device only when something uses them: converting them after
            # every loop call would cost a small model ~10% at steps_per_loop=1. They are
            # always checked before a save, so non-finite weights are never saved.
            if log_due or save_due or self._progress.enabled:
                train_metrics = loop_lib.to_python(out)
                # (with several workers, only where all of them check: all raise together)
                if (log_due or save_due or not coordinated) and not loop_lib.all_finite(train_metrics):
                    raise NonFiniteError(
                        f"non-finite train metrics at step {step}: {_fmt(train_metrics)}; "
                        f"nothing was saved after it. {self._last_good()}"
                    )
                self._progress.update(step, train_metrics, (step - log_start_step) / max(time.time() - log_start, 1e-9))
            self._log_completed_saves()
            if log_due:
                rate = (step - log_start_step) / max(time.time() - log_start, 1e-9)
                self._summaries.scalars("train", step, {**train_metrics, "steps_per_sec": rate})
                log.info("step %d/%d  %s  (%.0f steps/s)", step, t.max_steps, _fmt(train_metrics), rate)
                log_start, log_start_step = time.time(), step
            if save_due:
                self.train_state.add_time(unsaved_seconds)
                unsaved_seconds = 0.0
                path = self._save(step, step_eval)
                last_save_step, last_save_time = step, ctx.now
                if (
                    new_best
                    and step_eval
                    and s.export.enabled
                    and s.export.on_best
                    and not ctx.preempted
                    and self.is_chief
                ):
                    self._export_new_best(step, path, step_eval)
        self.train_state.add_time(unsaved_seconds)
        if step > start_step and last_save_step != step:
            self._save(step, eval_metrics or None)
        elif t.max_steps == 0 and ckpt.latest is None and not self.watch.requested:
            eval_metrics = self._evaluate(eval_ds, 0) if eval_ds is not None else {}
            self._check_new_best(0, eval_metrics or None)
            self._save(0, eval_metrics or None)
            log.info(
                "trainer.max_steps=0: nothing trained; the model as built%s is saved as step 0%s",
                " and warm-started from " + str(s.checkpoint.init_from.path) if s.checkpoint.init_from.path else "",
                ", to be exported" if s.export.enabled else "",
            )
        return step, train_metrics, eval_metrics

    def _save(self, step: int, metrics: Mapping[str, float] | None) -> str:
        """Save ``step``, unless a model or optimizer variable is NaN or infinite: a loss
        computed before the update can be finite while the update poisoned the weights, and
        a poisoned checkpoint would be resumed from for ever."""
        bad = self._finite()
        if bad:
            raise NonFiniteError(
                f"non-finite values at step {step} in {len(bad)} variable(s): "
                f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; nothing was saved at step "
                f"{step}. {self._last_good()}"
            )
        path = self.checkpointer.save(step, metrics=metrics)
        if not self._position_reported:
            self._position_reported = True
            size = self.checkpointer.data_position_bytes()
            if size is not None:
                log.info("data position: %.1f kB in each checkpoint", size / 1e3)
        return path

    def _last_good(self) -> str:
        """Which checkpoint the run resumes from, once the save in flight is on disk."""
        try:
            self.checkpointer.wait()
        except CheckpointSaveError as exc:
            log.error("%s", exc)
        latest = self.checkpointer.latest
        return (
            f"The last good checkpoint is {latest.path} (step {latest.step}): the next launch resumes from it."
            if latest
            else "No checkpoint was saved before it."
        )

    # --- export --------------------------------------------------------------------------

    def _sample_features(self):
        ds = self.eval_dataset() or self._train_ds
        return _features(next(iter(ds)))

    def export(
        self, from_: str | None = None, to: str | None = None, source: CheckpointInfo | None = None, force: bool = False
    ) -> str | None:
        """Export a checkpoint of this run as a SavedModel; return the version directory.

        ``from_`` is ``best`` or ``last`` (default ``export.from``; ``best`` falls back to the
        last checkpoint when there is no best), ``to`` the export directory (default
        ``export.dir``). The newest version is handed back instead of a new one when it came
        from the same checkpoint and serves the same signatures (the log says so); ``force``
        always writes a new version. Works on a finished run without training: ``ckptkit
        export`` calls it.
        """
        self.build()
        e = self.settings.export
        ckpt = self.checkpointer
        if source is None:
            from_ = from_ or e.from_
            source = ckpt.best if from_ == "best" and ckpt.best is not None else ckpt.latest
        if source is None:
            log.warning("no checkpoint in %s to export from; skipping the export", ckpt.directory)
            return None
        return export_lib.export_checkpoint(
            self.model,
            source,
            self.serving_signatures,
            to or e.dir,
            current_step=int(self.global_step.numpy()),
            sample=self._sample_features(),
            verify=e.verify,
            info={"run_dir": self.run_dir, "name": self.settings.name},
            config_yaml=OmegaConf.to_yaml(self.cfg),
            reuse=not force,
            cast_outputs_float32=e.cast_outputs_float32,
            fence=self._check_locks,
        )

    def _export_new_best(self, step: int, path: str, metrics: Mapping[str, float]) -> None:
        e = self.settings.export
        info = self.checkpointer.find(step) or CheckpointInfo(
            step=step, path=path, time=time.time(), metrics=dict(metrics)
        )
        self.export(source=info)
        if e.max_to_keep:
            self._check_locks()
            export_lib.prune_versions(e.dir, e.max_to_keep)


def _fmt(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
