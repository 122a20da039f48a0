"""The compiled inner loops: many train steps per ``tf.function`` call, and evaluation.

The user writes one step (``Trainer.train_step``); the loop runs ``num_steps`` of them in a
single ``tf.function`` call so the Python overhead is paid once per loop, not once per step,
and returns the mean of each metric over those steps. ``num_steps`` is a tensor, so loops of
different lengths (cut short at an eval, save or log boundary) share one trace.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping

import numpy as np
import tensorflow as tf


def _describe(value) -> str:
    if value is None:
        return "None (is a return statement missing?)"
    if isinstance(value, (tf.Tensor, tf.Variable, np.ndarray, np.generic)) or hasattr(value, "dtype"):
        return "a tensor"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, Mapping):
        return "an empty dict"
    return f"a {type(value).__name__}"


def _metrics_problem(out, hook: str) -> str | None:
    """What is wrong with ``hook``'s return value, in one line; None when it is usable."""
    if not isinstance(out, Mapping) or not out:
        return f"{hook}() returned {_describe(out)}; return a dict of scalar metrics such as {{'loss': loss}}"
    for key, value in out.items():
        try:
            value = tf.convert_to_tensor(value)
        except (TypeError, ValueError):
            return f"{hook}() returned {key!r} as {_describe(value)}, which is no tensor; metrics are scalar numbers"
        if not (value.dtype.is_floating or value.dtype.is_integer or value.dtype.is_bool):
            return f"{hook}() returned {key!r} of type {value.dtype.name}; metrics are scalar numbers"
        if value.shape.rank not in (0, None):
            return (
                f"{hook}() returned {key!r} with shape {value.shape.as_list()}; metrics must be scalars "
                "(reduce them, e.g. tf.reduce_mean)"
            )
    return None


class HookCheck:
    """Checks a hook's return value while it is traced, without raising inside the trace
    (where AutoGraph would wrap the message in pages of its own frames): the first problem
    is kept, the trace goes on with a stand-in, and :meth:`raise_if_any` raises it after."""

    def __init__(self):
        self.problem: str | None = None

    def metrics(self, out, hook: str) -> dict[str, tf.Tensor]:
        problem = _metrics_problem(out, hook)
        if problem is not None:
            self.problem = self.problem or problem
            return {"loss": tf.constant(0.0)}
        return {str(k): tf.cast(tf.convert_to_tensor(v), tf.float32) for k, v in out.items()}

    def raise_if_any(self) -> None:
        if self.problem is not None:
            from ckptkit.errors import HookError

            raise HookError(self.problem)


#: Keys of a loop call's result that are no metrics: its finite and non-finite step counts
#: and the first non-finite step (-1: none), tallied inside the compiled loop.
FINITE_STEPS, BAD_STEPS, FIRST_BAD = "_finite_steps", "_bad_steps", "_first_bad"
TALLY_KEYS = (FINITE_STEPS, BAD_STEPS, FIRST_BAD)


class TrainWindow:
    """The train steps since the last log line. Every step is tallied inside the compiled
    loop (loop-carried values, no variables): each call returns the mean of each metric over
    its steps whose metrics were all finite, how many those were, how many were not, and the
    first that was not. This window keeps the calls' results as they come (device tensors,
    nothing read back), so a non-finite loss between two log lines is never missed; :meth:`read`
    fetches them at a boundary. Not part of any checkpoint."""

    #: Calls kept on the device before they are folded into host-side sums (one read per this
    #: many calls when log lines are rare: memory stays bounded, reads stay rare).
    FOLD_EVERY = 256

    def __init__(self):
        self.calls: list[Mapping[str, tf.Tensor]] = []
        self._clear()

    def _clear(self) -> None:
        self._sums: dict[str, float] = {}
        self._steps = self._bad = 0
        self._first: int | None = None

    def add(self, out: Mapping[str, tf.Tensor]) -> None:
        self.calls.append(out)
        if len(self.calls) >= self.FOLD_EVERY:
            self._fold()

    def _fold(self) -> None:
        for out in self.calls:
            values = {k: float(np.asarray(v)) for k, v in out.items()}
            n, b, f = int(values[FINITE_STEPS]), int(values[BAD_STEPS]), int(values[FIRST_BAD])
            for k, v in values.items():
                if k not in TALLY_KEYS and n:
                    self._sums[k] = self._sums.get(k, 0.0) + v * n
            self._steps, self._bad = self._steps + n, self._bad + b
            self._first = f if self._first is None and f >= 0 else self._first
        self.calls = []

    def read(self, reset: bool = False) -> Window:
        self._fold()
        n = self._steps
        window = Window({k: v / n for k, v in self._sums.items()} if n else {}, n, self._bad, self._first)
        if reset:
            self._clear()
        return window


