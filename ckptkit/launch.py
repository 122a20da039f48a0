"""One launch of a run: what ``Trainer.fit()`` does around the outer loop.

In order: hold back the launch's log lines until it is accepted; create the strategy; watch
signals over everything; take the run's claims on its directories (:mod:`ckptkit.claims`);
refuse what can be refused before building (a resumable checkpoint past ``max_steps``, a
missing warm-start source); build; resume or warm-start (:mod:`ckptkit.resume`); check that
every worker restored the same state (:mod:`ckptkit.workers`); accept the launch (it becomes
the run's record); run the outer loop (:mod:`ckptkit.controller`); stop with the right exit
after a signal; export; return a :class:`FitResult`.
"""

from __future__ import annotations

import logging
import os
import re
import signal
from dataclasses import dataclass, field
from typing import Any

import tensorflow as tf
from omegaconf import OmegaConf

from ckptkit import checkpoint_files, distribute, launch_record, metadata, moving_in, runinfo, storage, workers
from ckptkit import export as export_lib
from ckptkit.claims import RunClaims, refuse_if_sweep_stopping
from ckptkit.config import to_dict
from ckptkit.controller import Controller
from ckptkit.errors import CheckpointSaveError, CkptkitError, ConfigError
from ckptkit.local_tier import make_place, tier_dir
from ckptkit.metadata import checkpoint_prefix as metadata_prefix
from ckptkit.ownership import claim_checkpoint_dir
from ckptkit.preemption import ExportInterrupted, Interrupted, Preempted, stop_exception
from ckptkit.progress import Progress
from ckptkit.resume import resume_or_warm_start
from ckptkit.runinfo import write_run_record
from ckptkit.summaries import NoSummaries, SummaryWriters, flat_hparams
from ckptkit.transfer import RestoreReport, locate_source

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


