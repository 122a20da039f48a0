"""strategy.kind mirrored (2 logical CPUs) and multi_worker (2 processes on localhost)."""

import os
import signal
import time

import numpy as np
import pytest
import tensorflow as tf
from conftest import ToyTrainer, make_cfg, steps_on_disk
from procs import finish, result_of, run, start_workers, wait_for_line

import ckptkit

MIRRORED = ["strategy.kind=mirrored", "strategy.cpu_devices=2"]
EXACT = [
    "trainer.deterministic=true",
    "model.kind=keras_list",
    "data.noise=0.05",
    "trainer.steps_per_loop=4",
    "checkpoint.save_every_steps=5",
]


@pytest.mark.slow
def test_mirrored_over_two_cpus_saves_and_resumes_exactly(tmp_path):
    code, out = run(tmp_path / "straight", "trainer.max_steps=30", *MIRRORED, *EXACT)
    assert code == 0, out[-3000:]
    assert "mirrored strategy: 2 replica(s)" in out
    straight = result_of(out)

    run_dir = tmp_path / "run"
    code, out = run(run_dir, "trainer.max_steps=20", *MIRRORED, *EXACT)
    assert code == 0, out[-3000:]
    saved = result_of(out)
    assert steps_on_disk(run_dir / "checkpoints")[-1] == 20

    # Resuming restores exactly the weights and optimizer state that were saved...
    code, out = run(run_dir, "trainer.max_steps=20", *MIRRORED, *EXACT)
    again = result_of(out)
    assert (again["resumed_from"], again["steps_run"]) == (20, 0)
    assert (again["model"], again["optimizer"]) == (saved["model"], saved["optimizer"])
    # ... also into a single-device trainer: the checkpoint does not depend on the strategy,
    code, out = run(run_dir, "trainer.max_steps=20", "strategy.kind=default", *EXACT)
    single = result_of(out)
    assert (single["resumed_from"], single["model"]) == (20, saved["model"]), out[-3000:]
    # ... and the resumed run ends exactly where the uninterrupted one did.
    code, out = run(run_dir, "trainer.max_steps=30", *MIRRORED, *EXACT)
    assert code == 0, out[-3000:]
    resumed = result_of(out)
    assert resumed["resumed_from"] == 20
    assert (resumed["model"], resumed["optimizer"]) == (straight["model"], straight["optimizer"])


@pytest.mark.slow
def test_two_replicas_train_like_one_device_on_the_same_global_batches(tmp_path):
    """Each replica takes half of every global batch and the loss is scaled by the global
    batch, so two replicas compute the one-device update (up to summation order)."""
    common = ["trainer.max_steps=20", "model.kind=module", "trainer.deterministic=true"]
    code, out = run(tmp_path / "one", *common)
    assert code == 0, out[-3000:]
    code, out2 = run(tmp_path / "two", *common, *MIRRORED)
    assert code == 0, out2[-3000:]
    one, two = result_of(out), result_of(out2)
    np.testing.assert_allclose(two["sums"], one["sums"], rtol=1e-4, atol=1e-5)


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _stopped_at(output):
    line = [x for x in output.splitlines() if "stopped by" in x]
    assert line, output[-3000:]
    return int(line[-1].split(" at step ")[1].split(";")[0])


