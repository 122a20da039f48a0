"""The bookkeeping of a checkpoint directory, as tables (no files, no TensorFlow)."""

import math

import pytest

from ckptkit.checkpoint_book import CheckpointBook
from ckptkit.policies import CheckpointInfo

HOUR = 3600.0


def ckpt(step, loss=None, t=None):
    return CheckpointInfo(
        step=step,
        path=f"d/ckpt-{step}",
        time=step * 60.0 if t is None else t,
        metrics=None if loss is None else {"loss": loss},
    )


@pytest.mark.parametrize(
    "book, found, kept, best",
    [
        (dict(max_to_keep=2), [ckpt(1), ckpt(2), ckpt(3)], [2, 3], []),
        (dict(max_to_keep=None), [ckpt(1), ckpt(2), ckpt(3)], [1, 2, 3], []),
        # the best survives the newest-N rule
        (dict(max_to_keep=1, best_metric="loss"), [ckpt(1, 0.1), ckpt(2, 0.5), ckpt(3, 0.4)], [1, 3], [1]),
        (
            dict(max_to_keep=1, best_metric="loss", best_keep=2),
            [ckpt(1, 0.1), ckpt(2, 0.5), ckpt(3, 0.4), ckpt(4, 0.9)],
            [1, 3, 4],
            [1, 3],
        ),
        (
            dict(max_to_keep=1, best_metric="loss", best_mode="max"),
            [ckpt(1, 0.1), ckpt(2, 0.5), ckpt(3, 0.4)],
            [2, 3],
            [2],
        ),
        # a checkpoint without the metric, or a non-finite one, is never best
        (dict(max_to_keep=1, best_metric="loss"), [ckpt(1), ckpt(2, math.nan), ckpt(3, 0.7)], [3], [3]),
        (dict(max_to_keep=1, best_metric="loss"), [ckpt(1), ckpt(2)], [2], []),
        # one per hour on top of the newest
        (
            dict(max_to_keep=1, keep_every_n_hours=1.0),
            [ckpt(1, t=0), ckpt(2, t=0.5 * HOUR), ckpt(3, t=1.2 * HOUR), ckpt(4, t=1.3 * HOUR)],
            [1, 3, 4],
            [],
        ),
        (dict(max_to_keep=3), [], [], []),
    ],
)
def test_what_is_kept_and_what_is_best(book, found, kept, best):
    b = CheckpointBook(found=found, **book)
    plan = b.settle()
    assert [c.step for c in plan.kept] == kept
    assert sorted(c.step for c in plan.dropped) == sorted(set(c.step for c in found) - set(kept))
    assert plan.best == best
    assert (b.best.step if b.best else None) == (best[0] if best else None)


def test_records_are_replaced_forgotten_and_cleared():
    b = CheckpointBook(max_to_keep=3, best_metric="loss", found=[ckpt(1, 0.5), ckpt(2, 0.4)])
    assert b.latest.step == 2 and b.best.step == 2 and b.best_value() == 0.4
    b.add(ckpt(1, 0.1))  # the same step again: its metrics updated
    assert b.best.step == 1 and len(b.all()) == 2
    b.forget(1)
    assert [c.step for c in b.all()] == [2] and b.get(1) is None
    b.clear()
    assert b.latest is None and b.best is None and b.best_value() is None


@pytest.mark.parametrize(
    "args, words",
    [
        (dict(max_to_keep=0), "max_to_keep"),
        (dict(best_mode="median"), "best_mode"),
        (dict(best_keep=0), "best_keep"),
    ],
)
def test_bad_arguments_are_named(args, words):
    with pytest.raises(ValueError, match=words):
        CheckpointBook(**args)
