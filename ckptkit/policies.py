"""When to save and what to keep, as small pure policies.

A save policy answers ``should_save(ctx)`` from a :class:`SaveContext` (the step, the clock,
the last save, and outside facts such as a new best metric or the end of training). A
retention policy answers ``keep(checkpoints)`` with the steps it wants kept. Neither touches
disk or TensorFlow, so both are tested as tables. ``AnySave`` and ``KeepAny`` combine them:
a step is saved if any policy says so, a checkpoint is kept if any policy keeps it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class CheckpointInfo:
    """What is known of one checkpoint on disk."""

    step: int
    path: str
    time: float
    metrics: Mapping[str, float | None] | None = None  # None: not finite when saved
    size: int | None = None
    save_seconds: float | None = None  # from the start of the save to files complete
    blocking_seconds: float | None = None  # how long the save held up training
    uid: str | None = None  # random identity given at save time (an export names it)
    # object-graph path -> name of the listed Keras layers a checkpoint cannot name by
    # itself (see transfer.layer_names_record); empty for most models
    layer_names: Mapping[str, str] | None = None
    # what the checkpoint recorded of the training data (ckptkit.data_position.DataRecord)
    data: Mapping[str, Any] | None = None
    recorded_size: int | None = None  # the size metadata.json recorded at save time (size: on disk now)


@dataclass(frozen=True)
class SaveContext:
    """Everything a save policy may look at. ``last_save_time`` is the run's start time
    until the first save, so a wall-clock period counts from the start."""

    step: int
    now: float
    last_save_step: int | None = None
    last_save_time: float | None = None
    new_best: bool = False
    final: bool = False
    preempted: bool = False


class SavePolicy(Protocol):
    def should_save(self, ctx: SaveContext) -> bool: ...


class RetentionPolicy(Protocol):
    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> frozenset[int]: ...


# --- save policies -----------------------------------------------------------------------


@dataclass(frozen=True)
class SaveEveryNSteps:
    n: int

    def should_save(self, ctx: SaveContext) -> bool:
        return ctx.step > 0 and ctx.step % self.n == 0 and ctx.step != ctx.last_save_step


@dataclass(frozen=True)
class SaveEveryNSeconds:
    seconds: float

    def should_save(self, ctx: SaveContext) -> bool:
        if ctx.last_save_time is None or ctx.step == ctx.last_save_step:
            return False
        return ctx.now - ctx.last_save_time >= self.seconds


@dataclass(frozen=True)
class SaveAtSteps:
    steps: frozenset[int]

    def should_save(self, ctx: SaveContext) -> bool:
        return ctx.step in self.steps and ctx.step != ctx.last_save_step


@dataclass(frozen=True)
class SaveOnNewBest:
    def should_save(self, ctx: SaveContext) -> bool:
        return ctx.new_best


@dataclass(frozen=True)
class SaveOnPreemption:
    def should_save(self, ctx: SaveContext) -> bool:
        return ctx.preempted


@dataclass(frozen=True)
class SaveAtEnd:
    def should_save(self, ctx: SaveContext) -> bool:
        return ctx.final


@dataclass(frozen=True)
class AnySave:
    policies: tuple[SavePolicy, ...]

    def should_save(self, ctx: SaveContext) -> bool:
        return any(p.should_save(ctx) for p in self.policies)


# --- retention policies ------------------------------------------------------------------


def metric_value(info: CheckpointInfo, metric: str) -> float | None:
    """The checkpoint's value of ``metric``, or None when it is missing or not finite."""
    raw = info.metrics.get(metric) if info.metrics else None
    if raw is None:
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def is_better(value: float, reference: float | None, mode: str) -> bool:
    """Strictly better: a tie does not replace the earlier best.

    Values within a relative 1e-6 count as ties: the same accuracy summed over batches in a
    different order differs in the last bits, and must not count as an improvement.
    """
    if reference is None:
        return True
    if math.isclose(value, reference, rel_tol=1e-6, abs_tol=1e-12):
        return False
    return value < reference if mode == "min" else value > reference


def rank_best(checkpoints: Sequence[CheckpointInfo], metric: str, mode: str) -> list:
    """Checkpoints with a finite ``metric``, best first; ties go to the earlier step."""
    scored = [(v, c) for c in checkpoints if (v := metric_value(c, metric)) is not None]
    sign = 1.0 if mode == "min" else -1.0
    scored.sort(key=lambda vc: (sign * vc[0], vc[1].step))
    return [c for _, c in scored]


@dataclass(frozen=True)
class KeepNewest:
    n: int | None  # None keeps every checkpoint

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> frozenset[int]:
        steps = sorted(c.step for c in checkpoints)
        return frozenset(steps if self.n is None else steps[-self.n :])


@dataclass(frozen=True)
class KeepBest:
    metric: str
    mode: str = "min"
    k: int = 1

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> frozenset[int]:
        return frozenset(c.step for c in rank_best(checkpoints, self.metric, self.mode)[: self.k])


@dataclass(frozen=True)
class KeepEveryNHours:
    """Keep the first checkpoint, then each one at least ``hours`` after the last kept.

    Which ones are kept depends only on earlier kept checkpoints, so deleting the others
    never changes the answer: the rule is stable across restarts.
    """

    hours: float

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> frozenset[int]:
        kept, last = set(), None
        for c in sorted(checkpoints, key=lambda c: c.step):
            if last is None or c.time - last >= self.hours * 3600.0:
                kept.add(c.step)
                last = c.time
        return frozenset(kept)


@dataclass(frozen=True)
class KeepAny:
    policies: tuple[RetentionPolicy, ...]

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> frozenset[int]:
        kept: set = set()
        for p in self.policies:
            kept |= p.keep(checkpoints)
        return frozenset(kept)
