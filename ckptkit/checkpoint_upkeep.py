"""Keeping a :class:`~ckptkit.Checkpointer`'s directory sound: what interrupted saves left,
TensorFlow's state file, unreadable checkpoints moved aside, what a failed write means and
what the next checkpoint needs on disk (the file operations are in
:mod:`ckptkit.checkpoint_files`).
"""

from __future__ import annotations

import logging
from typing import Any

from ckptkit import checkpoint_files, local_tier, metadata
from ckptkit.checkpoint_book import CheckpointBook
from ckptkit.policies import CheckpointInfo

log = logging.getLogger("ckptkit")


class DirectoryUpkeep:
    """The upkeep of a Checkpointer's directory (a mixin: it sets the attributes annotated here)."""

    directory: str
    book: CheckpointBook
    local: local_tier.LocalTier | None
    worker_dir: str | None
    _pending: CheckpointInfo | None
    _iterators: list
    _trackables: dict[str, Any]
    latest: Any

    def _fence(self) -> None: ...

    def _write_bookkeeping(self) -> None: ...

    def data_position_bytes(self) -> int | None:
        """What the data position of the latest save takes in the checkpoint (bytes)."""
        frozen = [it._frozen.tensors for it in self._iterators if it._frozen.tensors is not None]
        if not frozen:
            return None
        from ckptkit.data_position import position_bytes

        return sum(position_bytes(t) for t in frozen)

    def _move_aside(self, paths: list[str]) -> str:
        return checkpoint_files.move_aside(self.directory, paths, self._fence)

    def _clear_the_way(self, step: int) -> None:
        checkpoint_files.clear_the_way(self.directory, step, self._fence)

    def remove_leftovers(self) -> list[str]:
        """Delete what saves interrupted by a crash left in the directory (see
        :func:`ckptkit.checkpoint_files.remove_leftovers`). Call it only while no other
        process saves here (the Trainer holds the run lock). Returns the paths removed."""
        if self.worker_dir or self._pending is not None:
            return []
        return checkpoint_files.remove_leftovers(self.directory, self._fence)

    def agree_state_file(self) -> bool:
        """Make TensorFlow's state file list the checkpoints recorded in ``directory`` (the
        chief, under the run lock, at the start of a launch; never a local tier's); see
        :func:`checkpoint_files.agree_state_file`."""
        if self.worker_dir or self._pending is not None:
            return False
        return checkpoint_files.agree_state_file(self.directory, self.book.all(), self._fence)

    def _failure(self, prefix: str, exc: object) -> str:
        local = self.local is not None and self.local.holds(prefix)
        directory = self.local.directory if self.local is not None and local else self.directory
        return checkpoint_files.failure(directory, prefix, exc, self.needed_bytes())

    def needed_bytes(self) -> int:
        """What the next checkpoint needs on disk, about: the latest one's size, else the estimate."""
        latest = self.latest
        return latest.size if latest and latest.size else self.estimated_size()

    def set_aside(self, info: CheckpointInfo, reason: str) -> str | None:
        """Take the unreadable checkpoint ``info`` out of the run: its files move to
        ``<directory>/unreadable/<time>/`` (the newest few sets kept), it stops counting as newest,
        latest or best, holds no retention slot, and its step is saved again for real when
        training reaches it. Returns where the files went (None on a worker, which only
        forgets it: the chief moves the files)."""
        if self.local is not None and self.local.holds(info.path):
            return self.local.set_aside(info, reason)
        self.book.forget(info.step)
        if self.worker_dir:
            return None
        into = self._move_aside(metadata.checkpoint_files(info.path))
        log.warning(
            "moved the unreadable checkpoint %s aside to %s (%s); step %d will be saved again when training reaches it",
            info.path,
            into,
            reason,
            info.step,
        )
        self._write_bookkeeping()
        return into

    def estimated_size(self) -> int:
        """Bytes one checkpoint needs, about: its variables (model, optimizer slots, the rest),
        its data position (known once a save has taken it) and 4 kB for the index and graph."""
        return checkpoint_files.variables_size(self._trackables) + (self.data_position_bytes() or 0) + 4096
