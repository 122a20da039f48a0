"""Ctrl-C as a person meets it: in a REPL the session survives, in a script a second Ctrl-C
ends quietly, and a resumed run's live bar starts from what was restored."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import ToyTrainer, make_cfg

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")

# Trains until the trainer has taken a step, then sends itself SIGINT (as a Ctrl-C would).
_FIT_AND_CTRL_C = """
import os, signal, sys, threading, time
sys.path.insert(0, {here!r})
from conftest import ToyTrainer, make_cfg
trainer = ToyTrainer(make_cfg({run!r}, **{{"trainer.max_steps": 100000, "trainer.steps_per_loop": 2,
                                          "data.step_sleep": 0.005, "export.enabled": False}}))
def ctrl_c():
    while "global_step" not in vars(trainer) or int(trainer.global_step.numpy()) < 4:  # set by build()
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGINT)
threading.Thread(target=ctrl_c, daemon=True).start()
"""


@pytest.mark.slow
def test_ctrl_c_in_a_repl_saves_and_keeps_the_session(tmp_path):
    """In `python -i` (as in any REPL, IPython or Jupyter) fit() raises Interrupted, a
    KeyboardInterrupt: the step reached is saved, and the next line typed still runs."""
    code = textwrap.dedent(_FIT_AND_CTRL_C.format(here=HERE, run=str(tmp_path / "run"))) + "trainer.fit()\n"
    typed = (
        "import ckptkit\n"
        "e = sys.last_value\n"
        "print('ALIVE', type(e).__name__, isinstance(e, KeyboardInterrupt), e.step > 0,"
        " os.path.exists(e.path + '.index'))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-i", "-c", code], input=typed, capture_output=True, text=True, timeout=300, env=ENV, cwd=HERE
    )
    assert "ALIVE Interrupted True True True" in proc.stdout, proc.stdout + proc.stderr[-3000:]


@pytest.mark.slow
def test_after_a_ctrl_c_stop_a_second_ctrl_c_exits_quietly(tmp_path):
    """A script stopped by Ctrl-C is on its way out; a second Ctrl-C in that window (Hydra's
    teardown, interpreter exit) exits with 130 and no KeyboardInterrupt traceback."""
    code = textwrap.dedent(_FIT_AND_CTRL_C.format(here=HERE, run=str(tmp_path / "run"))) + textwrap.dedent("""
        import ckptkit
        try:
            trainer.fit()
        except ckptkit.Preempted as stop:
            print("STOPPED", stop.code, flush=True)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)
        print("NOT REACHED", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=ENV, cwd=HERE)
    assert proc.returncode == 130 and "STOPPED 75" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr, proc.stderr[-3000:]
    assert "second Ctrl-C" in proc.stderr


def test_a_resumed_runs_bar_shows_the_last_save_and_the_best(tmp_path):
    cfg = make_cfg(
        tmp_path / "run",
        **{
            "trainer.max_steps": 20,
            "trainer.eval_every_steps": 5,
            "checkpoint.save_every_steps": 10,
            "checkpoint.best.metric": "score",
            "checkpoint.best.mode": "max",
            "data.score_peak": 15,
        },
    )
    ToyTrainer(cfg).fit()
    again = ToyTrainer(cfg)  # finished: nothing to train, the bar is what it starts with
    again.fit()
    assert again._progress._fields["saved"] == "@20"
    assert again._progress._fields["best"].startswith("score=") and again._progress._fields["best"].endswith("@15")


def test_interrupted_and_preempted_say_the_same(tmp_path):
    from ckptkit.preemption import Interrupted, Preempted

    a = Interrupted(signal.SIGINT, 12, "runs/x/checkpoints/ckpt-12")
    b = Preempted(signal.SIGINT, 12, "runs/x/checkpoints/ckpt-12")
    assert str(a) == str(b) and "stopped by SIGINT at step 12" in str(a)
    assert b.code == 75 and isinstance(a, KeyboardInterrupt) and not isinstance(a, SystemExit)


def test_stop_exceptions_and_config_errors_cross_processes():
    """A sweep's job in a joblib worker hands its exception to the sweep by pickle; one that
    cannot be rebuilt there breaks the worker pool, which kills the other jobs mid-save."""
    import pickle

    import ckptkit
    from ckptkit.preemption import Interrupted, Preempted

    done = pickle.loads(pickle.dumps(Preempted(signal.SIGTERM, 5, "p", complete=True, detail="d")))
    assert (done.code, done.step, done.path, done.complete, done.detail) == (0, 5, "p", True, "d")
    stopped = pickle.loads(pickle.dumps(Preempted(signal.SIGTERM, 7, "q")))
    assert stopped.code == 75 and str(stopped) == str(Preempted(signal.SIGTERM, 7, "q"))
    assert pickle.loads(pickle.dumps(Interrupted(signal.SIGINT, 3, "r"))).step == 3
    err = pickle.loads(pickle.dumps(ckptkit.ConfigError("trainer.max_steps", "is bad")))
    assert err.key == "trainer.max_steps" and str(err) == "config key `trainer.max_steps`: is bad"


@pytest.mark.slow
def test_a_double_ctrl_c_during_a_save_says_one_thing_last(tmp_path):
    """Ctrl-C, then Ctrl-C again while the last save is being written (issue 31): the run exits
    130 at once, and its last line says so; no 'saved' line after it contradicts it."""
    from procs import ENV as TOY_ENV
    from procs import start

    from ckptkit.preemption import SECOND_CTRL_C

    args = ["trainer.max_steps=10", "trainer.eval_every_steps=null", "checkpoint.save_every_steps=5"]
    proc = start(tmp_path, *args, env=dict(TOY_ENV, TOY_PAUSE="final_save:5"))
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("PAUSE final_save"):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            break
    out = "".join(lines) + proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, out[-3000:]
    said = [line for line in out.splitlines() if line.strip()]
    assert said[-1] == SECOND_CTRL_C, out[-3000:]
    assert "Traceback" not in out
