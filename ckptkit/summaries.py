"""TensorBoard scalars under ``run_dir/logs/train`` and ``run_dir/logs/eval``."""

from __future__ import annotations

import os
from typing import Dict, Mapping

import tensorflow as tf


class SummaryWriters:
    """One event-file writer per phase, created on first use."""

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self._writers: Dict[str, tf.summary.SummaryWriter] = {}

    def scalars(self, phase: str, step: int, values: Mapping[str, float]) -> None:
        writer = self._writers.get(phase)
        if writer is None:
            writer = tf.summary.create_file_writer(os.path.join(self.log_dir, phase))
            self._writers[phase] = writer
        with writer.as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(name, value)

    def flush(self) -> None:
        for writer in self._writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
