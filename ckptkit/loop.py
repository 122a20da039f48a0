"""The compiled inner loops: many train steps per ``tf.function`` call, and evaluation.

The user writes one step (``Trainer.train_step``); the loop runs ``num_steps`` of them in a
single ``tf.function`` call so the Python overhead is paid once per loop, not once per step,
and returns the mean of each metric over those steps. ``num_steps`` is a tensor, so loops of
different lengths (cut short at an eval, save or log boundary) share one trace.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Mapping, Optional

import numpy as np
import tensorflow as tf


def _check_metrics(out, hook: str) -> Dict[str, tf.Tensor]:
    if not isinstance(out, Mapping) or not out:
        raise TypeError(f"{hook} must return a non-empty dict of scalar tensors, "
                        f"e.g. {{'loss': loss}}; got {type(out).__name__}")
    metrics = {}
    for key, value in out.items():
        value = tf.convert_to_tensor(value)
        if value.shape.rank not in (0, None):
            raise TypeError(f"{hook} returned {key!r} with shape {value.shape}; "
                            "metrics must be scalars (reduce them, e.g. tf.reduce_mean)")
        metrics[str(key)] = tf.cast(value, tf.float32)
    return metrics


class TrainLoop:
    """Runs ``n >= 1`` train steps on ``iterator`` per call: ``loop(n)`` -> mean metrics.

    A loop of ``n > 1`` steps is one ``tf.function`` with ``n`` as a tensor, so loops of any
    length (cut short at an eval, save or log boundary) share one trace. A single step has a
    ``tf.function`` of its own, without the while-loop, for ``steps_per_loop=1``. If
    ``stop`` (a bool variable, set from another thread on preemption) becomes true, a loop
    ends after the step in progress; ``global_step`` tells how many steps ran. The iterator
    is captured, not passed: matching an iterator argument against the function's traces
    costs about half a millisecond per call, as much as a small model's whole step.
    """

    def __init__(self, train_step: Callable, global_step: tf.Variable, iterator,
                 stop: Optional[tf.Variable] = None):
        def one():
            out = _check_metrics(train_step(next(iterator)), "train_step")
            global_step.assign_add(1)
            return out

        def many(num_steps):
            totals = one()
            done = tf.constant(1)
            for _ in tf.range(num_steps - 1):
                if stop is not None and stop.read_value():
                    break
                out = one()
                totals = {k: totals[k] + out[k] for k in totals}
                done += 1
            n = tf.cast(done, tf.float32)
            return {k: v / n for k, v in totals.items()}

        self._one = tf.function(one)
        self._many = tf.function(many)
        self._lengths: Dict[int, tf.Tensor] = {}

    def trace(self, steps_per_loop: int) -> None:
        """Trace the function the run will call (the single step for ``steps_per_loop=1``)
        now: this creates every variable the step creates lazily."""
        if steps_per_loop == 1:
            self._one.get_concrete_function()
        else:
            self._many.get_concrete_function(tf.TensorSpec([], tf.int32))

    def __call__(self, n: int) -> Dict[str, tf.Tensor]:
        if n == 1:
            return self._one()
        if n not in self._lengths:
            self._lengths[n] = tf.constant(n, tf.int32)
        return self._many(self._lengths[n])


def batch_size(batch) -> tf.Tensor:
    first = tf.nest.flatten(batch)[0]
    shape = tf.shape(first)
    return shape[0] if first.shape.rank else tf.constant(1)


def make_eval_step(eval_step: Callable) -> Callable:
    def step(batch):
        return _check_metrics(eval_step(batch), "eval_step"), batch_size(batch)

    return tf.function(step)


def run_eval(eval_fn: Callable, dataset: tf.data.Dataset) -> Dict[str, float]:
    """Mean of each metric over the dataset, weighted by batch size (exact for means)."""
    sums: Dict[str, float] = {}
    total = 0
    for batch in dataset:
        metrics, n = eval_fn(batch)
        n = int(n)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v) * n
        total += n
    if total == 0:
        raise ValueError("eval_dataset() yielded no batches")
    return {k: v / total for k, v in sums.items()}


def to_python(metrics: Mapping[str, tf.Tensor]) -> Dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in metrics.items()}


def all_finite(metrics: Mapping[str, float]) -> bool:
    return all(math.isfinite(v) for v in metrics.values())
