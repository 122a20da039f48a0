"""The outer loop's rules, each a table: when a loop call stops, and when each action is due."""

from types import SimpleNamespace as NS

import pytest

from ckptkit import controller as c
from ckptkit.policies import SaveContext


def trainer_cfg(**kw):
    return NS(**{"max_steps": 1000, "steps_per_loop": 100, "log_every_steps": 100, "eval_every_steps": 250, **kw})


def ckpt_cfg(**kw):
    return NS(**{"save_every_steps": 300, "save_every_seconds": None, "save_at_steps": [], **kw})


@pytest.mark.parametrize(
    "step, t, k, want",
    [
        (0, {}, {}, 100),  # steps_per_loop and log period agree
        (200, {}, {}, 250),  # the eval period cuts the call short
        (250, {}, {}, 300),  # then the log and save periods
        (950, {}, {}, 1000),  # never past max_steps
        (0, {"steps_per_loop": 1000, "log_every_steps": 1000, "eval_every_steps": None}, {}, 300),
        (0, {"steps_per_loop": 1000, "log_every_steps": 1000, "eval_every_steps": None}, {"save_at_steps": [7]}, 7),
        (7, {"steps_per_loop": 1000, "log_every_steps": 1000}, {"save_every_steps": None, "save_at_steps": [7]}, 250),
        (990, {"max_steps": 995}, {}, 995),
    ],
)
def test_a_loop_call_stops_at_the_next_due_action(step, t, k, want):
    assert c.next_boundary(step, trainer_cfg(**t), ckpt_cfg(**k)) == want


@pytest.mark.parametrize(
    "step, final, every, has_eval, want",
    [
        (250, False, 250, True, True),
        (260, False, 250, True, False),
        (260, True, 250, True, True),  # the last step always
        (250, False, None, True, False),  # null: only at the end
        (260, True, None, True, True),
        (250, True, 250, False, False),  # no eval dataset
    ],
)
def test_eval_due(step, final, every, has_eval, want):
    assert c.eval_due(step, final, every, has_eval) is want


@pytest.mark.parametrize(
    "step, final, every, want", [(100, False, 100, True), (150, False, 100, False), (150, True, 100, True)]
)
def test_log_due(step, final, every, want):
    assert c.log_due(step, final, every) is want


@pytest.mark.parametrize(
    "logging_now, saving_now, read",
    [(False, False, False), (True, False, True), (False, True, True), (True, True, True)],
)
def test_the_train_window_is_read_at_log_lines_and_saves_only(logging_now, saving_now, read):
    assert c.window_read_due(logging_now, saving_now) is read


EXPORT = NS(enabled=True, on_best=True)


@pytest.mark.parametrize(
    "new_best, step_eval, export, preempted, chief, want",
    [
        (True, {"acc": 1.0}, EXPORT, False, True, True),
        (False, {"acc": 1.0}, EXPORT, False, True, False),
        (True, None, EXPORT, False, True, False),
        (True, {"acc": 1.0}, NS(enabled=True, on_best=False), False, True, False),
        (True, {"acc": 1.0}, NS(enabled=False, on_best=True), False, True, False),
        (True, {"acc": 1.0}, EXPORT, True, True, False),  # a stop saves, it does not export
        (True, {"acc": 1.0}, EXPORT, False, False, False),  # only the chief exports
    ],
)
def test_export_on_best_due(new_best, step_eval, export, preempted, chief, want):
    assert c.export_on_best_due(new_best, step_eval, export, preempted, chief) is want


def _ctx(**kw):
    base = dict(step=300, now=50.0, last_save_step=0, last_save_time=0.0, new_best=False, final=False, preempted=False)
    return SaveContext(**{**base, **kw})


@pytest.mark.parametrize(
    "cfg, ctx, want",
    [
        (ckpt_cfg(), _ctx(), True),  # every 300 steps
        (ckpt_cfg(), _ctx(step=200), False),
        (ckpt_cfg(), _ctx(step=200, new_best=True), True),
        (ckpt_cfg(), _ctx(step=200, final=True), True),
        (ckpt_cfg(), _ctx(step=200, preempted=True), True),
        (ckpt_cfg(save_every_steps=None, save_every_seconds=30.0), _ctx(step=200), True),
        (ckpt_cfg(save_every_steps=None, save_every_seconds=60.0), _ctx(step=200), False),
        (ckpt_cfg(save_every_steps=None, save_at_steps=[200]), _ctx(step=200), True),
    ],
)
def test_the_save_policy_from_the_config(cfg, ctx, want):
    assert c.save_policy(cfg).should_save(ctx) is want
