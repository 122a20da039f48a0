"""checkpoint.save_every_seconds=auto: the measurements and decisions of ckptkit.save_budget
(numbers in, decisions out), the config keys, and a training run that saves by them."""

import logging

import pytest
from conftest import ToyTrainer, make_cfg

import ckptkit
from ckptkit import save_budget
from ckptkit.controller import save_policy
from ckptkit.policies import SaveContext
from ckptkit.save_budget import SaveBudget


def quiet_calls(b, n=5, steps=100, seconds=1.0):
    for _ in range(n):
        b.call_done(steps, seconds)


def test_the_step_time_leaves_out_the_tracing_call_and_the_calls_beside_a_writer():
    b = SaveBudget(0.02)
    b.call_done(100, 9.0)  # traces the loop
    assert b.step_seconds is None
    quiet_calls(b)
    assert b.step_seconds == pytest.approx(0.01)
    b.save_started(500, blocking=0.1)
    b.call_done(100, 1.5)  # 0.5 s slower while written
    b.call_done(100, 0.9)  # 0.1 s faster: the machine's noise, which averages out
    assert b.step_seconds == pytest.approx(0.01)
    b.save_written(500, write_seconds=1.2)
    assert list(b._costs) == [pytest.approx(0.5)]  # 0.1 blocked + 0.4 slower
    b.save_started(600, blocking=0.1)
    b.call_done(100, 0.7)  # faster throughout: the save cost its blocking part, not less
    b.save_written(600, write_seconds=0.5)
    assert list(b._costs)[-1] == pytest.approx(0.1)


def test_the_period_is_the_cost_over_the_budget_and_never_shorter_than_a_write():
    b = SaveBudget(0.02)
    quiet_calls(b)
    b.save_started(1, blocking=0.2)
    b.save_written(1, write_seconds=0.5)
    assert b.period == pytest.approx(10.0)  # 0.2 s / 2 %
    slow_disk = SaveBudget(0.5)
    quiet_calls(slow_disk)
    slow_disk.save_started(1, blocking=0.2)
    slow_disk.save_written(1, write_seconds=4.0)
    assert slow_disk.period == pytest.approx(4.0 * (1 + save_budget.WRITE_MARGIN))  # one save in flight


def test_the_first_save_is_due_once_the_step_time_is_known_and_none_while_one_is_written():
    b = SaveBudget(0.02)
    b.call_done(100, 5.0)
    assert not b.due(now=100.0, last_save_time=0.0)  # no step time yet
    quiet_calls(b, n=1)
    assert b.due(now=1.0, last_save_time=0.0)  # cost unknown: measure it now
    b.save_started(100, blocking=0.1)
    assert not b.due(now=1000.0, last_save_time=0.0) and b.steps_until_due(1000.0, 0.0) is None
    b.save_written(100, write_seconds=0.3)
    assert b.period == pytest.approx(5.0)
    assert not b.due(now=4.0, last_save_time=0.0) and b.due(now=5.0, last_save_time=0.0)
    assert b.steps_until_due(now=4.0, last_save_time=0.0) == 100  # 1 s left at 0.01 s a step
    assert b.steps_until_due(now=9.0, last_save_time=0.0) == 1


