"""Exact resume and preemption, in real subprocesses with real signals."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
from conftest import ToyTrainer, make_cfg, steps_on_disk
from procs import ENV, TOY_RUN, result_of, run, start, wait_for_line

import ckptkit
from ckptkit import metadata, runlock

DETERMINISTIC = [
    "trainer.deterministic=true",
    "model.kind=keras_list",
    "data.noise=0.05",
    "trainer.eval_every_steps=null",
    "trainer.steps_per_loop=4",
    "checkpoint.save_every_steps=3",
]


@pytest.mark.slow
def test_interrupted_and_resumed_runs_end_bit_identical(tmp_path):
    """Stops at steps 5 (mid-epoch: 6 batches an epoch), 13 and 22 of 30, with a shuffled
    dataset, Dropout and the trainer's random generator in use."""
    code, out = run(tmp_path / "straight", "trainer.max_steps=30", *DETERMINISTIC)
    assert code == 0, out[-3000:]
    straight = result_of(out)
    for stop in (5, 13, 22, 30):
        code, out = run(tmp_path / "pieces", f"trainer.max_steps={stop}", *DETERMINISTIC)
        assert code == 0, out[-3000:]
    pieces = result_of(out)
    assert pieces["resumed_from"] == 22 and pieces["step"] == 30
    assert pieces["model"] == straight["model"]
    assert pieces["optimizer"] == straight["optimizer"]


SLOW = [
    "trainer.max_steps=100000",
    "trainer.steps_per_loop=1000",
    "trainer.log_every_steps=1000",
    "trainer.eval_every_steps=null",
    "checkpoint.save_every_steps=null",
    "data.step_sleep=0.005",
]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1])
def test_signal_saves_at_the_step_reached_and_resume_loses_nothing(tmp_path, signum):
    proc = start(tmp_path, *SLOW)
    wait_for_line(proc, "training toy from step 0")
    time.sleep(1.5)
    sent = time.time()
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=60)
    assert time.time() - sent < 20, "a 1000-step loop must not delay the save"
    assert proc.returncode == ckptkit.EXIT_PREEMPTED, out[-3000:]
    stopped = [line for line in out.splitlines() if "stopped by" in line]
    assert stopped and signal.Signals(signum).name in stopped[0]
    step = int(stopped[0].split(" at step ")[1].split(";")[0])
    assert 0 < step < 1000  # the loop was cut short, not run to its end
    assert [c.step for c in metadata.scan(str(tmp_path / "checkpoints"))] == [step]
    code, out = run(tmp_path, *[o.replace("100000", str(step + 7)) for o in SLOW])
    assert code == 0, out[-3000:]
    resumed = result_of(out)
    assert resumed["resumed_from"] == step and resumed["steps_run"] == 7


@pytest.mark.slow
def test_under_nohup_sighup_is_still_ignored(tmp_path):
    """A run started with SIGHUP ignored (``nohup``) was asked to outlive its terminal."""
    overrides = [o.replace("100000", "400") for o in SLOW]
    proc = subprocess.Popen(  # what nohup does before it runs the command
        [sys.executable, TOY_RUN, str(tmp_path), *overrides],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
    )
    wait_for_line(proc, "training toy from step 0")
    time.sleep(0.5)
    proc.send_signal(signal.SIGHUP)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "stopped by" not in out and result_of(out)["step"] == 400


@pytest.mark.slow
def test_a_handler_installed_before_the_run_gets_the_signal_after_the_save(tmp_path):
    """A scheduler helper's handler (submitit requeues a SLURM job on SIGUSR2) runs once the
    checkpoint is on disk; here it records the newest checkpoint and exits with code 3."""
    marker = tmp_path / "requeued"
    proc = start(tmp_path / "run", *SLOW, f"data.chain_marker={marker}")
    wait_for_line(proc, "training toy from step 0")
    time.sleep(1.0)
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3, out[-3000:]
    assert "passing SIGUSR2 on to the handler installed before the run" in out
    steps = [c.step for c in metadata.scan(str(tmp_path / "run" / "checkpoints"))]
    assert steps and marker.read_text() == f"newest checkpoint: {steps[-1]}"


