"""Checkpointer: saves, keeps and restores the checkpoints of one directory.

It writes with ``tf.train.Checkpoint.write`` (TensorFlow's async checkpointing when
``async_save``: the variables are copied, training goes on, the files are written by
TensorFlow's background thread) and then, only once the data is completely written, does
its own bookkeeping in that order:

1. record the new checkpoint (step, time, duration, size, metrics);
2. rewrite ``metadata.json`` and TensorFlow's ``checkpoint`` state file to list exactly the
   checkpoints the retention policies keep;
3. delete the files of the checkpoints no policy keeps.

A crash between any two steps leaves every kept checkpoint on disk and listed, at worst a
checkpoint that should have been deleted, which the next save sweeps. Retention is ckptkit's
own rather than ``tf.train.CheckpointManager``'s: the manager's newest-N sweep cannot spare
the best checkpoints, and its state file would keep listing files deleted outside it.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping

import tensorflow as tf

from ckptkit import checkpoint_files, checkpoint_restore, checkpoint_worker, local_tier, metadata, transfer
from ckptkit._compat import (
    end_async_save_thread,
    mark_save_thread,
    own_executor_only,
    patch_keras_async_checkpoint,
    patch_keras_checkpoint_children,
)
from ckptkit.checkpoint_book import CheckpointBook
from ckptkit.checkpoint_upkeep import DirectoryUpkeep
from ckptkit.checkpoint_view import CheckpointView
from ckptkit.errors import (
    CheckpointSaveError,
    CkptkitError,
)
from ckptkit.iterator_state import IteratorCheckpoint, wrap_iterators
from ckptkit.policies import CheckpointInfo

log = logging.getLogger("ckptkit")


class Checkpointer(CheckpointView, DirectoryUpkeep):
    """Newest-N plus best-K checkpoints of some trackables in one directory.

    ``trackables`` are the objects to save (``model=...``, ``optimizer=...``), as for
    ``tf.train.Checkpoint``. Usable on its own in a hand-written loop::

        ckpt = Checkpointer("ckpts", max_to_keep=3, best_metric="loss", model=m, optimizer=o)
        start = ckpt.restore_latest() or 0
        ...
        ckpt.save(step, metrics={"loss": 0.3})
        ckpt.wait()
    """

    def __init__(
        self,
        directory: str,
        *,
        max_to_keep: int | None = 3,
        best_metric: str | None = None,
        best_mode: str = "min",
        best_keep: int = 1,
        keep_every_n_hours: float | None = None,
        async_save: bool = True,
        worker_dir: str | None = None,
        fence: Callable[[], None] | None = None,
        local_dir: str | None = None,
        local_max_to_keep: int = local_tier.DEFAULT_MAX_TO_KEEP,
        persist_every_seconds: float | None = local_tier.DEFAULT_PERSIST_EVERY_SECONDS,
        persist_every_saves: int | None = None,
        **trackables,
    ):
        book = CheckpointBook(  # checks the retention arguments before anything is touched
            max_to_keep=max_to_keep,
            best_metric=best_metric,
            best_mode=best_mode,
            best_keep=best_keep,
            keep_every_n_hours=keep_every_n_hours,
        )
        if not trackables:
            raise ValueError("Checkpointer needs at least one trackable, e.g. model=my_model.")
        self.directory = str(directory)
        # Called before every write and commit (a checkpoint's files, metadata, state file,
        # deletes and moves); raises to stop them. The Trainer passes its run lock's check.
        self.fence = fence
        # A non-chief worker of a multi-worker run takes part in every save (TensorFlow's
        # rule: all workers save) but writes into worker_dir, removed after each save; it
        # reads the chief's checkpoints in `directory` and writes nothing there.
        self.worker_dir = None if worker_dir is None else str(worker_dir)
        self._worker_saved: set = set()
        if local_dir and worker_dir:
            raise ValueError("a local tier (local_dir) is the chief's alone: a worker writes into worker_dir")
        # A local tier (local_dir): saves go there, some are copied here (ckptkit.local_tier).
        self.local = local_tier.below(
            local_dir,
            self.directory,
            max_to_keep=local_max_to_keep,
            persist_every_seconds=persist_every_seconds,
            persist_every_saves=persist_every_saves,
            fence=self._fence,
        )
        self._persist_wanted: set[int] = set()  # steps in flight whose files go to `directory` too
        if self.worker_dir:
            checkpoint_worker.prepare_worker_dir(self, self.worker_dir)
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.async_save = async_save
        self._checkpoint = self._track(trackables)
        self._layer_names_record: dict[str, str] | None = None
        #: What each save records of the training data (the Trainer's DataRecord, as JSON).
        self.data_record: dict | None = None
        #: Asked before a restore with the checkpoint's info: restore its data position too
        #: (True), start the data position afresh (False), or raise. None: always restore it.
        self.data_check: Callable[[CheckpointInfo], bool] | None = None
        self._lock = threading.Lock()  # one bookkeeping write at a time; the completed list
        self.book = book
        for c in metadata.scan(self.directory):
            book.add(c)
        checkpoint_files.check_state_file(self.directory)
        self._pending: CheckpointInfo | None = None  # written in the background, not yet recorded
        self._completed: list[CheckpointInfo] = []  # saves recorded since drain_completed()
        self._background_error: BaseException | None = None

    def _track(self, trackables: dict) -> tf.train.Checkpoint:
        """The ``tf.train.Checkpoint`` of ``trackables`` (a data iterator is saved through
        :class:`~ckptkit.iterator_state.IteratorCheckpoint`)."""
        patch_keras_checkpoint_children()
        if self.async_save:
            patch_keras_async_checkpoint()
        trackables = wrap_iterators(trackables)
        self._iterators = [t for t in trackables.values() if isinstance(t, IteratorCheckpoint)]
        self._trackables = dict(trackables)
        checkpoint = tf.train.Checkpoint(**trackables)
        # TensorFlow's async saver creates `save_counter` on first use, so it is in async
        # checkpoints; create it up front so sync and async checkpoints hold the same objects
        # and a restore can insist that every value was used.
        checkpoint.save_counter  # noqa: B018 - property access creates the variable
        return checkpoint

    # --- saving --------------------------------------------------------------------------

    def save(self, step: int, metrics: Mapping[str, float] | None = None, persist: bool | None = None) -> str:
        """Write a checkpoint for ``step`` and return its path prefix.

        With ``async_save`` this returns once the variables are copied; the checkpoint is
        recorded (metadata, state file, retention) when its files are complete. A save for a
        step that already has a checkpoint only updates that checkpoint's metrics.

        With a local tier the checkpoint is written there; ``persist=True`` also copies it to
        ``directory`` (a best, last or signal's save), None leaves it to the persist rule
        (``persist_every_seconds``, ``persist_every_saves``).
        """
        step = int(step)
        self._raise_background_error()
        self._fence()
        if self.worker_dir:
            return checkpoint_worker.save_as_worker(self, step, self.worker_dir)
        if self.local is not None:
            self.local.open()
        metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        existing = self._recorded(step)
        pending = self._pending
        if existing is None and pending is not None and pending.step == step:
            self.wait()
            existing = self._recorded(step)
        if existing is not None:
            if metrics:
                merged = dict(existing.metrics or {})
                merged.update(metrics)
                self._record(dataclasses.replace(existing, metrics=merged))
            if persist and self.local is not None and self.book.get(step) is None:
                self._persist(step)
            return existing.path
        if self.local is not None and self.local.persist_due(bool(persist)):
            self._persist_wanted.add(step)
        return self._write(step, metrics)

    def _persist(self, step: int) -> None:
        """Copy the local checkpoint of ``step`` to ``directory`` in the background; it is
        recorded there once complete, and a failure surfaces at the next save or wait()."""
        assert self.local is not None
        self.local.persist(step, self._record, self._report_background)

    def _report_background(self, exc: BaseException) -> None:
        self._background_error = exc

    def _write(self, step: int, metrics: dict[str, float] | None) -> str:
        """Start writing a new checkpoint of ``step`` (in the background with ``async_save``);
        :meth:`_on_written` records it once its files are complete."""
        directory = self.local.directory if self.local is not None else self.directory
        prefix = metadata.checkpoint_prefix(directory, step)
        tf.io.gfile.makedirs(directory)
        checkpoint_files.clear_the_way(directory, step, self._fence)
        started = time.time()
        info = CheckpointInfo(
            step=step,
            path=prefix,
            time=started,
            metrics=metrics,
            uid=secrets.token_hex(8),
            layer_names=self._layer_names(),
            data=self.data_record,
        )
        returned = threading.Event()  # set once write() returned and blocking time is known
        timing: dict[str, float] = {}
        options = tf.train.CheckpointOptions(
            enable_async=self.async_save,
            experimental_write_callbacks=[lambda _path: self._on_written(info, started, returned, timing)],
        )
        previous = self._pending
        if self._iterators:
            self._checkpoint.sync()  # the previous write must be done reading the snapshot
            for it in self._iterators:
                it.snapshot()
        self._pending = info
        try:
            with own_executor_only():  # see _compat.patch_async_wait
                self._checkpoint.write(prefix, options=options)
        except Exception as exc:  # noqa: BLE001 - re-raised with the path named
            self._pending = None
            if previous is not None and self.book.get(previous.step) is None:
                raise CheckpointSaveError(
                    f"saving checkpoint {previous.path} failed in the background: {self._failure(previous.path, exc)}"
                ) from exc
            self._raise_background_error()
            raise CheckpointSaveError(f"saving checkpoint {prefix} failed: {self._failure(prefix, exc)}") from exc
        timing["blocking"] = time.time() - started
        returned.set()
        if not self.async_save:
            self._raise_background_error()
        return prefix

    def wait(self) -> None:
        """Block until the save in flight (if any) is written and recorded, and with a local
        tier every copy asked for so far is recorded in ``directory``; raise their error."""
        self._checkpoint.sync()
        if self.local is not None:
            self.local.copier.drain()
        pending, self._pending = self._pending, None
        self._raise_background_error()
        if pending is not None and self._recorded(pending.step) is None:
            impl = getattr(self._checkpoint, "_async_checkpointer_impl", None)
            cause = getattr(impl, "_async_error", None)
            if impl is not None:
                impl._async_error = None  # reported here, not again at the next save
            raise CheckpointSaveError(
                f"saving checkpoint {pending.path} failed in the background: "
                + (self._failure(pending.path, cause) if cause else "see the TensorFlow log above")
            )

    def close(self) -> None:
        """End TensorFlow's background save thread, after the save in flight (see
        :func:`ckptkit._compat.end_async_save_thread`); a later async save starts a new one."""
        end_async_save_thread(self._checkpoint)
        if self.local is not None:
            self.local.copier.stop()

    def persist_newest(self) -> None:
        """Make sure the newest checkpoint is in ``directory``, waiting for its copy: before a
        stop (a signal) or a clean finish. A launch can resume from a local checkpoint whose
        copy a crash cut short (a final save, say) and then train nothing."""
        if self.local is None or not self.local.opened:
            return
        self.wait()
        newest = self.local.book.latest
        if newest is not None and self.book.get(newest.step) is None and newest.step >= (self.latest or newest).step:
            self._persist(newest.step)
            self.wait()

    def finish_local_tier(self) -> None:
        """A clean finish: the newest checkpoint is in ``directory`` and every copy recorded;
        the local tier's checkpoints are removed."""
        if self.local is not None and self.local.opened:
            self.persist_newest()
            self.local.remove_all()

    def drain_completed(self) -> list[CheckpointInfo]:
        """The saves completed since the last call (for logging them from the main thread)."""
        with self._lock:
            done, self._completed = self._completed, []
        return done

    def _raise_background_error(self) -> None:
        err, self._background_error = self._background_error, None
        if err is not None:
            raise err

    def _on_written(self, info: CheckpointInfo, started: float, returned: threading.Event, timing: dict) -> None:
        """Runs once the files of ``info`` are complete (in TensorFlow's save thread if async)."""
        mark_save_thread()  # before TensorFlow's async_wait() that follows the callbacks
        try:
            metadata.fsync_checkpoint(info.path)
            seconds = time.time() - started
            if self.async_save:
                returned.wait(timeout=60)  # write() returns right after the copy
            blocking = timing.get("blocking", seconds)
            done = dataclasses.replace(
                info, size=metadata.files_size(info.path), save_seconds=seconds, blocking_seconds=blocking
            )
            self._record(done)
            with self._lock:
                self._completed.append(done)
            log.info(
                "saved checkpoint %s (step %d, %.2fs, training blocked %.3fs)", info.path, info.step, seconds, blocking
            )
        except CkptkitError as exc:  # the fence, or a message of ours: surfaced as it is
            self._background_error = exc
        except Exception as exc:  # noqa: BLE001 - surfaced in the training thread
            self._background_error = CheckpointSaveError(f"recording checkpoint {info.path} failed: {exc}")
            self._background_error.__cause__ = exc

    def _fence(self) -> None:
        if self.fence is not None:
            self.fence()

    def _record(self, info: CheckpointInfo) -> None:
        """Add ``info``, write metadata and state file for what is kept, delete the rest (in
        the tier that holds it; a local checkpoint asked to persist is then copied)."""
        if self.local is not None and self.local.holds(info.path):
            self.local.record(info)
            if info.step in self._persist_wanted:
                self._persist_wanted.discard(info.step)
                self._persist(info.step)
            return
        self.book.add(info)
        self._write_bookkeeping()

    def _write_bookkeeping(self) -> None:
        """Write metadata and state file for the checkpoints kept; delete the others."""
        with self._lock:
            checkpoint_files.write_bookkeeping(
                self.directory, self.book, best_metric=self.best_metric, best_mode=self.best_mode, fence=self._fence
            )

    def _layer_names(self) -> dict[str, str] | None:
        """The names of the model's listed layers that its checkpoints cannot carry
        (``transfer.layer_names_record``), worked out at the first save: by then the model
        is built, and its structure stays the same for the rest of the run."""
        if self._layer_names_record is None and transfer.ROOT in self._trackables:
            self._layer_names_record = transfer.layer_names_record(self._trackables[transfer.ROOT])
        return self._layer_names_record or None

    # --- restoring -----------------------------------------------------------------------

    def restore(self, path: str, *, assert_consumed: bool = False) -> int:
        """Restore the checkpoint at prefix ``path`` into the trackables; return its step.

        Every existing object must receive a value, else CheckpointMismatchError names the
        first one that did not. ``assert_consumed`` also requires every value in the
        checkpoint to find its object (use it once all variables exist). See
        :mod:`ckptkit.checkpoint_restore`.
        """
        return checkpoint_restore.restore(self, path, assert_consumed=assert_consumed)

    def restore_latest(self, *, assert_consumed: bool = False) -> int | None:
        """Restore the newest checkpoint; return its step, or None if there is none."""
        if self.local is not None:
            self.local.open()
        latest = self.latest
        if latest is None:
            return None
        return self.restore(latest.path, assert_consumed=assert_consumed)

    def restore_best(self, *, assert_consumed: bool = False) -> int | None:
        """Restore the best checkpoint; return its step, or None if there is none."""
        best = self.best
        if best is None:
            return None
        return self.restore(best.path, assert_consumed=assert_consumed)