def test_the_period_follows_a_heavier_save_within_a_few_saves_and_one_outlier_does_not_move_it():
    b = SaveBudget(0.02)
    quiet_calls(b)
    step = 0
    for _ in range(save_budget.SAVE_WINDOW):
        step += 1
        b.save_started(step, blocking=0.1)
        b.save_written(step, write_seconds=0.2)
    assert b.period == pytest.approx(5.0)
    b.save_started(step + 1, blocking=3.0)  # one slow save
    b.save_written(step + 1, write_seconds=3.5)
    assert b.period == pytest.approx(5.0)
    first = step + 2
    for heavier in range(first, first + save_budget.SAVE_WINDOW // 2 + 1):  # every save now costs 0.4 s
        b.save_started(heavier, blocking=0.4)
        b.save_written(heavier, write_seconds=0.6)
    assert b.period == pytest.approx(20.0)
    assert save_budget.SAVE_WINDOW // 2 + 1 <= 5  # "within a few saves"


def test_measured_overhead_and_the_warning_when_other_rules_save_too_often(caplog):
    b = SaveBudget(0.02)
    quiet_calls(b, n=1, steps=1, seconds=0.0)
    with caplog.at_level(logging.INFO, logger="ckptkit"):
        for step in range(1, 11):  # another rule saves after every 1 s call: 0.1 s each, 10 %
            b.call_done(100, 1.0)
            b.save_started(step, blocking=0.1)
            b.save_written(step, write_seconds=0.1)
    assert b.overhead == pytest.approx(0.1)
    assert "auto saves: every 5.0s" in caplog.text
    assert "over checkpoint.max_overhead=0.02" in caplog.text and "save_every_steps=null" in caplog.text
    assert "10 saves cost 10.00% of training time (budget 2.0%)" in b.summary()
    assert set(b.scalars()) == {"checkpoint/auto_period_seconds", "checkpoint/overhead"}


def test_workers_other_than_the_chief_follow_its_decision(tmp_path):
    run, _ = ckptkit.config.load_config(make_cfg(tmp_path, **{"checkpoint.save_every_seconds": "auto"}))
    b = SaveBudget(run.checkpoint.max_overhead)
    quiet_calls(b)
    ctx = SaveContext(step=7, now=100.0, last_save_step=0, last_save_time=0.0)
    assert save_policy(run.checkpoint, b, decides=True).should_save(ctx)
    assert not save_policy(run.checkpoint, b, decides=False).should_save(ctx)


def test_auto_takes_two_percent_unless_told_and_refuses_a_budget_of_one_or_more(tmp_path):
    run, _ = ckptkit.config.load_config(make_cfg(tmp_path, **{"checkpoint.save_every_seconds": "auto"}))
    assert run.checkpoint.max_overhead == 0.02
    with pytest.raises(ckptkit.ConfigError, match="fraction of training time"):
        ckptkit.config.load_config(
            make_cfg(tmp_path, **{"checkpoint.save_every_seconds": "auto", "checkpoint.max_overhead": 2})
        )


def test_a_run_with_auto_saves_logs_the_period_and_writes_it_to_tensorboard(tmp_path, caplog, monkeypatch):
    """Each save is made to block for 50 ms more; at a 25 % budget the period is well under a
    second, so a run of a few seconds saves several times by the budget, besides its first
    and final saves."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    real_save = ckptkit.Checkpointer.save

    def slow_save(self, step, metrics=None, **kw):
        __import__("time").sleep(0.05)
        return real_save(self, step, metrics, **kw)

    monkeypatch.setattr(ckptkit.Checkpointer, "save", slow_save)
    cfg = make_cfg(
        tmp_path / "run",
        **{
            "trainer.max_steps": 8000,
            "trainer.steps_per_loop": 200,
            "trainer.eval_every_steps": None,
            "trainer.log_every_steps": 8000,
            "checkpoint.save_every_steps": None,
            "checkpoint.save_every_seconds": "auto",
            "checkpoint.max_overhead": 0.25,
            "checkpoint.max_to_keep": 1,
        },
    )
    with caplog.at_level(logging.INFO, logger="ckptkit"):
        result = ToyTrainer(cfg).fit()
    assert result.step == 8000
    assert "auto saves: every" in caplog.text and "budget 25%" in caplog.text
    saves = caplog.text.count("saved checkpoint")
    assert saves >= 4, caplog.text  # the first, at least two by the budget, the final one
    summary = [r.getMessage() for r in caplog.records if "saves cost" in r.getMessage()]
    assert summary and "budget 25.0%" in summary[0]
    events = EventAccumulator(str(tmp_path / "run" / "logs" / "checkpoint"), size_guidance={"tensors": 0})
    events.Reload()
    assert {"checkpoint/auto_period_seconds", "checkpoint/overhead"} <= set(events.Tags()["tensors"])