@pytest.mark.slow
def test_second_ctrl_c_exits_at_once(tmp_path):
    slow_steps = [o.replace("0.005", "0.5") for o in SLOW]  # a step takes half a second
    proc = start(tmp_path, *slow_steps)
    wait_for_line(proc, "training toy from step 0")
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    wait_for_line(proc, "SIGINT received")
    sent = time.time()
    proc.send_signal(signal.SIGINT)  # while the step in progress still runs
    proc.communicate(timeout=60)
    assert proc.returncode == ckptkit.EXIT_INTERRUPTED
    assert time.time() - sent < 0.45
    code, out = run(tmp_path, *[o.replace("100000", "20") for o in SLOW])  # still resumable
    assert code == 0, out[-3000:]


@pytest.mark.slow
def test_kill_9_at_random_instants_always_resumes(tmp_path):
    """6 SIGKILLs at random instants of a run that saves every 4 steps: each relaunch
    resumes from the newest checkpoint that was complete, losing at most one save period,
    and the run then finishes with exactly the weights of an uninterrupted run.

    Each instant is measured from the launch's "training from" line or, every other kill,
    from its first save, so that some kills fall after a save however loaded the machine."""
    rng = random.Random(1234)
    common = [
        "trainer.max_steps=1500",
        "trainer.steps_per_loop=2",
        "trainer.log_every_steps=2",
        "trainer.eval_every_steps=null",
        "checkpoint.save_every_steps=4",
        "checkpoint.max_to_keep=2",
        "data.step_sleep=0.004",
        "trainer.deterministic=true",
    ]
    code, out = run(tmp_path / "straight", *common)
    assert code == 0, out[-3000:]
    straight = result_of(out)
    run_dir = tmp_path / "killed"
    kills = 0
    while kills < 6:
        proc = start(run_dir, *common)
        lines = wait_for_line(proc, "training toy from step")
        if kills % 2:
            lines += wait_for_line(proc, "saved checkpoint")
        time.sleep(rng.uniform(0.0, 0.8))
        proc.kill()
        out, _ = proc.communicate(timeout=60)
        kills += 1
        text = "".join(lines) + out
        reached = [int(line.split("step ")[1].split("/")[0]) for line in text.splitlines() if "] step " in line]
        on_disk = [c.step for c in metadata.scan(str(run_dir / "checkpoints"))]
        if reached and on_disk:
            # A save happens every 4 steps, the loop logs every 2: what is on disk is at most
            # one save period (plus the save in flight) behind the last step logged.
            assert max(on_disk) >= max(reached) - 2 * 4, (reached[-3:], on_disk)
        # Whatever the kill interrupted, the directory lists only complete checkpoints.
        for step in on_disk:
            assert (run_dir / "checkpoints" / f"ckpt-{step}.index").exists()
    code, out = run(run_dir, *common)
    assert code == 0, out[-3000:]
    final = result_of(out)
    # The last relaunch resumes from the newest complete checkpoint the kills left (whether
    # the last killed launch got to save depends on where its kill fell: 0.3-0.5 s pass
    # between "training from" and the first save of a relaunch on this machine).
    assert on_disk, "no kill fell after a save"
    assert kills == 6 and final["step"] == 1500 and final["resumed_from"] == on_disk[-1] > 0
    assert final["model"] == straight["model"] and final["optimizer"] == straight["optimizer"]


# --- damaged run directories (in-process) -------------------------------------------------


def _three_checkpoints(tmp_path):
    cfg = make_cfg(
        tmp_path / "run",
        **{
            "trainer.max_steps": 15,
            "trainer.eval_every_steps": None,
            "checkpoint.save_every_steps": 5,
            "checkpoint.max_to_keep": None,
        },
    )
    ToyTrainer(cfg).fit()
    return cfg, tmp_path / "run" / "checkpoints"


def test_truncated_newest_data_falls_back_to_the_previous_checkpoint(tmp_path, caplog):
    cfg, d = _three_checkpoints(tmp_path)
    data = d / "ckpt-15.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:60])
    cfg["trainer"]["max_steps"] = 20
    with caplog.at_level("WARNING", logger="ckptkit"):
        result = ToyTrainer(cfg).fit()
    assert result.resumed_from == 10 and result.step == 20
    assert "ckpt-15 is unreadable" in caplog.text and "falling back" in caplog.text