@pytest.mark.slow
def test_two_workers_checkpoint_on_the_chief_stop_together_and_resume(tmp_path):
    run_dir = tmp_path / "run"
    ckpt_dir = run_dir / "checkpoints"
    common = ["trainer.max_steps=40", "trainer.log_every_steps=2", "trainer.eval_every_steps=10", *EXACT]
    slow = "data.step_sleep=0.04"

    # Train, save, kill both workers (kill -9, no warning).
    workers = start_workers(run_dir, *common, slow)
    chiefs = {workers[0].pid}
    wait_for_line(workers[0], "saved checkpoint")
    for w in workers:
        w.kill()
    finish(workers)
    assert steps_on_disk(ckpt_dir)

    # Relaunch: both resume from the chief's checkpoint. SIGTERM to the second worker
    # makes both save at the same step and exit 75.
    workers = start_workers(run_dir, *common, slow)
    chiefs.add(workers[0].pid)
    resumed = wait_for_line(workers[1], "resumed from")[-1]
    first = int(resumed.split(" at step ")[1])
    wait_for_line(workers[1], "/40  loss")  # trained on after resuming
    workers[1].send_signal(signal.SIGTERM)
    (code0, out0), (code1, out1) = finish(workers)
    assert (code0, code1) == (ckptkit.EXIT_PREEMPTED, ckptkit.EXIT_PREEMPTED), out0[-2000:] + out1[-2000:]
    stop = _stopped_at(out0)
    assert stop == _stopped_at(out1) and stop > first
    assert "stopped by another worker's preemption" in out0 and "stopped by SIGTERM" in out1
    assert steps_on_disk(ckpt_dir)[-1] == stop

    # A worker's leftover temporary directory (a crash mid-save) is removed at its start.
    os.makedirs(ckpt_dir / ".worker-1")
    (ckpt_dir / ".worker-1" / "ckpt-3.index").write_text("partial")

    workers = start_workers(run_dir, *common)
    chiefs.add(workers[0].pid)
    (code0, out0), (code1, out1) = finish(workers)
    assert (code0, code1) == (0, 0), out0[-3000:] + out1[-3000:]
    chief, other = result_of(out0), result_of(out1)
    assert chief["resumed_from"] == other["resumed_from"] == stop
    assert (chief["step"], chief["model"]) == (40, other["model"])

    # Only the chief wrote: its checkpoints, no worker directories, one set of logs.
    files = _files(run_dir)
    assert not [f for f in files if ".worker" in f], files
    assert steps_on_disk(ckpt_dir)[-1] == 40
    allowed = ("checkpoints/", "logs/", "ckptkit_run.yaml", ".ckptkit-run-id", ".ckptkit.lock")  # the chief's lock
    assert all(f.startswith(allowed) for f in files), files
    writers = {int(f.split(".")[-3]) for f in files if "tfevents" in f}  # events.out.tfevents.T.HOST.PID.N.v2
    assert writers and writers <= chiefs, (writers, chiefs)

    # Interrupted twice, the two workers end exactly where one uninterrupted process with
    # two replicas ends (the same global batches, split the same way).
    code, out = run(tmp_path / "mirrored", *common, *MIRRORED)
    assert code == 0, out[-3000:]
    assert result_of(out)["model"] == chief["model"]


def test_cpu_devices_after_tensorflow_started_is_a_config_error(tmp_path):
    tf.constant(1.0)  # this process's devices are initialized
    with pytest.raises(ckptkit.ConfigError, match="strategy.cpu_devices.*start a new process"):
        ToyTrainer(make_cfg(tmp_path, **{"strategy.kind": "mirrored", "strategy.cpu_devices": 3})).fit()


def test_multi_worker_with_a_broken_tf_config_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "{cluster: oops")
    with pytest.raises(ckptkit.ConfigError, match="TF_CONFIG is not JSON"):
        ToyTrainer(make_cfg(tmp_path, **{"strategy.kind": "multi_worker"})).fit()
    assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.slow
def test_workers_take_the_same_path_and_must_restore_the_same_state(tmp_path):
    """checkpoint.resume=never: every worker rebuilds with the chief (collectives in step),
    the chief moves the old checkpoints aside. Then a worker that cannot see the chief's
    checkpoints (its own run_dir) restores nothing while the chief restores step 20: both
    stop before training, naming what each restored."""
    common = ["trainer.max_steps=20", "trainer.eval_every_steps=null", "checkpoint.save_every_steps=10"]
    run_dir = tmp_path / "run"
    code, out = run(run_dir, *common)  # an earlier run to start over from
    assert code == 0, out[-3000:]
    (code0, out0), (code1, out1) = finish(start_workers(run_dir, *common, "checkpoint.resume=never"))
    assert (code0, code1) == (0, 0), out0[-3000:] + out1[-3000:]
    assert result_of(out0)["resumed_from"] is None and result_of(out1)["resumed_from"] is None
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("run")] == ["run"]
    assert len([p for p in run_dir.iterdir() if p.name.startswith("checkpoints-moved-")]) == 1
    assert steps_on_disk(run_dir / "checkpoints") == [10, 20]

    elsewhere = tmp_path / "node-local"
    (code0, out0), (code1, out1) = finish(
        start_workers(None, *common, "trainer.max_steps=30", run_dirs=[run_dir, elsewhere])
    )
    assert (code0, code1) == (1, 1), out0[-3000:] + out1[-3000:]
    for out in (out0, out1):
        assert "the workers did not restore the same state" in out, out[-3000:]
        assert "worker 0 restored step 20" in out and "worker 1 restored nothing (a fresh start)" in out
    assert steps_on_disk(run_dir / "checkpoints") == [10, 20]  # nothing trained


