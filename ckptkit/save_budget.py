"""``checkpoint.save_every_seconds=auto``: save as often as an overhead budget allows.

The user names a budget (``checkpoint.max_overhead``, a fraction of training time; 0.02 when
unset) instead of a period. Like CheckFreq (Mohan et al., FAST '21), the cost of a save is
measured online, on this run, and the period follows from it:

    period = cost of one save / max_overhead

What one save costs the training loop is measured in the training thread:

- the time the save call itself blocks training (the finite check, the window read, the
  data position's snapshot and the copy of the variables); and
- the slowdown of the loop calls that run while the background writer works: those calls'
  time beyond their steps at the step time measured while no writer ran (summed with its sign,
  so that the machine's noise averages out instead of adding up; a save's total is never
  below zero).

The step time is the mean of the recent calls without a writer (the first call of a launch,
which traces the loop, is left out): a mean, as the slowdown it is compared with is a sum.
The cost is the median of the last 9 saves: one slow disk write does not move the period, and
a heavier model, a slower disk or a busier machine moves it within 5 saves. A save is never
started while the previous one is still being written (one in flight), so the period is also
at least the time a save takes to reach the disk.

Every save counts (the periodic ones of other rules, a new best, a signal's): when another
rule saves more often than the budget allows, auto adds no saves of its own and the measured
overhead shows it. The first save of a launch is due as soon as the step time is known: its
cost is not, and a save early in a launch is cheap insurance.

This module only measures and decides; the controller calls it (``ckptkit.controller``).
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from dataclasses import dataclass

log = logging.getLogger("ckptkit")

#: The value of ``checkpoint.save_every_seconds`` that turns this on.
AUTO = "auto"
#: The budget when ``save_every_seconds=auto`` names none.
DEFAULT_MAX_OVERHEAD = 0.02
#: How many recent loop calls (without a writer) give the step time.
STEP_WINDOW = 16
#: How many recent saves give the cost and the write time. A lasting change moves the median
#: within half of them; a shorter window lets the noise of single saves jitter the period,
#: and a jittering period loses more work per kill than a steady one of the same mean.
SAVE_WINDOW = 9
#: The writer is idle between two saves for at least this fraction of a write.
WRITE_MARGIN = 0.25
#: A new period is logged when it moved by more than this factor since the last one logged.
LOG_CHANGE = 1.5


@dataclass
class _Save:
    """A save being measured: its blocking part, then the slowdown while it is written."""

    step: int
    blocking: float
    excess: float = 0.0  # the calls' time beyond the quiet pace while written, with its sign

    @property
    def slowdown(self) -> float:
        return max(0.0, self.excess)

    @property
    def cost(self) -> float:
        return self.blocking + self.slowdown


class SaveBudget:
    """Measures the loop's step time and each save's cost; says when the next save is due."""

    def __init__(self, max_overhead: float):
        self.max_overhead = float(max_overhead)
        self._step_times: deque[float] = deque(maxlen=STEP_WINDOW)
        self._costs: deque[float] = deque(maxlen=SAVE_WINDOW)
        self._writes: deque[float] = deque(maxlen=SAVE_WINDOW)
        self._writing: list[_Save] = []  # started, not yet complete on disk
        self._calls = 0
        self.train_seconds = 0.0  # the loop's time: calls and the saves' blocking parts
        self.cost_seconds = 0.0  # the part of it that the saves cost
        self.saves = 0
        self._logged_period: float | None = None
        self._warned = False

    # --- what the controller reports -----------------------------------------------------

    def call_done(self, steps: int, seconds: float) -> None:
        """A loop call ran ``steps`` steps in ``seconds``."""
        self._calls += 1
        self.train_seconds += seconds
        if steps <= 0:
            return
        if self._writing:
            base = self.step_seconds
            if base is not None:  # its time beyond the steps at the quiet pace
                self._writing[-1].excess += seconds - steps * base
        elif self._calls > 1:  # the first call traces the loop
            self._step_times.append(seconds / steps)

    def save_started(self, step: int, blocking: float) -> None:
        """A save of ``step`` blocked the loop for ``blocking`` seconds; it is now written."""
        self._writing.append(_Save(step, blocking))
        self.train_seconds += blocking
        self.cost_seconds += blocking
        self.saves += 1

    def save_written(self, step: int, write_seconds: float | None) -> None:
        """The save of ``step`` is complete on disk, ``write_seconds`` after it started."""
        for i, s in enumerate(self._writing):
            if s.step == step:
                done = self._writing.pop(i)
                self._costs.append(done.cost)
                self.cost_seconds += done.slowdown
                if write_seconds:
                    self._writes.append(write_seconds)
                self._report(done)
                return

    def _report(self, done: _Save) -> None:
        """Log the period when it is first known or has moved; warn once when the saves cost
        more than the budget (other rules saving more often than it allows)."""
        period, overhead = self.period, self.overhead
        if period is None:
            return
        last = self._logged_period
        if last is None or not last / LOG_CHANGE <= period <= last * LOG_CHANGE:
            self._logged_period = period
            log.info(
                "auto saves: every %.1fs (a save costs the loop %.3fs, the median of the last %d: this one "
                "%.3fs blocked and %.3fs of slower steps while written; budget %g%%)",
                period,
                statistics.median(self._costs),
                len(self._costs),
                done.blocking,
                done.slowdown,
                100 * self.max_overhead,
            )
        if overhead is not None and self.saves >= SAVE_WINDOW and overhead > 1.5 * self.max_overhead:
            if not self._warned:
                self._warned = True
                log.warning(
                    "saves cost %.1f%% of training time, over checkpoint.max_overhead=%g: other save rules "
                    "(checkpoint.save_every_steps, save_at_steps, best) save more often than the budget allows; "
                    "set checkpoint.save_every_steps=null to let auto choose",
                    100 * overhead,
                    self.max_overhead,
                )

    def scalars(self) -> dict[str, float]:
        """For TensorBoard, next to each save's timings."""
        out = {}
        if self.period is not None:
            out["checkpoint/auto_period_seconds"] = self.period
        if self.overhead is not None:
            out["checkpoint/overhead"] = self.overhead
        return out

    def summary(self) -> str | None:
        """One line for the end of a launch."""
        overhead = self.overhead
        if overhead is None:
            return None
        period = self.period
        return (
            f"auto saves: {self.saves} saves cost {100 * overhead:.2f}% of training time "
            f"(budget {100 * self.max_overhead:.1f}%)"
            + ("" if period is None else f"; the period was {period:.1f}s at the end")
        )

    # --- what it decides -------------------------------------------------------------------

    @property
    def step_seconds(self) -> float | None:
        return statistics.fmean(self._step_times) if self._step_times else None

    @property
    def period(self) -> float | None:
        """Seconds between saves that keep their measured cost within the budget (None until a
        save has been measured)."""
        if not self._costs:
            return None
        period = statistics.median(self._costs) / self.max_overhead
        if self._writes:
            period = max(period, (1 + WRITE_MARGIN) * statistics.median(self._writes))
        return period

    @property
    def overhead(self) -> float | None:
        """The measured cost of the saves so far, as a fraction of training without them."""
        quiet = self.train_seconds - self.cost_seconds
        return self.cost_seconds / quiet if quiet > 0 and self.saves else None

    @property
    def in_flight(self) -> bool:
        return bool(self._writing)

    def due(self, now: float, last_save_time: float) -> bool:
        """An auto save is due ``now`` (within half a step); never while a save is still
        being written."""
        base = self.step_seconds
        if self._writing or base is None:
            return False
        period = self.period
        return period is None or now - last_save_time + base / 2 >= period

    def steps_until_due(self, now: float, last_save_time: float) -> int | None:
        """How many steps from now the next auto save falls due (at least 1), so the loop
        call can stop there; None when unknown (no step time yet, or a save in flight)."""
        base, period = self.step_seconds, self.period
        if base is None or period is None or self._writing or base <= 0:
            return None
        return max(1, math.ceil((last_save_time + period - now) / base))


@dataclass(frozen=True)
class SaveWithinBudget:
    """The save policy of ``save_every_seconds=auto`` (see :class:`SaveBudget`). ``decides``:
    this process measures and decides (the chief; the other workers follow its decision,
    which the controller spreads to all of them)."""

    budget: SaveBudget
    decides: bool = True

    def should_save(self, ctx) -> bool:
        if not self.decides or ctx.last_save_time is None or ctx.step == ctx.last_save_step:
            return False
        return self.budget.due(ctx.now, ctx.last_save_time)