def test_missing_index_is_reported_and_skipped(tmp_path, caplog):
    cfg, d = _three_checkpoints(tmp_path)
    (d / "ckpt-15.index").unlink()
    with caplog.at_level("WARNING", logger="ckptkit"):
        result = ToyTrainer(cfg).fit()
    assert result.resumed_from == 10
    assert "ckpt-15.data-00000-of-00001" in caplog.text


def test_garbage_state_file_and_metadata_are_named_and_survived(tmp_path, caplog):
    cfg, d = _three_checkpoints(tmp_path)
    (d / "checkpoint").write_text("this is { not a proto")
    (d / "metadata.json").write_text("[1, 2")
    cfg["trainer"]["max_steps"] = 20
    with caplog.at_level("WARNING", logger="ckptkit"):
        result = ToyTrainer(cfg).fit()
    assert result.resumed_from == 15 and result.step == 20
    assert str(d / "checkpoint") in caplog.text and str(d / "metadata.json") in caplog.text
    import tensorflow as tf

    assert tf.train.latest_checkpoint(str(d)).endswith("ckpt-20")  # rewritten by the next save


def test_nothing_readable_is_a_clear_error(tmp_path):
    cfg, d = _three_checkpoints(tmp_path)
    for f in d.glob("ckpt-*.data-*"):
        f.write_bytes(b"")
    for mode in ("auto", "must"):
        cfg["checkpoint"]["resume"] = mode
        with pytest.raises(ckptkit.CheckpointUnreadableError, match="none of the 3 checkpoint"):
            ToyTrainer(cfg).fit()
    assert sorted(p.name for p in d.glob("*.index")) == ["ckpt-10.index", "ckpt-15.index", "ckpt-5.index"]


def test_config_drift_is_reported_and_shape_changes_refused(tmp_path, caplog):
    cfg, _ = _three_checkpoints(tmp_path)
    cfg["optim"]["lr"] = 0.02
    cfg["trainer"]["max_steps"] = 20
    with caplog.at_level("WARNING", logger="ckptkit"):
        assert ToyTrainer(cfg).fit().resumed_from == 15
    assert "optim.lr: 0.01 -> 0.02" in caplog.text
    cfg["model"]["hidden"] = 16
    with pytest.raises(ckptkit.CheckpointMismatchError) as err:
        ToyTrainer(cfg).fit()
    assert "model.hidden: 8 -> 16" in str(err.value) and "checkpoint.resume=never" in str(err.value)


def test_rng_best_and_elapsed_time_are_checkpointed(tmp_path):
    cfg = make_cfg(
        tmp_path / "run",
        **{
            "trainer.max_steps": 10,
            "trainer.eval_every_steps": 5,
            "checkpoint.best.metric": "score",
            "checkpoint.best.mode": "max",
            "data.score_peak": 5,
            "data.noise": 0.1,
        },
    )
    first = ToyTrainer(cfg)
    r1 = first.fit()
    state = first.rng.state.numpy()
    cfg["trainer"]["max_steps"] = 10
    second = ToyTrainer(cfg)
    r2 = second.fit()
    assert (second.rng.state.numpy() == state).all()
    assert second.train_state.best() == (0.0, 5)
    assert r2.elapsed_seconds == pytest.approx(r1.elapsed_seconds) and r1.elapsed_seconds > 0


