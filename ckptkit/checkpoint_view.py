"""What a :class:`~ckptkit.Checkpointer` knows is on disk, over its one or two tiers:
``checkpoint.dir``'s book and, with a local tier, the local one's (:mod:`ckptkit.local_tier`).
A step in both tiers counts once, as its persistent copy; a resume tries its local copy first.
"""

from __future__ import annotations

from ckptkit import local_tier
from ckptkit.checkpoint_book import CheckpointBook
from ckptkit.policies import CheckpointInfo, metric_value, rank_best


class CheckpointView:
    """The queries of a Checkpointer (a mixin: it sets the attributes annotated here)."""

    directory: str
    book: CheckpointBook
    local: local_tier.LocalTier | None
    best_metric: str | None
    best_mode: str
    worker_dir: str | None
    _pending: CheckpointInfo | None

    def _fence(self) -> None: ...

    @property
    def checkpoints(self) -> list[CheckpointInfo]:
        """The recorded checkpoints, oldest first (an async save counts once written); with a
        local tier, those of both tiers (a step in both: its persistent copy)."""
        if self.local is None:
            return self.book.all()
        merged = {c.step: c for c in self.local.book.all()}
        merged.update((c.step, c) for c in self.book.all())
        return [merged[s] for s in sorted(merged)]

    @property
    def latest(self) -> CheckpointInfo | None:
        ckpts = self.checkpoints
        return ckpts[-1] if ckpts else None

    @property
    def best(self) -> CheckpointInfo | None:
        """The best checkpoint by ``best_metric`` (None without a metric or a finite value)."""
        if self.local is None or not self.best_metric:
            return self.book.best
        ranked = rank_best(self.checkpoints, self.best_metric, self.best_mode)
        return ranked[0] if ranked else None

    def resume_candidates(self) -> list[CheckpointInfo]:
        """What a resume tries, newest first; a step in both tiers: its local copy first."""
        books = [self.book] if self.local is None else [self.local.book, self.book]
        out = []
        for c in reversed(self.checkpoints):
            out += [info for book in books if (info := book.get(c.step)) is not None]
        return out

    def _recorded(self, step: int) -> CheckpointInfo | None:
        """The checkpoint of ``step`` in either tier (the persistent one first)."""
        found = self.book.get(step)
        if found is None and self.local is not None:
            found = self.local.book.get(step)
        return found

    def open_local_tier(self, *, discard: bool = False) -> str | None:
        """Judge, adopt or clear the local tier and record this launch in both tiers (see
        :mod:`ckptkit.local_tier`); the Trainer calls it before resuming, a save or restore
        otherwise does. Returns the verdict (None without a local tier)."""
        if self.local is None:
            if not self.worker_dir:
                local_tier.end_lineage(self.directory, self._fence)
            return None
        return self.local.open(discard=discard)

    @property
    def retention(self):
        return self.book.retention

    @property
    def best_keep(self) -> int:
        return self.book.best_keep

    def _forget_existing(self) -> None:
        """A worker's view when the chief starts over (``checkpoint.resume=never``)."""
        self.book.clear()

    def best_value(self) -> float | None:
        best = self.best
        return None if best is None or not self.best_metric else metric_value(best, self.best_metric)

    def find(self, step: int) -> CheckpointInfo | None:
        """The checkpoint of ``step``: recorded, or the save of it still in flight."""
        found = self._recorded(step)
        pending = self._pending
        return found or (pending if pending is not None and pending.step == step else None)
