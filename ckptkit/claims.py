"""The run's claims on its directories while ``fit()`` runs (the chief's alone).

:class:`RunClaims` holds the run lock of the run directory and, for a ``checkpoint.dir``
outside it, of that directory too (:mod:`ckptkit.runlock`); :meth:`RunClaims.check` is the
fence every commit point calls. :func:`refuse_if_sweep_stopping` keeps a job that a stopping
sweep's launcher starts from training (:mod:`ckptkit.hydra_callbacks`).
"""

from __future__ import annotations

import logging
import os

from ckptkit import checkpoint_files, storage
from ckptkit.errors import CheckpointSaveError
from ckptkit.preemption import SweepStopping
from ckptkit.runlock import RunLock

log = logging.getLogger("ckptkit")


class RunClaims:
    """The locks this launch holds, newest last."""

    def __init__(self, lease_seconds: float):
        self.lease_seconds = lease_seconds
        self.locks: list[RunLock] = []

    def take(self, run_dir: str, checkpoint_dir: str, local_tier: str | None = None) -> None:
        """Lock the run directory, and ``checkpoint_dir`` and the local tier's directory
        where they lie outside it."""
        try:
            self.locks.append(RunLock(run_dir, lease_seconds=self.lease_seconds).acquire())
        except OSError as exc:  # read-only, not a directory, no permission, full
            if storage.disk_full(exc):
                raise CheckpointSaveError(checkpoint_files.full_disk(run_dir, None)) from exc
            raise CheckpointSaveError(f"cannot write to the run directory {run_dir}: {exc}") from exc
        self.take_checkpoint_dir(run_dir, checkpoint_dir)
        if local_tier:
            self.take_checkpoint_dir(run_dir, local_tier, "checkpoint.local_dir")

    def take_checkpoint_dir(self, run_dir: str, checkpoint_dir: str, key: str = "checkpoint.dir") -> None:
        """A ``checkpoint.dir`` outside the run directory gets the one-writer lock too: two
        runs racing onto one fresh checkpoint directory cannot both claim it."""
        if not storage.is_local(checkpoint_dir) or not storage.is_local(run_dir):
            return
        inside = os.path.commonpath([os.path.abspath(checkpoint_dir), os.path.abspath(run_dir)])
        if inside == os.path.abspath(run_dir):
            return
        try:
            self.locks.append(RunLock(checkpoint_dir, lease_seconds=self.lease_seconds).acquire())
        except OSError as exc:
            raise CheckpointSaveError(f"cannot write to {key} {checkpoint_dir}: {exc}") from exc

    def let_go_of(self, directory: str) -> None:
        """Release the lock of ``directory`` before it moves aside (its records move with it)."""
        for lock in [lk for lk in self.locks if lk.run_dir == directory]:
            lock.release()
            self.locks.remove(lock)

    def check(self, quick: bool = False) -> None:
        """Raise :class:`~ckptkit.RunTakenOverError` once another launch took a directory over
        (the commit points call it; ``quick``: only what the locks' beats already found)."""
        for lock in self.locks:
            if quick:
                if lock.fenced is not None:
                    raise lock.fenced
            else:
                lock.check()

    def release(self) -> None:
        for lock in reversed(self.locks):
            lock.release()
        self.locks = []


def refuse_if_sweep_stopping(exit_code: int) -> None:
    """Raise :class:`~ckptkit.preemption.SweepStopping` when this process is a job of a Hydra
    sweep that was told to stop (a queued job handed to a freed worker): it trains nothing."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        from hydra.utils import to_absolute_path

        if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
            return
        sweep_dir = to_absolute_path(str(HydraConfig.get().sweep.dir))
    except Exception:  # noqa: BLE001 - not under Hydra, or no sweep directory
        return
    from ckptkit.hydra_callbacks import sweep_stopping

    notice = sweep_stopping(sweep_dir)
    if notice is not None:
        stop = SweepStopping(
            exit_code,
            f"the sweep in {sweep_dir} is stopping ({notice}): this job did not start; run the "
            "same command again to continue the sweep",
        )
        log.warning("%s", stop)
        raise stop