class Launch:
    """``Trainer.fit()`` for one trainer (see the module docstring)."""

    def __init__(self, trainer: Any):
        self.tr = trainer
        self.controller = Controller(trainer)

    def fit(self) -> FitResult:
        """``Trainer.fit()``: see its docstring."""
        tr = self.tr
        _ensure_logging()
        # Until this launch is accepted (lock taken, checks passed), nothing it logs reaches
        # the log files in the run directory, and a refusal puts back Hydra's record of the
        # run (.hydra/config.yaml) as the last accepted launch wrote it.
        tr._held_logs = launch_record.HeldLogs(tr.run_dir)
        tr._accepted = False
        try:
            tr.distribution = distribute.create(tr.settings.strategy)
            try:
                return self._fit_watched()
            except (OSError, tf.errors.OpError) as exc:
                if isinstance(exc, CkptkitError) or not storage.disk_full(exc):
                    raise
                raise self._disk_full(exc) from exc
        except BaseException:
            if not tr._accepted and tr.is_chief:
                launch_record.restore(tr.run_dir)
            raise
        finally:
            tr._held_logs.release()

    def _disk_full(self, exc: BaseException) -> CheckpointSaveError:
        """A full disk met outside a save (the run record, the run's identity, TensorBoard's
        event files, the lock): one line, as a save's (``checkpoint_files.full_disk``)."""
        tr = self.tr
        text = getattr(exc, "message", None) or str(exc)
        named = [getattr(exc, "filename", None)] + re.findall(r"(/[^\s;:'\"]+)", text)
        # TensorFlow's messages also hold device names (/job:localhost/...): a path counts
        # when its directory exists, below the root
        path = next(
            (p for p in named if p and os.path.dirname(p) not in ("", "/") and os.path.isdir(os.path.dirname(p))), None
        )
        directory = os.path.dirname(path) if path else tr.run_dir
        needed = tr.checkpointer.needed_bytes() if "checkpointer" in vars(tr) else None
        return CheckpointSaveError(checkpoint_files.full_disk(directory, needed, writing=path))

    def _fit_watched(self) -> FitResult:
        tr = self.tr
        # Signals are watched over all of fit(): one arriving while building, tracing,
        # restoring, evaluating, waiting for the last save or exporting still ends in a
        # durable checkpoint and a clear exit, never in the default action.
        with tr.watch:
            tr._claims = RunClaims(tr.settings.checkpoint.lock_lease_seconds)
            try:
                if tr.is_chief:
                    c = tr.settings.checkpoint
                    tier = tier_dir(c.local_dir, c.dir) if c.local_dir else None
                    if tier:
                        make_place(tier)  # before its lock is written into it
                    tr._claims.take(tr.run_dir, c.dir, tier)
                refuse_if_sweep_stopping(tr.settings.trainer.exit_code_preempted)
                try:
                    return self._fit()
                except (
                    tf.errors.UnavailableError,
                    tf.errors.DeadlineExceededError,
                    tf.errors.CancelledError,
                    tf.errors.AbortedError,
                    tf.errors.InternalError,
                ) as exc:
                    if not tr.distribution.multi_worker:
                        raise
                    lost = workers.peer_lost(tr, exc)
                    log.error("%s", lost)
                    raise lost from exc
            finally:
                if "checkpointer" in vars(tr):  # its background thread ends with the run
                    tr.checkpointer.close()
                tr._claims.release()

    def _accept_launch(self) -> None:
        """This launch trains (or finishes) the run: it becomes the run's record."""
        tr = self.tr
        if tr.is_chief:
            write_run_record(tr.run_dir, type(tr), tr.cfg)
            launch_record.keep(tr.run_dir)
        tr._accepted = True
        tr._held_logs.accept()

    def _precheck(self) -> None:
        """What can be refused before building and tracing (which take most of a launch):
        a resumable checkpoint past ``trainer.max_steps``, and a warm-start source that is
        not there."""
        tr = self.tr
        c, max_steps = tr.settings.checkpoint, tr.settings.trainer.max_steps
        found = metadata.scan(c.dir) if c.resume != "never" and tf.io.gfile.isdir(c.dir) else []
        # Resume takes the newest readable checkpoint, falling back to older ones; refused
        # here only when every one of them is past max_steps (readability is known only by
        # reading every tensor, which is what resume does).
        if found and found[0].step > max_steps:
            raise _below_saved_step(max_steps, found[-1].step, "would resume", found[-1].path)
        if c.init_from.path and not found:
            locate_source(c.init_from.path, c.init_from.which)

    def _fit(self) -> FitResult:
        tr = self.tr
        resumed_from, report = self._start()
        eval_ds = tr.eval_dataset()
        if tr.settings.checkpoint.best.metric and eval_ds is None:
            raise ConfigError(
                "checkpoint.best.metric",
                f"is {tr.settings.checkpoint.best.metric!r} but the trainer has no eval_dataset()",
            )
        self.controller.prepare_eval(eval_ds)
        start_step = int(tr.global_step.numpy())
        self._open_summaries_and_progress(start_step, resumed_from is not None)
        try:
            with tr._progress:
                step, train_metrics, eval_metrics = self.controller.run(eval_ds, start_step)
        finally:
            tr.checkpointer.wait()
            self.controller.log_completed_saves()
            tr._summaries.flush()
        export_path = self._end(step)
        return self._result(step, dict(eval_metrics or train_metrics), export_path, resumed_from, start_step, report)

    def _start(self) -> tuple[int | None, RestoreReport | None]:
        """Refuse early what can be refused, build, resume or warm-start, accept the launch."""
        tr = self.tr
        s = tr.settings
        self._precheck()
        tr.build()
        if tr.is_chief:
            tr._plain_manager = moving_in.written_by_plain_manager(s.checkpoint.dir)  # before the claim marks it
            claim_checkpoint_dir(s.checkpoint.dir, tr.run_dir)
            tr.checkpointer.remove_leftovers()
            tr.checkpointer.agree_state_file()
            runinfo.remove_leftovers(tr.run_dir)
        self._stop_if_requested(0)
        resumed_from, report = resume_or_warm_start(tr)
        workers.check_restored_alike(tr, resumed_from)
        step_now = int(tr.global_step.numpy())
        self._stop_if_requested(step_now)
        if resumed_from is not None and step_now > s.trainer.max_steps:
            raise _below_saved_step(s.trainer.max_steps, step_now, "resumed", tr.checkpointer.directory)
        self._accept_launch()
        return resumed_from, report

    def _open_summaries_and_progress(self, start_step: int, resumed: bool) -> None:
        tr = self.tr
        s = tr.settings
        tr._summaries = SummaryWriters(os.path.join(tr.run_dir, "logs")) if tr.is_chief else NoSummaries()
        if resumed:
            tr._summaries.resume_at(start_step)
        tr._summaries.run_info(start_step, OmegaConf.to_yaml(tr.cfg), flat_hparams(to_dict(tr.cfg, resolve=True)))
        if s.trainer.max_steps == 0 and not tr.checkpointer.checkpoints:
            log.info("trainer.max_steps=0: %s converts, it does not train", s.name or tr.run_dir)
        elif start_step >= s.trainer.max_steps:
            log.info(
                "run %s already finished: step %d of trainer.max_steps=%d, nothing to train",
                s.name or tr.run_dir,
                start_step,
                s.trainer.max_steps,
            )
        else:
            log.info("training %s from step %d to %d", s.name or tr.run_dir, start_step, s.trainer.max_steps)
        tr._progress = Progress(s.trainer.progress if tr.is_chief else "log", s.trainer.max_steps, start_step)
        if tr.checkpointer.latest is not None:  # a resumed run's bar starts where it was
            tr._progress.saved(tr.checkpointer.latest.step)
        best_value, best_step = tr.train_state.best()
        if best_step is not None and best_value is not None and s.checkpoint.best.metric:
            tr._progress.best(s.checkpoint.best.metric, best_value, best_step)

    def _end(self, step: int) -> str | None:
        """After the loop: stop after a signal (the step is saved), else export."""
        tr = self.tr
        s = tr.settings
        if not tr.distribution.multi_worker and tr.watch.requested:
            tr._stopped = True  # also when the signal came after the last loop
        latest = tr.checkpointer.latest  # a worker's list is the chief's at its start
        saved = latest.path if latest and tr.is_chief else metadata_prefix(tr.checkpointer.directory, step)
        if tr._stopped and step < s.trainer.max_steps:
            tr._summaries.close()
            self._stop(stop_exception(tr.watch.signum, step, saved, **self._exit))
        export_path = None
        if tr.is_chief and step >= s.trainer.max_steps:
            tr.checkpointer.finish_local_tier()  # every save is in checkpoint.dir now
        if s.export.enabled and tr.is_chief:
            export_path = self._final_export(step, saved)
        tr._summaries.close()
        return export_path

    def _result(self, step, metrics, export_path, resumed_from, start_step, report) -> FitResult:
        tr = self.tr
        if tr.is_chief:
            best = tr.checkpointer.best
            best_metric = tr.checkpointer.best_value()
            best_step, best_path = (best.step, best.path) if best else (None, None)
        else:  # a worker does not track the chief's files; the best is in the train state
            best_metric, best_step = tr.train_state.best()
            best_path = None if best_step is None else metadata_prefix(tr.checkpointer.directory, best_step)
        return FitResult(
            step=step,
            metrics=metrics,
            best_metric=best_metric,
            best_step=best_step,
            best_checkpoint=best_path,
            export_path=export_path,
            resumed_from=resumed_from,
            steps_run=step - start_step,
            elapsed_seconds=float(tr.train_state.elapsed_seconds.numpy()),
            warm_start=report,
        )

    def _final_export(self, step: int, saved: str) -> str | None:
        """The export at the end of fit(). A signal before or during it skips it (training is
        complete and saved): the process exits 0 and says how to export."""
        tr = self.tr
        s = tr.settings
        how = f"the export was skipped; run the same command again, or `ckptkit export {tr.run_dir}`, to export"
        watch = tr.watch
        export_path = None
        try:
            if not watch.requested:
                watch.interrupt_python = True
                try:
                    export_path = tr.export()
                finally:
                    watch.interrupt_python = False
        except ExportInterrupted:
            pass
        if watch.requested:
            tr._summaries.close()
            self._stop(stop_exception(watch.signum, step, saved, complete=True, detail=how, **self._exit))
        if export_path and s.export.max_to_keep:
            tr._check_locks()
            export_lib.prune_versions(s.export.dir, s.export.max_to_keep)
        return export_path

    def _stop_if_requested(self, step: int) -> None:
        """Between phases of fit(): stop now if a signal came (one process only; several
        workers stop together inside the loop)."""
        tr = self.tr
        if tr.watch.requested and not tr.distribution.multi_worker:
            latest = tr.checkpointer.latest
            self._stop(
                stop_exception(tr.watch.signum, step, latest.path if latest else None, trained=False, **self._exit)
            )

    def _stop(self, stop: Preempted | Interrupted) -> None:
        """Say why the run stops, hand the signal to the handler installed before, raise."""
        tr = self.tr
        if tr.is_chief and "checkpointer" in vars(tr):
            tr.checkpointer.persist_newest()  # a requeue elsewhere resumes from the step reached
        log.warning("%s", stop)
        tr.watch.chain()
        if isinstance(stop, Preempted) and stop.signum == signal.SIGINT:
            tr.watch.exiting_on_sigint = True  # the process ends: a 2nd Ctrl-C exits quietly
        raise stop

    @property
    def _exit(self) -> dict[str, int]:
        tr = self.tr
        return {"exit_code": tr.settings.trainer.exit_code_preempted}