@dataclasses.dataclass(frozen=True)
class Window:
    """The train steps since the last log line, as read by :meth:`TrainWindow.read`: the mean
    of each metric over the finite steps, and the steps whose metrics were not finite."""

    means: dict[str, float]
    steps: int
    bad_steps: int
    first_bad: int | None


def _tally_start(names):
    """The loop-carried tallies before a call's first step: metric sums over finite steps,
    finite and non-finite counts, the first non-finite step (-1: none)."""
    zero = tf.constant(0, tf.int64)
    return {k: tf.zeros([], tf.float32) for k in names}, zero, zero, tf.constant(-1, tf.int64)


def _tally(acc, out, step):
    """Add one step's metrics ``out`` (at global step ``step``) to the tallies ``acc``."""
    sums, finite_steps, bad_steps, first_bad = acc
    finite = tf.reduce_all(tf.math.is_finite(tf.stack([out[k] for k in sorted(out)])))
    sums = {k: sums[k] + tf.where(finite, out[k], 0.0) for k in sums}
    first_bad = tf.where(tf.logical_or(finite, first_bad >= 0), first_bad, step)
    return sums, finite_steps + tf.cast(finite, tf.int64), bad_steps + 1 - tf.cast(finite, tf.int64), first_bad


def _tally_result(acc):
    """A call's result: the means over its finite steps, and the tallies."""
    sums, finite_steps, bad_steps, first_bad = acc
    n = tf.cast(tf.maximum(finite_steps, 1), tf.float32)
    return {
        **{k: v / n for k, v in sums.items()},
        FINITE_STEPS: finite_steps,
        BAD_STEPS: bad_steps,
        FIRST_BAD: first_bad,
    }


class TrainLoop:
    """Runs ``n >= 1`` train steps on ``iterator`` per call: ``loop(n)`` -> mean metrics.

    Every step is also tallied in the loop (finite or not, the first that was not), and each
    call's result goes into :attr:`window`, which the host reads at log and save boundaries:
    the means since the last log line, and any non-finite step.

    A loop of ``n > 1`` steps is one ``tf.function`` with ``n`` as a tensor, so loops of any
    length (cut short at an eval, save or log boundary) share one trace. A single step has a
    ``tf.function`` of its own, without the while-loop, for ``steps_per_loop=1``. If
    ``stop`` (a bool variable, set from another thread on preemption) becomes true, a loop
    ends after the step in progress; ``global_step`` tells how many steps ran. The iterator
    is captured, not passed: matching an iterator argument against the function's traces
    costs about half a millisecond per call, as much as a small model's whole step.

    Under a strategy (``dist``) each step runs ``train_step`` on every replica's share of
    the batch and averages the metrics over replicas. With several workers the ``stop``
    flags of all workers are combined before every step (a small all-reduce), so every
    worker stops at the same step, also before the first step of a call.
    """

    def __init__(
        self, train_step: Callable, global_step: tf.Variable, iterator, stop: tf.Variable | None = None, dist=None
    ):
        self.check = HookCheck()

        def replica_step(batch):
            return self.check.metrics(train_step(batch), "train_step")

        self.window = TrainWindow()

        def one():
            batch = next(iterator)
            out = replica_step(batch) if dist is None else dist.mean(dist.run(replica_step, batch))
            global_step.assign_add(1)
            return out, global_step.read_value()

        def single():
            out, step = one()
            return _tally_result(_tally(_tally_start(sorted(out)), out, step))

        def many(num_steps):
            out, step = one()
            acc = _tally(_tally_start(sorted(out)), out, step)
            for _ in tf.range(num_steps - 1):
                if stop is not None and stop.read_value():
                    break
                out, step = one()
                acc = _tally(acc, out, step)
            return _tally_result(acc)

        def coordinated(num_steps):
            acc = _tally_start(self._metric_names())
            for _ in tf.range(num_steps):
                if dist.any_true(stop):
                    break
                out, step = one()
                acc = _tally(acc, out, step)
            return _tally_result(acc)

        self._coordinated = dist is not None and dist.multi_worker and stop is not None
        self._one = tf.function(single)
        self._many = tf.function(coordinated if self._coordinated else many)
        self._lengths: dict[int, tf.Tensor] = {}

    # The loop calls the traced (concrete) functions directly: a tf.function call first looks
    # its trace up by hashing the signature and every captured variable, which costs a small
    # model about a tenth of its step at steps_per_loop=1 (benchmarks/run.py, workload 1).
    # The calls never vary, so one trace each serves.
    @functools.cached_property
    def _single_fn(self):
        return self._one.get_concrete_function()

    @functools.cached_property
    def _loop_fn(self):
        return self._many.get_concrete_function(tf.TensorSpec([], tf.int32))

    def _metric_names(self):
        return sorted(k for k in self._single_fn.structured_outputs if k not in TALLY_KEYS)

    def trace(self, steps_per_loop: int) -> None:
        """Trace the function the run will call (the single step for ``steps_per_loop=1``)
        now: this creates every variable the step creates lazily."""
        if self._coordinated:
            self._metric_names()  # traces the single step first, outside the loop's trace
        if steps_per_loop == 1 and not self._coordinated:
            self._single_fn  # noqa: B018 - traces
        else:
            self._loop_fn  # noqa: B018 - traces
        self.check.raise_if_any()

    def __call__(self, n: int) -> dict[str, tf.Tensor]:
        """Run ``n`` steps; the result (means over the finite steps, and the tallies) also
        goes into :attr:`window`."""
        if n == 1 and not self._coordinated:
            out = self._single_fn()
        else:
            if n not in self._lengths:
                self._lengths[n] = tf.constant(n, tf.int32)
            out = self._loop_fn(self._lengths[n])
        self.window.add(out)
        return out


