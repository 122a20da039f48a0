"""The outer loop: a short loop over small actions (orbit's ``Controller`` draws the same line:
the loop and its periodic actions here, the steps in the user's ``train_step``).

Each call of the compiled train loop runs ``trainer.steps_per_loop`` steps, cut short at the
next step where an action is due (:func:`next_boundary`). After each call, in this order:

========================  ==========================================================
action                    due (its rule, a pure function below)
========================  ==========================================================
evaluate                  every ``trainer.eval_every_steps`` and at the last step
track the best            after an evaluation: a better, finite ``checkpoint.best.metric``
save                      the save policy (``policies.py``: steps, seconds, new best,
                          the end, a stop), agreed on by every worker
check train metrics       at every log line and save: every step since the last log line
                          added its metrics to an on-device window (``loop.TrainWindow``);
                          a non-finite step stops the run before anything more is saved
                          (``trainer.on_nonfinite=stop``) or is reported (``warn``)
write summaries and log   every ``trainer.log_every_steps`` and at the last step: the
                          means over the window's finite steps
report progress           every call while the bar is on
export on a new best      after a save on a new best, with ``export.on_best``
========================  ==========================================================

Before each call the loop checks for a stop: a signal (one process), fewer steps than asked
(several workers: another worker's signal), or the run lock taken over (the fence). Where
"when we save" changes: :func:`save_policy` and ``policies.py``; "what happens on SIGTERM":
``preemption.py`` sets the flag the compiled loop reads, this loop stops and saves, and
``launch.py`` exits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf

from ckptkit import export as export_lib
from ckptkit import loop as loop_lib
from ckptkit.errors import CheckpointSaveError, ConfigError, DataPipelineError, HookError, NonFiniteError
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
from ckptkit.save_budget import AUTO, SaveBudget, SaveWithinBudget

log = logging.getLogger("ckptkit")


def fmt(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))


# --- the rules: when each action is due -------------------------------------------------


def next_boundary(step: int, trainer_cfg: Any, checkpoint_cfg: Any) -> int:
    """The step at which the loop call starting at ``step`` must stop for an action."""
    t, c = trainer_cfg, checkpoint_cfg
    target = min(t.max_steps, step + t.steps_per_loop)
    for period in (t.log_every_steps, t.eval_every_steps, c.save_every_steps):
        if period:
            target = min(target, (step // period + 1) * period)
    later = [int(s) for s in c.save_at_steps if int(s) > step]
    return min([target] + later)


def eval_due(step: int, final: bool, every: int | None, has_eval: bool) -> bool:
    return has_eval and (bool(every and step % every == 0) or final)


def log_due(step: int, final: bool, every: int) -> bool:
    return step % every == 0 or final


def window_read_due(logging_now: bool, saving_now: bool) -> bool:
    """The train window (means, non-finite steps) leaves the device at a log line and before
    a save, the same steps on every worker (so all of them stop together); between them the
    loop reads nothing back (a read after every call costs a small model ~10% at
    steps_per_loop=1). The window holds every step, so none is missed."""
    return logging_now or saving_now


def export_on_best_due(new_best: bool, step_eval: Mapping | None, export_cfg: Any, preempted: bool, chief: bool):
    return bool(new_best and step_eval and export_cfg.enabled and export_cfg.on_best and not preempted and chief)


def persist_due(ctx: SaveContext, checkpoint_cfg: Any) -> bool:
    """With a local tier: a save that must reach ``checkpoint.dir`` whatever the persist
    period (a new best, the last step, a signal's, one of ``save_at_steps``); the others are
    the local tier's to decide (``checkpoint.persist_every_*``)."""
    return ctx.new_best or ctx.final or ctx.preempted or ctx.step in set(checkpoint_cfg.save_at_steps)


def save_policy(c: Any, budget: SaveBudget | None = None, decides: bool = True) -> AnySave:
    """``checkpoint.*``'s save rules as one policy (``budget``: ``save_every_seconds=auto``'s
    measurements; ``decides``: this process makes its decisions, the chief)."""
    policies: list[SavePolicy] = [SaveOnNewBest(), SaveAtEnd(), SaveOnPreemption()]
    if c.save_every_steps:
        policies.append(SaveEveryNSteps(c.save_every_steps))
    if budget is not None:
        policies.append(SaveWithinBudget(budget, decides))
    elif c.save_every_seconds:
        policies.append(SaveEveryNSeconds(c.save_every_seconds))
    if c.save_at_steps:
        policies.append(SaveAtSteps(frozenset(int(s) for s in c.save_at_steps)))
    return AnySave(tuple(policies))


# --- the loop ------------------------------------------------------------------------------


@dataclass
class LoopState:
    step: int
    start_step: int
    last_save_step: int | None
    last_save_time: float
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    log_start: float = field(default_factory=time.time)
    log_start_step: int = 0
    unsaved_seconds: float = 0.0  # training time not yet added to train_state (done before saves)


class Controller:
    """Runs the outer loop of one launch for ``trainer`` (built, restored, accepted)."""

    def __init__(self, trainer: Any):
        self.tr = trainer
        self.s = trainer.settings
        c = self.s.checkpoint
        #: ``save_every_seconds=auto``: the measured step time and cost of each save.
        self.budget = SaveBudget(c.max_overhead) if c.save_every_seconds == AUTO else None
        self.policy = save_policy(c, self.budget, decides=trainer.is_chief)
        self._eval_fn: Any = None
        self._position_reported = False  # the data position's size, logged at the first save
        self._bad_reported: tuple[int, int] | None = None  # (first, count) of non-finite steps warned of
        self._copying: dict[int, float] = {}  # with a local tier: saves whose copy auto waits for (write s)

    # --- the actions -------------------------------------------------------------------

    def prepare_eval(self, eval_ds) -> None:
        """Before the first step, not after training: ``eval_step`` is overridden and returns
        scalar metrics, the eval data is not empty, and ``checkpoint.best.metric`` is one of
        the metrics (its function is traced here, once)."""
        tr, best = self.tr, self.s.checkpoint.best.metric
        if eval_ds is None:
            return
        from ckptkit.trainer import Trainer

        if type(tr).eval_step is Trainer.eval_step:
            raise HookError(f"{type(tr).__name__} has an eval_dataset() but does not override eval_step()")
        if next(iter(eval_ds.take(1)), None) is None:
            raise DataPipelineError(
                "eval_dataset() yielded no batch: it is empty (check the data path, filters and batch size)"
            )
        check = loop_lib.HookCheck()
        dist = tr.distribution
        self._eval_fn = loop_lib.make_eval_step(tr.eval_step, dist if dist.distributed else None, check)
        concrete = self._eval_fn.get_concrete_function(eval_ds.element_spec)
        check.raise_if_any()
        names = sorted(concrete.structured_outputs[0])
        if best and best not in names:
            raise ConfigError(
                "checkpoint.best.metric", f"{best!r} is not among the metrics eval_step() returns ({', '.join(names)})"
            )

    def evaluate(self, eval_ds, step: int) -> dict[str, float]:
        tr = self.tr
        if self._eval_fn is None:
            dist = tr.distribution
            self._eval_fn = loop_lib.make_eval_step(tr.eval_step, dist if dist.distributed else None)
        metrics = loop_lib.run_eval(self._eval_fn, eval_ds)
        tr._summaries.scalars("eval", step, metrics)
        log.info("eval at step %d: %s", step, fmt(metrics))
        return metrics

    def track_best(self, step: int, step_eval: dict[str, float] | None) -> bool:
        """Record a new best value of ``checkpoint.best.metric``; True when there is one."""
        metric, mode = self.s.checkpoint.best.metric, self.s.checkpoint.best.mode
        if step_eval is None or not metric:
            return False
        if metric not in step_eval:
            raise ConfigError(
                "checkpoint.best.metric", f"{metric!r} is not among the eval metrics ({', '.join(sorted(step_eval))})"
            )
        value = step_eval[metric]
        state = self.tr.train_state
        best_value, _ = state.best()
        if not np.isfinite(value) or not is_better(value, best_value, mode):
            return False
        log.info(
            "new best %s=%.6g at step %d (was %s)",
            metric,
            value,
            step,
            "none" if best_value is None else f"{best_value:.6g}",
        )
        state.set_best(value, step)
        self.tr._progress.best(metric, value, step)
        return True

    def save(self, step: int, metrics: Mapping[str, float] | None, persist: bool = False) -> str:
        """Save ``step``, unless a model or optimizer variable is NaN or infinite: a loss
        computed before the update can be finite while the update poisoned the weights, and
        a poisoned checkpoint would be resumed from for ever. ``persist``: with a local tier,
        this save also goes to ``checkpoint.dir`` (:func:`persist_due`)."""
        tr = self.tr
        self.check_window(step)
        bad = tr._finite()
        if bad:
            raise NonFiniteError(
                f"non-finite values at step {step} in {len(bad)} variable(s): "
                f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; nothing was saved at step "
                f"{step}. {self.last_good()}"
            )
        new = tr.checkpointer.find(step) is None
        began = time.perf_counter()
        path = tr.checkpointer.save(step, metrics=metrics, persist=persist or None)
        if self.budget is not None and new:
            self.budget.save_started(step, time.perf_counter() - began)
            if not tr.checkpointer.async_save or tr.checkpointer.worker_dir:
                self.budget.save_written(step, None)  # written already (a worker's is not recorded)
        if not self._position_reported:
            self._position_reported = True
            size = tr.checkpointer.data_position_bytes()
            if size is not None:
                log.info("data position: %.1f kB in each checkpoint", size / 1e3)
        return path

    def check_window(self, step: int, reset: bool = False) -> loop_lib.Window:
        """Read the train steps since the last log line (``reset``: and start the next window,
        at a log line); one whose metrics were not finite stops the run
        (``trainer.on_nonfinite=stop``), else is reported once (``warn``)."""
        w = self.tr._train_window.read(reset)
        if not w.bad_steps or self._bad_reported == (w.first_bad, w.bad_steps):
            return w
        where = f"step {w.first_bad}" + (
            f" and {w.bad_steps - 1} more step(s) up to step {step}" if w.bad_steps > 1 else ""
        )
        if self.s.trainer.on_nonfinite == "stop":
            raise NonFiniteError(
                f"non-finite train metrics (a NaN or infinite loss) at {where}; nothing was saved "
                f"after it. {self.last_good()} If train_step skips such batches, set trainer.on_nonfinite=warn."
            )
        self._bad_reported = (w.first_bad, w.bad_steps)
        log.warning(
            "non-finite train metrics at %s; continuing (trainer.on_nonfinite=warn): they are left out of "
            "the logged means, and a save still requires every weight to be finite",
            where,
        )
        return w

    def last_good(self) -> str:
        """Which checkpoint the run resumes from, once the save in flight is on disk."""
        ckpt = self.tr.checkpointer
        try:
            ckpt.wait()
        except CheckpointSaveError as exc:
            log.error("%s", exc)
        latest = ckpt.latest
        return (
            f"The last good checkpoint is {latest.path} (step {latest.step}): the next launch resumes from it."
            if latest
            else "No checkpoint was saved before it."
        )

    def log_completed_saves(self) -> None:
        """The saves and copies completed since the last call: to TensorBoard, the progress
        bar and ``save_every_seconds=auto``'s measurements. With a local tier, a save that is
        copied to ``checkpoint.dir`` costs the loop until its copy is recorded: auto counts
        the slowdown of the calls during the copy too, and starts no save before it is done."""
        tr = self.tr
        local = tr.checkpointer.local
        for info in tr.checkpointer.drain_completed():
            if self.budget is not None:
                if local is not None and local.copying(info.step):
                    self._copying[info.step] = info.save_seconds or 0.0
                else:
                    self.budget.save_written(info.step, info.save_seconds)
            tr._summaries.scalars(
                "checkpoint",
                info.step,
                {  # one "checkpoint" section of cards
                    "checkpoint/save_seconds": info.save_seconds or 0.0,
                    "checkpoint/blocking_seconds": info.blocking_seconds or 0.0,
                    "checkpoint/size_mb": (info.size or 0) / 2**20,
                    **(self.budget.scalars() if self.budget is not None else {}),
                },
            )
            tr._progress.saved(info.step)
        for step, seconds in local.drain_copied() if local is not None else []:
            written = self._copying.pop(step, None)
            if self.budget is not None and written is not None:
                self.budget.save_written(step, written + seconds)
            tr._summaries.scalars("checkpoint", step, {"checkpoint/copy_seconds": seconds})

    def export_new_best(self, step: int, path: str, metrics: Mapping[str, float]) -> None:
        tr, e = self.tr, self.s.export
        info = tr.checkpointer.find(step) or CheckpointInfo(
            step=step, path=path, time=time.time(), metrics=dict(metrics)
        )
        tr.export(source=info)
        if e.max_to_keep:
            tr._check_locks()
            export_lib.prune_versions(e.dir, e.max_to_keep)

    # --- the loop ----------------------------------------------------------------------

    def run(self, eval_ds, step: int) -> tuple[int, dict[str, float], dict[str, float]]:
        """Train from ``step`` to ``trainer.max_steps`` or a stop; returns (step, last train
        metrics, last eval metrics)."""
        tr = self.tr
        latest = tr.checkpointer.latest
        st = LoopState(step, step, latest.step if latest else None, tr.clock(), log_start_step=step)
        # With several workers every decision to stop or save must be the same on all of
        # them (each save and each step is a collective): the loop combines the workers'
        # stop flags, and each save decision is agreed on. A worker only learns that another
        # was preempted from a loop that ran fewer steps than asked.
        coordinated = tr.distribution.multi_worker
        tr._stopped = False
        while st.step < self.s.trainer.max_steps and not tr._stopped and (coordinated or not tr.watch.requested):
            tr._check_locks(quick=True)
            out = self._call(st, coordinated)
            if out is None:
                break  # stopped before its first step; saved below if unsaved
            self._after_call(st, out, eval_ds, coordinated)
        summary = self.budget.summary() if self.budget is not None else None
        if summary:  # the periodic saves' cost (the final save below is no rule's choice)
            log.info(summary)
        self._finish(st, eval_ds)
        return st.step, st.train_metrics, st.eval_metrics

    def _call(self, st: LoopState, coordinated: bool) -> Any:
        """One call of the compiled loop up to the next boundary; advances ``st.step``."""
        tr = self.tr
        n = next_boundary(st.step, self.s.trainer, self.s.checkpoint) - st.step
        if self.budget is not None and not coordinated:  # stop the call where the save falls due
            n = min(n, self.budget.steps_until_due(tr.clock(), st.last_save_time) or n)
        began, step_before = time.time(), st.step
        try:
            out = tr._train_fn(n)
        except tf.errors.OutOfRangeError as exc:
            raise DataPipelineError(
                "train_dataset() yielded no batch"
                + (f" after step {st.step}" if st.step > st.start_step else "")
                + ": it is empty (check the data path, filters and batch size)"
            ) from exc
        st.unsaved_seconds += time.time() - began
        if coordinated:
            reached = int(tr.global_step.numpy())
            tr._stopped = reached < st.step + n  # identical on every worker
            if reached == st.step:
                return None
            st.step = reached
        elif tr.watch.requested:
            st.step = int(tr.global_step.numpy())
            tr._stopped = True
        else:
            st.step += n
        if self.budget is not None:
            self.budget.call_done(st.step - step_before, time.time() - began)
        return out

    def _after_call(self, st: LoopState, out: Any, eval_ds, coordinated: bool) -> None:
        tr, t = self.tr, self.s.trainer
        step = st.step
        final = step >= t.max_steps
        logging_now = log_due(step, final, t.log_every_steps)
        step_eval = None
        if eval_due(step, final, t.eval_every_steps, eval_ds is not None):
            step_eval = st.eval_metrics = self.evaluate(eval_ds, step)
        new_best = self.track_best(step, step_eval)
        ctx = SaveContext(
            step=step,
            now=tr.clock(),
            last_save_step=st.last_save_step,
            last_save_time=st.last_save_time,
            new_best=new_best,
            final=final,
            preempted=tr._stopped,
        )
        saving_now = self.policy.should_save(ctx)
        if coordinated:
            saving_now = tr.distribution.agree(saving_now)
        window = self.check_window(step, reset=logging_now) if window_read_due(logging_now, saving_now) else None
        if tr._progress.enabled:  # the bar shows this call's means
            rate = (step - st.log_start_step) / max(time.time() - st.log_start, 1e-9)
            tr._progress.update(step, loop_lib.to_python(out), rate)
        self.log_completed_saves()
        if logging_now and window is not None:
            self.log_window(st, window)
        if saving_now:
            tr.train_state.add_time(st.unsaved_seconds)
            st.unsaved_seconds = 0.0
            path = self.save(step, step_eval, persist=persist_due(ctx, self.s.checkpoint))
            st.last_save_step, st.last_save_time = step, ctx.now
            if export_on_best_due(new_best, step_eval, self.s.export, ctx.preempted, tr.is_chief):
                self.export_new_best(step, path, step_eval or {})

    def log_window(self, st: LoopState, w: loop_lib.Window) -> None:
        """One log line and the train summaries: the means since the last log line."""
        tr, step = self.tr, st.step
        rate = (step - st.log_start_step) / max(time.time() - st.log_start, 1e-9)
        st.train_metrics = w.means or st.train_metrics
        tr._summaries.scalars("train", step, {**w.means, "steps_per_sec": rate, "nonfinite_steps": w.bad_steps})
        log.info("step %d/%d  %s  (%.0f steps/s)", step, self.s.trainer.max_steps, fmt(w.means), rate)
        st.log_start, st.log_start_step = time.time(), step
        self._bad_reported = None

    def _finish(self, st: LoopState, eval_ds) -> None:
        """After the loop: save the step reached if it is not saved; ``max_steps=0`` saves the
        model as built (and warm-started) as step 0."""
        tr, s = self.tr, self.s
        tr.train_state.add_time(st.unsaved_seconds)
        if st.step > st.start_step and st.last_save_step != st.step:
            self.save(st.step, st.eval_metrics or None, persist=True)
        elif s.trainer.max_steps == 0 and tr.checkpointer.latest is None and not tr.watch.requested:
            st.eval_metrics = self.evaluate(eval_ds, 0) if eval_ds is not None else {}
            self.track_best(0, st.eval_metrics or None)
            self.save(0, st.eval_metrics or None, persist=True)
            log.info(
                "trainer.max_steps=0: nothing trained; the model as built%s is saved as step 0%s",
                " and warm-started from " + str(s.checkpoint.init_from.path) if s.checkpoint.init_from.path else "",
                ", to be exported" if s.export.enabled else "",
            )
