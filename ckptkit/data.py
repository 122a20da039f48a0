"""Shuffling whose saved position does not grow with the data: ``ckptkit.data.shuffle``.

Every checkpoint holds the training iterator's position, so that a resumed run sees exactly
the batches an uninterrupted one would. With ``Dataset.shuffle(buffer_size)`` that position
includes every element in the shuffle buffer: TensorFlow serializes them one by one in the
training thread (46 ms and 2 MB per save for 4096 examples of 64 floats; section 1b of
``benchmarks/run.py``).

TensorFlow's *global shuffle* permutes the indices of a dataset with random access instead
(``from_tensor_slices``, ``range``, ``map``, ``batch(drop_remainder=True)``, ``zip``, ...):
nothing is buffered, and the position is an index and a seed (0.1 ms and 1 kB per save on
the same data). It is in TensorFlow since 2.17, still outside the public API
(``tensorflow.python.data.experimental.ops.global_shuffle_op``), so ckptkit looks it up
and falls back to a buffered shuffle when it is missing or the pipeline has no random access
(``filter``, ``from_generator``, file readers, ``cache``), and logs which one it took.

:func:`describe_position` tells the Trainer's log which kind of position a run saves.
"""

from __future__ import annotations

import logging
import re

import tensorflow as tf

log = logging.getLogger("ckptkit")


def _global_shuffle_op():
    try:
        from tensorflow.python.data.experimental.ops import global_shuffle_op
    except ImportError:
        return None
    return getattr(global_shuffle_op, "_global_shuffle", None)


def _reason(exc: Exception) -> str:
    """TensorFlow's message without its ``{{function_node ...}}`` and ``[Op:...]`` wrapping."""
    text = str(getattr(exc, "message", exc)).strip().splitlines()[0]
    text = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", text)
    return re.sub(r"\s*\[Op:[^\]]*\].*$", "", text).rstrip(". ")


def shuffle(
    ds: tf.data.Dataset,
    seed: int,
    *,
    buffer_size: int | None = None,
    reshuffle_each_iteration: bool = True,
) -> tf.data.Dataset:
    """``ds`` in an order shuffled by ``seed``: globally where ``ds`` allows, else buffered.

    The global shuffle needs a dataset of known, finite length whose every transformation
    supports random access; then each epoch is a fresh permutation of all of ``ds`` and a
    checkpoint stores an index and a seed. Otherwise ``ds.shuffle(buffer_size)`` is used:
    ``buffer_size`` defaults to the length of ``ds`` when that is known, and must be given
    when it is not. Either way the order depends only on ``seed`` (and the epoch), so a
    resumed run continues it exactly. Apply it before ``batch`` to shuffle examples, as with
    ``Dataset.shuffle``; ``repeat`` after it reshuffles each epoch.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(
            f"ckptkit.data.shuffle needs an int seed (a resumed run must be able to repeat the order), got {seed!r}"
        )
    if buffer_size is not None and (
        isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1
    ):
        raise ValueError(f"buffer_size must be a positive int, got {buffer_size!r}")
    length = int(ds.cardinality())
    op = _global_shuffle_op()
    if op is None:
        reason = f"TensorFlow {tf.__version__} has no global shuffle (it came in 2.17)"
    elif length == tf.data.INFINITE_CARDINALITY:
        reason = "the dataset is infinite (shuffle before repeat())"
    elif length == tf.data.UNKNOWN_CARDINALITY:
        reason = "the dataset's length is unknown (tf.data.experimental.assert_cardinality declares it)"
    else:
        try:
            out = op(ds, seed=seed, reshuffle_each_iteration=reshuffle_each_iteration)
        except (tf.errors.FailedPreconditionError, tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as exc:
            reason = _reason(exc)
        else:
            log.info("data: global shuffle of %d elements (a checkpoint stores an index and a seed)", length)
            return out
    if buffer_size is None:
        if length < 0:
            raise ValueError(
                f"ckptkit.data.shuffle cannot shuffle this dataset globally: "
                f"{reason}; pass buffer_size= for a buffered shuffle"
            )
        buffer_size = length
    log.warning(
        "data: buffered shuffle of %d elements instead of a global one: %s. Each "
        "checkpoint then holds up to %d elements of the buffer.",
        buffer_size,
        reason,
        buffer_size,
    )
    return ds.shuffle(buffer_size, seed=seed, reshuffle_each_iteration=reshuffle_each_iteration)


def describe_position(ds: tf.data.Dataset) -> str:
    """What a checkpoint of an iterator over ``ds`` holds, in words, for the run's log.

    Follows the dataset's inputs (not the datasets built inside ``interleave`` or
    ``flat_map`` functions) to its shuffles."""
    from ckptkit.data_position import pipeline_nodes

    buffers, global_shuffle = [], False
    for node in pipeline_nodes(ds):
        name = type(node).__name__
        if name == "_GlobalShuffleDataset":
            global_shuffle = True
        elif name in ("_ShuffleDataset", "_ShuffleAndRepeatDataset"):
            try:
                buffers.append(int(node._buffer_size))
            except (AttributeError, TypeError, ValueError):
                buffers.append(-1)
    if buffers:
        sizes = " + ".join("?" if b < 0 else str(b) for b in buffers)
        return (
            f"the data iterator's position with its shuffle buffer ({sizes} elements), "
            "serialized at each save; ckptkit.data.shuffle(ds, seed) stores an index "
            "instead where the dataset has random access"
        )
    if global_shuffle:
        return "the data iterator's position as an index and a seed (global shuffle)"
    return "the data iterator's position (no shuffle buffer in the pipeline)"