def batch_size(batch) -> tf.Tensor:
    first = tf.nest.flatten(batch)[0]
    shape = tf.shape(first)
    return shape[0] if first.shape.rank else tf.constant(1)


def make_eval_step(eval_step: Callable, dist=None, check: HookCheck | None = None) -> Callable:
    """A tf.function: batch -> (metric * rows summed over replicas, rows), in float64."""
    check = check or HookCheck()

    def replica(batch):
        metrics = check.metrics(eval_step(batch), "eval_step")
        n = batch_size(batch)
        rows = tf.cast(n, tf.float64)
        # A replica may get no rows of a short last batch; its means are NaN then.
        return {k: tf.where(n > 0, tf.cast(v, tf.float64) * rows, 0.0) for k, v in metrics.items()}, rows

    def step(batch):
        if dist is None:
            return replica(batch)
        sums, rows = dist.run(replica, batch)
        return {k: dist.sum(v) for k, v in sums.items()}, dist.sum(rows)

    return tf.function(step)


def run_eval(eval_fn: Callable, dataset: tf.data.Dataset) -> dict[str, float]:
    """Mean of each metric over the dataset, weighted by batch size (exact for means)."""
    sums: dict[str, float] = {}
    total = 0.0
    for batch in dataset:
        weighted, n = eval_fn(batch)
        for k, v in weighted.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        total += float(n)
    if total == 0:
        raise ValueError("eval_dataset() yielded no batches")
    return {k: v / total for k, v in sums.items()}


class FiniteCheck:
    """Whether every floating-point variable is finite, as one fused reduction.

    ``check()`` runs one ``tf.function`` that reduces ``is_finite`` over all variables to a
    single bool (one device-to-host read); only when that is false does it look for the
    names of the variables at fault. Costs about one read of the weights per save
    (``benchmarks/run.py`` section 1c).
    """

    def __init__(self, variables):
        seen, self.variables = set(), []
        for v in variables:
            if id(v) not in seen and tf.as_dtype(v.dtype).is_floating:
                seen.add(id(v))
                self.variables.append(v)

        def all_finite_fn():
            if not self.variables:
                return tf.constant(True)
            return tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(v)) for v in self.variables]))

        self._all_finite = tf.function(all_finite_fn)

    def trace(self) -> None:
        """Trace the reduction now (at build time), not inside the first save."""
        self._all_finite.get_concrete_function()

    def __call__(self) -> list:
        """The names of the variables holding a NaN or infinity ([] when all are finite)."""
        if bool(self._all_finite()):
            return []
        return [getattr(v, "path", None) or v.name for v in self.variables if not np.all(np.isfinite(v.numpy()))]


def to_python(metrics: Mapping[str, tf.Tensor]) -> dict[str, float]:
    """A call's metrics as floats (without the tallies)."""
    return {k: float(np.asarray(v)) for k, v in metrics.items() if k not in TALLY_KEYS}


def all_finite(metrics: Mapping[str, float]) -> bool:
    return all(math.isfinite(v) for v in metrics.values())
