"""TensorBoard output under ``run_dir/logs/<phase>/`` (``train``, ``eval``, ``checkpoint``).

A resumed run continues from its last checkpoint, which may be behind the last step that
was logged before the interruption. So on resume the event files are first cut back to
that step (rewritten through a temporary file, then renamed): the resumed run appends
without duplicate or out-of-order steps.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, Mapping

import tensorflow as tf
from tensorboard.compat.proto import event_pb2
from tensorboard.plugins.hparams import api as hp

log = logging.getLogger("ckptkit")

_EVENTS = "events.out.tfevents."


def _event_files(directory: str):
    if not tf.io.gfile.isdir(directory):
        return []
    return sorted(os.path.join(directory, n) for n in tf.io.gfile.listdir(directory) if _EVENTS in n)


def truncate_events(directory: str, step: int) -> int:
    """Drop events with a step after ``step`` from the event files in ``directory``.

    Returns how many events were dropped. Files are rewritten only when they change.
    """
    dropped = 0
    for path in _event_files(directory):
        kept, removed = [], 0
        for record in tf.data.TFRecordDataset(path):
            raw = record.numpy()
            event = event_pb2.Event.FromString(raw)
            if event.step > step and not event.HasField("file_version"):
                removed += 1
            else:
                kept.append(raw)
        if not removed:
            continue
        tmp = f"{path}.tmp-{os.getpid()}"
        with tf.io.TFRecordWriter(tmp) as writer:
            for raw in kept:
                writer.write(raw)
        tf.io.gfile.rename(tmp, path, overwrite=True)
        dropped += removed
    return dropped


def flat_hparams(config: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Dotted config keys -> values TensorBoard's hparams plugin accepts."""
    out: Dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_hparams(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        elif value is not None:
            out[name] = str(value)
    return out


class SummaryWriters:
    """One event-file writer per phase, created on first use."""

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self._writers: Dict[str, tf.summary.SummaryWriter] = {}

    def _writer(self, phase: str) -> tf.summary.SummaryWriter:
        writer = self._writers.get(phase)
        if writer is None:
            writer = tf.summary.create_file_writer(os.path.join(self.log_dir, phase))
            self._writers[phase] = writer
        return writer

    def resume_at(self, step: int) -> None:
        """Cut every phase's event files back to ``step`` (call before writing)."""
        if not tf.io.gfile.isdir(self.log_dir):
            return
        phases = [""] + [p.rstrip("/") for p in tf.io.gfile.listdir(self.log_dir)
                         if tf.io.gfile.isdir(os.path.join(self.log_dir, p))]
        newest = 0
        for phase in phases:
            for path in _event_files(os.path.join(self.log_dir, phase)):
                stamp = os.path.basename(path)[len(_EVENTS):].split(".")[0]
                newest = max(newest, int(stamp) if stamp.isdigit() else 0)
            dropped = truncate_events(os.path.join(self.log_dir, phase), step)
            if dropped:
                log.info("TensorBoard %s: dropped %d event(s) after step %d, which the "
                         "resumed run logs again", os.path.join(self.log_dir, phase), dropped, step)
        # TensorBoard reads event files in name order, and names start with the second they
        # were created in: the new files must not share the previous launch's second.
        wait = newest + 1 - time.time()
        if 0 < wait <= 2:
            time.sleep(wait)

    def scalars(self, phase: str, step: int, values: Mapping[str, float]) -> None:
        with self._writer(phase).as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(name, value)

    def run_info(self, step: int, config_yaml: str, hparams: Mapping[str, Any]) -> None:
        """The config as text, and the hyper-parameters at the top of ``logs/`` where the
        hparams plugin pairs them with the final ``train/`` and ``eval/`` metrics."""
        with self._writer("train").as_default(step=step):
            tf.summary.text("config", "```\n" + config_yaml + "\n```")
        with self._writer("").as_default(step=step):
            hp.hparams(dict(hparams), start_time_secs=int(time.time()))

    def flush(self) -> None:
        for writer in self._writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


class NoSummaries:
    """What a non-chief worker of a multi-worker run writes to TensorBoard: nothing."""

    def resume_at(self, step: int) -> None:
        pass

    def scalars(self, phase: str, step: int, values: Mapping[str, float]) -> None:
        pass

    def run_info(self, step: int, config_yaml: str, hparams: Mapping[str, Any]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