@pytest.mark.slow
def test_submitit_local_executor_requeues_after_the_save(tmp_path, monkeypatch):
    """submitit's own timeout signal (SIGUSR2) to a job: ckptkit saves at the step reached,
    then hands the signal to submitit's handler, which requeues the job; the requeued job
    resumes from that checkpoint and finishes."""
    submitit = pytest.importorskip("submitit")
    from submitit_job import ToyJob

    monkeypatch.setenv("PYTHONPATH", os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    executor = submitit.LocalExecutor(folder=str(tmp_path / "submitit"))
    executor.update_parameters(timeout_min=10)
    run_dir = str(tmp_path / "run")
    overrides = {
        "trainer.max_steps": 300,
        "trainer.steps_per_loop": 2,
        "trainer.eval_every_steps": None,
        "checkpoint.save_every_steps": 1000,
        "data.step_sleep": 0.02,
    }
    job = executor.submit(ToyJob(), run_dir, overrides)
    deadline = time.time() + 120
    while time.time() < deadline and not os.path.exists(os.path.join(run_dir, "ckptkit_run.yaml")):
        time.sleep(0.2)
    time.sleep(1.0)  # training
    pid = runlock.current_claim(run_dir).record["pid"]  # the training process
    os.kill(pid, signal.SIGUSR2)  # what SLURM sends signal_delay_s before the time limit
    result = job.result()
    saved = [c.step for c in metadata.scan(os.path.join(run_dir, "checkpoints"))]
    assert result["step"] == 300 and 0 < result["resumed_from"] < 300, result
    assert result["resumed_from"] in saved


def _plain_manager_run(run, by_step, steps=7, **overrides):
    """A project before ckptkit: its model and optimizer trained `steps` steps, saved with a
    plain tf.train.CheckpointManager into <run>/checkpoints, numbered by step or by save."""
    import tensorflow as tf

    before = ToyTrainer(make_cfg(run, **overrides))
    before.build()
    before._train_fn(steps)
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(model=before.model, optimizer=before.optimizer), str(run / "checkpoints"), max_to_keep=3
    )
    return manager.save(checkpoint_number=steps if by_step else None)


@pytest.mark.parametrize("by_step", [True, False], ids=["numbered_by_step", "numbered_by_save"])
def test_a_plain_checkpoint_manager_directory_is_adopted(tmp_path, caplog, by_step):
    import tensorflow as tf

    run = tmp_path / "run"
    plain = _plain_manager_run(run, by_step)
    assert plain.endswith("ckpt-7" if by_step else "ckpt-1")
    with caplog.at_level("WARNING", logger="ckptkit"):
        result = ToyTrainer(make_cfg(run, **{"trainer.max_steps": 12, "checkpoint.save_every_steps": 100})).fit()
    assert result.resumed_from is None and result.warm_start is not None and result.step == 12
    assert "was written by a plain tf.train.CheckpointManager: adopted" in caplog.text
    assert "step 7, the optimizer's iteration count" in caplog.text and "start fresh" in caplog.text
    assert steps_on_disk(run / "checkpoints") == [7, 12]
    aside = [p for p in tmp_path.joinpath("run").iterdir() if p.name.startswith("checkpoints-checkpointmanager-")]
    assert len(aside) == 1 and (aside[0] / os.path.basename(plain)).with_suffix(".index").exists()
    # The adopted checkpoint holds the plain one's model and optimizer, bit for bit.
    old = tf.train.load_checkpoint(str(aside[0] / os.path.basename(plain)))
    new = tf.train.load_checkpoint(str(run / "checkpoints" / "ckpt-7"))
    shared = [k for k in old.get_variable_to_shape_map() if k.startswith(("model/", "optimizer/"))]
    assert len(shared) > 4
    for key in shared:
        assert (old.get_tensor(key) == new.get_tensor(key)).all(), key
    assert ToyTrainer(make_cfg(run, **{"trainer.max_steps": 12})).fit().resumed_from == 12


def test_a_plain_checkpoint_manager_directory_that_does_not_fit_is_refused_with_the_command(tmp_path):
    run = tmp_path / "run"
    _plain_manager_run(run, True, **{"model.hidden": 16})
    before = sorted(os.listdir(run / "checkpoints"))
    with pytest.raises(ckptkit.CheckpointMismatchError) as err:
        ToyTrainer(make_cfg(run, **{"trainer.max_steps": 12})).fit()
    message = str(err.value)
    first = message.splitlines()[0]
    assert first.startswith(f"{run / 'checkpoints'} was written by a plain tf.train.CheckpointManager")
    assert "Nothing was moved" in message and "checkpoint.init_from.path=" in message
    assert "checkpoint.init_from.optimizer=true" in message and "mv " in message
    assert sorted(n for n in os.listdir(run / "checkpoints") if n.startswith("ckpt-")) == [
        n for n in before if n.startswith("ckpt-")
    ]