@pytest.mark.slow
def test_a_worker_whose_peers_never_come_up_gives_up_naming_them(tmp_path):
    proc = start_workers(tmp_path / "run", "strategy.connect_timeout_seconds=3", only=[0])[0]
    code, out = finish([proc], timeout=120)[0]
    assert code == 1, out[-3000:]
    assert "waiting for the 1 other task(s) of the cluster to connect (worker 1 at localhost:" in out
    assert "connect_timeout_seconds=3" in out and "not answering: worker 1 at localhost:" in out


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_worker_waiting_for_its_peers_ends_on_a_signal_at_once(tmp_path, signum):
    """(issue 27, item 7) TensorFlow waits for the other tasks in one C++ call, where no
    Python handler runs: SIGINT's default action ends the task at once (nothing is trained
    or written yet); a SIGTERM, which TensorFlow's own handler swallows there, reaches the
    watchdog process too and it ends the task the same way. The watchdog says why."""
    proc = start_workers(tmp_path / "run", "strategy.connect_timeout_seconds=600", only=[0])[0]
    lines = wait_for_line(proc, "waiting for the 1 other task(s) of the cluster to connect")
    time.sleep(1.0)  # inside MultiWorkerMirroredStrategy() by now
    children = [int(c) for c in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()]
    for pid in [proc.pid, *children]:  # the whole process group, as SLURM and a terminal signal it
        os.kill(pid, signum)
    signalled = time.monotonic()
    code, out = finish([proc], timeout=60)[0]
    assert time.monotonic() - signalled < 5, out[-3000:]
    assert code == -signal.SIGINT, ("".join(lines) + out)[-3000:]  # SIGTERM: TensorFlow's own handler swallows it
    assert "while waiting for the cluster's other tasks; nothing was trained or written" in out
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "nodes, per_node, procid, want",
    [
        ("gpu[01-02]", "1(x2)", 1, ({"worker": ["gpu01:8888", "gpu02:8888"]}, "worker", 1)),
        ("gpu01", "2", 0, ({"worker": ["gpu01:8888", "gpu01:8889"]}, "worker", 0)),
    ],
)
def test_a_multi_task_slurm_step_needs_no_tf_config(monkeypatch, nodes, per_node, procid, want):
    """The cluster of `srun --ntasks-per-node=N` comes from SLURM's own variables through
    TensorFlow's SlurmClusterResolver (no TF_CONFIG, no scontrol, no nvidia-smi)."""
    from ckptkit import distribute

    monkeypatch.delenv("TF_CONFIG", raising=False)
    for key, value in {
        "SLURM_JOB_ID": "77",
        "SLURM_PROCID": str(procid),
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_NODELIST": nodes,
        "SLURM_STEP_TASKS_PER_NODE": per_node,
    }.items():
        monkeypatch.setenv(key, value)
    assert distribute.slurm_tasks() == 2
    assert distribute._cluster(distribute.slurm_cluster_resolver()) == want


@pytest.mark.slow
def test_a_worker_that_loses_its_peer_says_which_and_where_to_resume(tmp_path):
    """kill -9 of worker 1 mid-run: worker 0 (TensorFlow's heartbeat notices within seconds)
    exits 1 with one message naming worker 1 and the last checkpoint."""
    workers = start_workers(
        tmp_path / "run",
        "trainer.max_steps=100000",
        "trainer.log_every_steps=10",
        "checkpoint.save_every_steps=20",
        "data.step_sleep=0.02",
    )
    wait_for_line(workers[0], "saved checkpoint")
    workers[1].kill()
    (code0, out0), _ = finish(workers, timeout=180)
    assert code0 == 75, out0[-3000:]  # trainer.exit_code_peer_lost: the same as a preemption's
    assert "worker 0 lost contact with worker 1" in out0 and "start every worker again" in out0, out0[-3000:]
    assert "The last checkpoint is" in out0


@pytest.mark.slow
def test_a_worker_that_loses_the_chief_names_the_newest_checkpoint_on_disk(tmp_path):
    """(issue 27, item 8) Worker 1's own list of checkpoints is the chief's at launch: after
    the chief dies, its message names the newest checkpoint as it is on disk now."""
    from ckptkit import metadata as metadata_lib

    workers = start_workers(
        tmp_path / "run",
        "trainer.max_steps=100000",
        "trainer.log_every_steps=10",
        "checkpoint.save_every_steps=20",
        "checkpoint.async_save=false",
        "data.step_sleep=0.02",
    )
    for _ in range(3):
        wait_for_line(workers[0], "saved checkpoint")
    workers[0].kill()
    _, (code1, out1) = finish(workers, timeout=180)
    newest = metadata_lib.scan(str(tmp_path / "run" / "checkpoints"))[-1]
    assert code1 == 75, out1[-3000:]
    assert "worker 1 lost contact with worker 0" in out1, out1[-3000:]
    assert f"The last checkpoint is {newest.path} (step {newest.step})" in out1, out1[-3000:]
