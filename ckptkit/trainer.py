"""The Trainer: the user writes the hooks, ckptkit owns the outer loop.

A subclass overrides ``build_model``, ``build_optimizer``, ``train_dataset`` and
``train_step`` (and optionally ``eval_dataset``, ``eval_step``, ``serving_signatures``,
``data_fingerprint``); ``build()`` creates what they return, ``fit()`` trains and
``export()`` exports. Where the rest lives, by what it does:

- one launch, from the lock to the result: :mod:`ckptkit.launch`;
- the outer loop and when each action is due (evaluate, save, log, export on best, stop):
  :mod:`ckptkit.controller` (the save rules in :mod:`ckptkit.policies`);
- resume and warm start: :mod:`ckptkit.resume`, :mod:`ckptkit.transfer`;
- the run's claims on its directories (lock, fence, sweep stop): :mod:`ckptkit.claims`;
- multi-worker agreement: :mod:`ckptkit.workers`, :mod:`ckptkit.distribute`;
- signals: :mod:`ckptkit.preemption`; the data position: :mod:`ckptkit.data_position`.

Nothing happens in ``__init__`` beyond checking the config, so a Trainer can be constructed
cheaply (for ``--help``, a test, a notebook) without touching the run directory.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import tensorflow as tf
from omegaconf import DictConfig, OmegaConf

from ckptkit import data as data_lib
from ckptkit import data_position, distribute, local_tier
from ckptkit import export as export_lib
from ckptkit import loop as loop_lib
from ckptkit.checkpointer import Checkpointer
from ckptkit.claims import RunClaims
from ckptkit.config import RunConfig, load_config
from ckptkit.errors import (
    CheckpointMismatchError,
    DataPipelineError,
    ExportError,
    HookError,
)
from ckptkit.iterator_state import peek
from ckptkit.launch import FitResult, Launch
from ckptkit.policies import (
    CheckpointInfo,
)
from ckptkit.preemption import (
    PreemptionWatch,
)
from ckptkit.progress import Progress
from ckptkit.state import TrainState
from ckptkit.summaries import NoSummaries, SummaryWriters
from ckptkit.transfer import unreachable_variables

log = logging.getLogger("ckptkit")

#: The hooks every Trainer overrides (the others have defaults; the README's 'The hooks').
REQUIRED_HOOKS = ("build_model", "build_optimizer", "train_dataset", "train_step")


def default_serving_spec(features):
    """The input signature of the default ``serving_default`` for a batch's features: one
    tensor (``inputs``), or a dict of tensors (one named input per key), any batch size.
    Anything else (sparse or ragged features, nested structures) is refused with the fix."""

    def unbatched(spec, name):
        return tf.TensorSpec([None] + spec.shape.as_list()[1:], spec.dtype, name=name)

    if isinstance(features, tf.TensorSpec) and features.shape.rank:
        return unbatched(features, "inputs")
    if (
        isinstance(features, Mapping)
        and features
        and all(isinstance(s, tf.TensorSpec) and s.shape.rank for s in features.values())
    ):
        return {str(k): unbatched(s, str(k)) for k, s in features.items()}
    raise ExportError(
        f"the training batches' features are {features}, which the default serving signature cannot take "
        "(it takes one batched tensor or a dict of them): override serving_signatures(), e.g. "
        "{'serving_default': tf.function(serve, input_signature=[{'age': tf.TensorSpec([None], tf.float32)}])}, "
        "or set export.enabled=false"
    )


def check_overrides(trainer: Trainer) -> None:
    """Name every required hook the trainer's class does not override, in one line, before
    anything is built or traced."""
    cls = type(trainer)
    missing = [f"{h}()" for h in REQUIRED_HOOKS if getattr(cls, h) is getattr(Trainer, h)]
    if missing:
        names = ", ".join(missing[:-1]) + " and " + missing[-1] if len(missing) > 1 else missing[0]
        raise HookError(
            f"{cls.__name__} does not override {names}, which every Trainer must (see 'The hooks' in the README)"
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
    _train_window: loop_lib.TrainWindow  # the train loop's window (means, non-finite steps)
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
        ``serving_default(inputs) -> {"outputs": model(inputs)}``; features that are a dict
        of tensors are served as one named input per key.
        """
        spec = default_serving_spec(_features(self._train_ds.element_spec))
        model = self.model
        call_kwargs = {"training": False} if isinstance(model, tf.keras.Model) else {}

        def serve(inputs):
            return {"outputs": model(inputs, **call_kwargs)}

        return {"serving_default": tf.function(serve, input_signature=[spec])}

    # --- building --------------------------------------------------------------------------

    def build(self) -> None:
        """Create strategy, model, optimizer, global step, data iterator and checkpointer.

        Also traces the train loop once, which creates every variable (Keras layers and
        optimizer slots are otherwise built lazily) so a restore can check that it filled
        all of them. Idempotent.
        """
        if self._built:
            return
        check_overrides(self)
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
        self._build_data()
        if s.export.enabled and type(self).serving_signatures is Trainer.serving_signatures:
            default_serving_spec(_features(self._train_ds.element_spec))  # refused now, not after training
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
        self._build_checkpointer()
        self._train_fn = loop_lib.TrainLoop(
            self.train_step, self.global_step, self._iterator, self.watch.flag, dist if dist.distributed else None
        )
        self._train_fn.trace(s.trainer.steps_per_loop)
        self._train_window = self._train_fn.window
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

    def _build_data(self) -> None:
        """The training iterator, its data position's way of saving, and its record."""
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

    def _build_checkpointer(self) -> None:
        s, dist = self.settings, self.distribution
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
            local_dir=c.local_dir,
            local_max_to_keep=c.local_max_to_keep or local_tier.DEFAULT_MAX_TO_KEEP,
            persist_every_seconds=c.persist_every_seconds,
            persist_every_saves=c.persist_every_saves,
            model=self.model,
            optimizer=self.optimizer,
            global_step=self.global_step,
            data=self._iterator,
            train_state=self.train_state,
        )
        self.checkpointer.data_record = self._data_record.to_json()
        self.checkpointer.data_check = self._data_decision

    def fit(self) -> FitResult:
        """Train to ``trainer.max_steps`` (resuming if possible), then export.

        On SIGTERM, SIGINT, SIGUSR1 or SIGUSR2 it saves at the step reached and raises
        :class:`~ckptkit.Preempted` (a SystemExit with ``trainer.exit_code_preempted``, 75);
        after a Ctrl-C in an interactive session, :class:`~ckptkit.Interrupted` (a
        KeyboardInterrupt: the session stays). Holds the run directory's lock throughout: a
        second launch on the same run directory is refused. With
        ``strategy.kind=multi_worker`` every worker runs ``fit()``; the chief alone holds the
        lock and writes the run's files. The steps are in :mod:`ckptkit.launch`, the outer
        loop in :mod:`ckptkit.controller`.
        """
        return Launch(self).fit()

    def data_fingerprint(self) -> str | None:
        """Optional: a string that changes when the training data changes (a dataset
        version, a manifest's hash). Each checkpoint records it with ckptkit's own record of
        the data (length, element spec, pipeline, a hash of the first batches); a resume
        compares both (``checkpoint.on_data_change``). Called once per launch, in ``build()``."""
        return None

    def _data_decision(self, info: CheckpointInfo) -> bool:
        """Restore the data position of ``info`` (True) or start it afresh (False), or raise."""
        return data_position.decide(self.settings.checkpoint.on_data_change, info, self._data_record)

    def _check_locks(self, quick: bool = False) -> None:
        """The fence of every commit point (see :meth:`ckptkit.claims.RunClaims.check`)."""
        self._claims.check(quick)

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
