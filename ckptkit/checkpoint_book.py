"""The bookkeeping of a checkpoint directory, without any I/O: which checkpoints it holds,
which of them to keep, and which are best.

:class:`CheckpointBook` is what :class:`~ckptkit.Checkpointer` knows; the Checkpointer does
the writing, reading, fsyncing and moving, and asks the book what to write. Every method is
safe to call from the training thread and the background writer at once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

from ckptkit.policies import (
    CheckpointInfo,
    KeepAny,
    KeepBest,
    KeepEveryNHours,
    KeepNewest,
    RetentionPolicy,
    metric_value,
    rank_best,
)


@dataclass(frozen=True)
class Settlement:
    """What the directory should hold now: the checkpoints kept (oldest first), those to
    delete, and the steps of the best ones among the kept, best first."""

    kept: list[CheckpointInfo]
    dropped: list[CheckpointInfo]
    best: list[int]


class CheckpointBook:
    """Newest-N plus best-K (plus one per N hours) over the recorded checkpoints."""

    def __init__(
        self,
        *,
        max_to_keep: int | None = 3,
        best_metric: str | None = None,
        best_mode: str = "min",
        best_keep: int = 1,
        keep_every_n_hours: float | None = None,
        found: Iterable[CheckpointInfo] = (),
    ):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"`max_to_keep` ({max_to_keep}) must be a positive integer or None.")
        if best_mode not in ("min", "max"):
            raise ValueError(f"`best_mode` ({best_mode!r}) must be 'min' or 'max'.")
        if best_keep < 1:
            raise ValueError(f"`best_keep` ({best_keep}) must be a positive integer.")
        self.best_metric, self.best_mode, self.best_keep = best_metric, best_mode, best_keep
        policies: list[RetentionPolicy] = [KeepNewest(max_to_keep)]
        if best_metric:
            policies.append(KeepBest(best_metric, best_mode, best_keep))
        if keep_every_n_hours:
            policies.append(KeepEveryNHours(keep_every_n_hours))
        self.retention = KeepAny(tuple(policies))
        self._lock = threading.Lock()
        self._records: dict[int, CheckpointInfo] = {c.step: c for c in found}

    def all(self) -> list[CheckpointInfo]:
        """The recorded checkpoints, oldest first."""
        with self._lock:
            return sorted(self._records.values(), key=lambda c: c.step)

    @property
    def latest(self) -> CheckpointInfo | None:
        ckpts = self.all()
        return ckpts[-1] if ckpts else None

    @property
    def best(self) -> CheckpointInfo | None:
        """The best checkpoint by ``best_metric`` (None without a metric or a finite value)."""
        if not self.best_metric:
            return None
        ranked = rank_best(self.all(), self.best_metric, self.best_mode)
        return ranked[0] if ranked else None

    def best_value(self) -> float | None:
        b = self.best
        return None if b is None or not self.best_metric else metric_value(b, self.best_metric)

    def get(self, step: int) -> CheckpointInfo | None:
        with self._lock:
            return self._records.get(step)

    def add(self, info: CheckpointInfo) -> None:
        """Record ``info`` (replacing what was recorded for its step)."""
        with self._lock:
            self._records[info.step] = info

    def forget(self, step: int) -> None:
        with self._lock:
            self._records.pop(step, None)

    def clear(self) -> None:
        with self._lock:
            self._records.clear()

    def settle(self) -> Settlement:
        """What to keep and what to drop by the retention rules, and the best kept."""
        ckpts = self.all()
        kept_steps = self.retention.keep(ckpts)
        kept = [c for c in ckpts if c.step in kept_steps]
        dropped = [c for c in ckpts if c.step not in kept_steps]
        best = (
            [c.step for c in rank_best(kept, self.best_metric, self.best_mode)[: self.best_keep]]
            if self.best_metric
            else []
        )
        return Settlement(kept, dropped, best)
