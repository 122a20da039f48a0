"""The digits example as a user runs it: a subprocess, launched twice, then `ckptkit ls`."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, own_project_block, steps_on_disk
from procs import run_command, wait_for_line

from ckptkit import cli, metadata

EXAMPLE = os.path.join(REPO, "examples", "digits.py")


def run_example(cwd, *overrides):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", HYDRA_FULL_ERROR="0")
    proc = run_command(
        [EXAMPLE, *overrides],
        cwd=cwd,
        env=env,
        timeout=600,
    )
    return proc.returncode, proc.stdout


def start_example(cwd, *overrides):
    """The example as a running process whose output is read line by line."""
    return subprocess.Popen(
        [sys.executable, EXAMPLE, *overrides],
        cwd=cwd,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        bufsize=1,
    )


@pytest.mark.slow
def test_digits_runs_end_to_end_and_resumes(tmp_path, capsys):
    overrides = [
        "trainer.max_steps=200",
        "trainer.eval_every_steps=100",
        "trainer.log_every_steps=100",
        "checkpoint.save_every_steps=100",
    ]
    code, first = run_example(tmp_path, *overrides)
    assert code == 0, first[-3000:]
    run_dir = tmp_path / "runs" / "digits"
    assert "training digits from step 0 to 200" in first
    assert (run_dir / ".hydra" / "config.yaml").exists()
    ckpts = metadata.scan(str(run_dir / "checkpoints"))
    assert [c.step for c in ckpts][-1] == 200
    assert all(c.metrics and "accuracy" in c.metrics for c in ckpts)
    assert (run_dir / "export" / "1" / "saved_model.pb").exists()
    assert os.listdir(run_dir / "logs" / "train") and os.listdir(run_dir / "logs" / "eval")
    assert "export check passed" in first
    assert "\x1b[" not in first  # in a pipe: plain log lines, no progress bar or colours

    code, second = run_example(tmp_path, *overrides)
    assert code == 0, second[-3000:]
    assert "resumed from runs/digits/checkpoints/ckpt-200 at step 200" in second
    assert "already finished" in second and "nothing to train" in second
    assert sorted(os.listdir(run_dir / "export")) == ["1"]

    assert cli.main(["ls", str(run_dir)]) == 0
    table = capsys.readouterr().out
    assert "best by accuracy (max)" in table
    last = [line for line in table.splitlines() if line.startswith("200 ")]
    assert last and "latest" in last[0]
    assert "best" in table.split("marks", 1)[1]


@pytest.mark.slow
def test_a_typo_on_the_command_line_is_named(tmp_path):
    code, bad = run_example(tmp_path, "trainer.max_step=5")
    assert code != 0
    assert "max_step" in bad and "Traceback" not in bad
    assert not (tmp_path / "runs").exists()


def test_ls_on_a_directory_without_checkpoints_is_one_line(tmp_path, capsys):
    assert cli.main(["ls", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ckptkit: error: no checkpoints in") and err.count("\n") == 1


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    assert "ls" in capsys.readouterr().out


@pytest.mark.slow
def test_transfer_example_pretrains_and_fine_tunes(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = run_command(
        [
            os.path.join(REPO, "examples", "transfer.py"),
            "trainer.max_steps=100",
            "finetune.max_steps=60",
            "trainer.eval_every_steps=50",
            "checkpoint.save_every_steps=50",
        ],
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    out = proc.stdout
    assert "pretrained on [0, 1, 2, 3, 4]" in out and "fine-tuned on [5, 6, 7, 8, 9]" in out
    assert "restored: model/backbone/0/bias, model/backbone/0/kernel" in out
    assert "skipped by selection (kept fresh): model/head/bias, model/head/kernel" in out
    assert (tmp_path / "runs" / "transfer-finetune" / "export" / "1" / "saved_model.pb").exists()


@pytest.mark.slow
def test_a_sweep_interrupted_and_relaunched_finishes_every_job_in_its_own_directory(tmp_path):
    sweep = [
        "-m",
        "optim.lr=1e-3,3e-3",
        "trainer.max_steps=2000",
        "trainer.eval_every_steps=500",
        "trainer.log_every_steps=500",
        "checkpoint.save_every_steps=500",
    ]
    proc = start_example(tmp_path, *sweep)
    wait_for_line(proc, "saved checkpoint")  # the first job is training
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-3000:]  # the sweep stops after the job's save
    # A job's directory is named by its overrides (all but those excluded in digits.yaml).
    named = "checkpoint.save_every_steps=500,optim.lr={},trainer.eval_every_steps=500"
    jobs = [tmp_path / "runs" / "digits" / named.format(lr) for lr in ("0.001", "0.003")]
    interrupted = steps_on_disk(jobs[0] / "checkpoints")[-1]
    assert 0 < interrupted < 2000

    # Relaunched with the joblib launcher (the jobs run in parallel processes); max_steps is
    # not part of a job's directory name (configs/digits.yaml), so the jobs are the same.
    code, out = run_example(tmp_path, *sweep, "hydra/launcher=joblib")
    assert code == 0, out[-3000:]
    assert f"resumed from {jobs[0] / 'checkpoints' / f'ckpt-{interrupted}'}".replace(str(tmp_path) + "/", "") in out
    for job in jobs:
        assert steps_on_disk(job / "checkpoints")[-1] == 2000
        assert (job / ".hydra" / "config.yaml").exists() and (job / "export" / "1").is_dir()
    assert sorted(p for p in (tmp_path / "runs" / "digits").iterdir() if p.is_dir()) == jobs


def test_the_slurm_launcher_config_composes(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = run_command(
        [EXAMPLE, "hydra/launcher=slurm", "--cfg", "hydra"],
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "SlurmLauncher" in proc.stdout and "signal_delay_s: 180" in proc.stdout
    assert not os.listdir(tmp_path)  # composing writes nothing


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, says",
    [
        ("trainer.max_steps=-5", "config key `trainer.max_steps`"),
        ("checkpoint.init_from.path={tmp}/nowhere", "nowhere"),
    ],
)
def test_ckptkit_errors_are_one_message_without_a_traceback(tmp_path, override, says):
    """Under @hydra.main a ckptkit error prints its message, no traceback, exit status 1;
    a missing warm-start source is refused before anything is built or traced."""
    code, out = run_example(tmp_path, override.format(tmp=tmp_path))
    assert code == 1, out[-3000:]
    assert "Traceback" not in out and says.format(tmp=tmp_path) in out, out[-3000:]
    assert "building" not in out.lower() and "training digits" not in out, out[-3000:]


@pytest.mark.slow
def test_your_own_project_from_the_readme_runs_outside_the_repository(tmp_path):
    """The README's two files in an empty directory: ckptkit's groups come from the
    installed package (ConfigStore), not from this repository's configs/."""
    (tmp_path / "config.yaml").write_text(own_project_block("# Your own project", "yaml"))
    (tmp_path / "train.py").write_text(own_project_block("`train.py`, next to it:", "python"))
    env = dict(os.environ, HYDRA_FULL_ERROR="1")
    proc = run_command(
        ["train.py", "export.verify=false"],
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    run_dir = tmp_path / "runs" / "my-model"
    assert steps_on_disk(run_dir / "checkpoints")[-1] == 300
    assert (run_dir / ".hydra" / "config.yaml").exists() and (run_dir / "export" / "1" / "saved_model.pb").exists()
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_hydra_job_chdir_keeps_the_run_where_it_was_launched(tmp_path):
    """With hydra.job.chdir=true Hydra moves the working directory to its output directory;
    a relative run_dir still means <launch dir>/runs/digits, so the same command resumes.
    Hydra's output directory elsewhere than the run directory is warned about."""
    code, out = run_example(
        tmp_path,
        "hydra.job.chdir=true",
        "hydra.run.dir=hydra-out",
        "trainer.max_steps=50",
        "trainer.eval_every_steps=50",
        "checkpoint.save_every_steps=50",
        "export.enabled=false",
    )
    assert code == 0, out[-3000:]
    assert steps_on_disk(tmp_path / "runs" / "digits" / "checkpoints") == [50]
    assert not (tmp_path / "hydra-out" / "runs").exists()
    assert "Hydra writes its own files of this run" in out and "hydra-out" in out


@pytest.mark.slow
def test_refused_launches_leave_the_runs_record_and_log_alone(tmp_path):
    """Hydra writes .hydra/config.yaml and opens the job log before the script runs; a launch
    ckptkit refuses (locked by a live launch; max_steps below the step on disk) must leave
    both as the accepted launch wrote them."""
    from ckptkit.runlock import RunLock

    base = ["trainer.eval_every_steps=50", "checkpoint.save_every_steps=50", "export.enabled=false"]
    code, out = run_example(tmp_path, "trainer.max_steps=50", *base)
    assert code == 0, out[-3000:]
    run_dir = tmp_path / "runs" / "digits"
    record = (run_dir / ".hydra" / "config.yaml").read_text()
    log_file = run_dir / "digits.log"
    logged = log_file.read_text()
    assert "max_steps: 50" in record and "training digits from step 0 to 50" in logged
    lock = RunLock(str(run_dir)).acquire()  # a live launch holds the run
    try:
        code, out = run_example(tmp_path, "trainer.max_steps=70", *base)
    finally:
        lock.release()
    assert code == 1 and "Traceback" not in out, out[-3000:]
    code, out = run_example(tmp_path, "trainer.max_steps=20", *base)
    assert code == 1 and "below step 50" in out, out[-3000:]
    assert (run_dir / ".hydra" / "config.yaml").read_text() == record
    assert log_file.read_text() == logged


@pytest.mark.slow
def test_run_dir_on_an_object_store_end_to_end(tmp_path):
    """run_dir=ram://... (TensorFlow's in-memory filesystem, the stand-in for gs://): ckptkit's
    files go to the URL, checkpoints and the checked export included; Hydra's own files go to
    outputs/ram/... locally, not to a directory named 'ram:'."""
    code, out = run_example(
        tmp_path,
        "run_dir=ram://runs/digits",
        "trainer.max_steps=100",
        "trainer.eval_every_steps=100",
        "checkpoint.save_every_steps=100",
    )
    assert code == 0, out[-3000:]
    assert "saved checkpoint ram://runs/digits/checkpoints/ckpt-100" in out
    assert "exported SavedModel version 1 to ram://runs/digits/export/1" in out
    assert (tmp_path / "outputs" / "ram" / "runs" / "digits" / ".hydra" / "config.yaml").exists()
    assert not (tmp_path / "ram:").exists() and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_sigterm_to_a_joblib_sweep_stops_every_job_and_starts_no_queued_one(tmp_path):
    """(issue 27, item 6) Three jobs on two joblib workers: SIGTERM to the sweep process
    reaches the two running jobs, which save and stop; the queued third one, handed to a
    freed worker (the same pid as a job already stopped), exits 75 without training; the
    sweep exits 75 within its bound and leaves no lock held. The same sweep, launched again,
    finishes all three."""
    from ckptkit import runlock

    sweep = [
        "-m",
        "optim.lr=1e-3,3e-3,1e-2",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "trainer.log_every_steps=200",
        "trainer.eval_every_steps=null",
        "checkpoint.save_every_steps=100000",
        "export.enabled=false",
    ]
    proc = start_example(tmp_path, *sweep, "trainer.max_steps=100000")
    lines = wait_for_line(proc, "step 200/100000")
    lines += wait_for_line(proc, "step 200/100000")  # both running jobs have trained
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    out, _ = proc.communicate(timeout=300)
    out = "".join(lines) + out
    assert proc.returncode == 75, out[-3000:]
    assert time.monotonic() - signalled < 120
    assert out.count("stopped by SIGTERM at step") == 2, out[-3000:]
    jobs = sorted(p for p in (tmp_path / "runs" / "digits").iterdir() if p.is_dir() and "optim.lr" in p.name)
    for job in jobs:  # saved where it stopped, or never trained
        claim = runlock.current_claim(str(job))
        assert claim is None or claim.released, job
        saved = steps_on_disk(job / "checkpoints") if (job / "checkpoints").exists() else []
        assert saved and saved[-1] >= 200 or not saved, (job, saved)
    assert "saved and stopped" in out
    if len(jobs) == 3:  # the queued job reached a worker before the sweep exited
        assert "this job did not start" in out, out[-3000:]
    target = 50 + max(steps_on_disk(j / "checkpoints")[-1] for j in jobs if (j / "checkpoints").exists())
    code, out = run_example(tmp_path, *sweep, f"trainer.max_steps={target}")
    assert code == 0, out[-3000:]
    jobs = sorted(p for p in (tmp_path / "runs" / "digits").iterdir() if p.is_dir() and "optim.lr" in p.name)
    assert len(jobs) == 3 and all(steps_on_disk(j / "checkpoints")[-1] == target for j in jobs)


@pytest.mark.slow
def test_a_sweep_of_the_own_project_resumes_every_job_with_more_steps(tmp_path):
    """The README's own project, unchanged: ckptkit's Hydra defaults (from `trainer: default`)
    give each sweep job its directory and leave trainer.max_steps out of its name, so the
    same sweep with more steps resumes both jobs (issue 31)."""
    (tmp_path / "config.yaml").write_text(own_project_block("# Your own project", "yaml"))
    (tmp_path / "train.py").write_text(own_project_block("`train.py`, next to it:", "python"))

    def sweep(steps):
        proc = run_command(
            ["train.py", "-m", "optim.lr=0.01,0.02", f"trainer.max_steps={steps}", "export.enabled=false"],
            cwd=tmp_path,
            env=dict(os.environ, HYDRA_FULL_ERROR="1"),
        )
        assert proc.returncode == 0, proc.stdout[-3000:]
        return proc.stdout

    sweep(20)
    out = sweep(40)
    for lr in ("0.01", "0.02"):
        job = tmp_path / "runs" / "my-model" / f"export.enabled=False,optim.lr={lr}"
        assert steps_on_disk(job / "checkpoints")[-1] == 40 and (job / ".hydra" / "config.yaml").exists()
    assert out.count("resumed from") == 2 and out.count("at step 20") >= 2, out[-3000:]
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_run_dir_that_is_a_file_is_one_message(tmp_path):
    (tmp_path / "config.yaml").write_text(own_project_block("# Your own project", "yaml"))
    (tmp_path / "train.py").write_text(own_project_block("`train.py`, next to it:", "python"))
    proc = run_command(
        ["train.py", "run_dir=train.py"],
        cwd=tmp_path,
        env=dict(os.environ, HYDRA_FULL_ERROR="0"),
        timeout=600,
    )
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
    assert "config key `run_dir`: is train.py, which is a file: give run_dir a directory's path" in proc.stdout


@pytest.mark.slow
def test_the_cli_hides_tensorflows_start_up_lines_and_logs_each_line_once(tmp_path):
    """`ckptkit ls/inspect/export` with TF_CPP_MIN_LOG_LEVEL=2 (issue 31): none of
    TensorFlow's C++ start-up lines, each log line once, and the export check announced."""
    from conftest import ToyTrainer, make_cfg

    run = tmp_path / "run"
    ToyTrainer(make_cfg(run, **{"trainer.max_steps": 5})).fit()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    outputs = {}
    for command in (["ls", str(run)], ["inspect", str(run)], ["export", str(run)]):
        proc = run_command(
            ["-m", "ckptkit.cli", *command],
            cwd=REPO,
            env=env,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout[-3000:]
        noise = [line for line in proc.stdout.splitlines() if line.startswith(("I0000", "W0000", "WARNING: All log"))]
        assert not noise and "cuInit" not in proc.stdout, proc.stdout[-3000:]
        outputs[command[0]] = proc.stdout
    export = outputs["export"]
    assert export.count("exported SavedModel version 1") == 1, export
    assert "export check: serving" in export and "with TensorFlow's session loader in a fresh process" in export


def test_ls_marks_a_checkpoint_whose_size_changed_since_it_was_saved(tmp_path, capsys):
    from conftest import ToyTrainer, make_cfg

    run = tmp_path / "run"
    ToyTrainer(make_cfg(run, **{"trainer.max_steps": 10, "checkpoint.save_every_steps": 5})).fit()
    data = run / "checkpoints" / "ckpt-10.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:-100])  # a truncated newest checkpoint
    assert cli.main(["ls", str(run)]) == 0
    out, err = capsys.readouterr()
    row = next(line for line in out.splitlines() if line.startswith("10 "))
    assert "latest,SIZE-CHANGED" in row
    assert next(line for line in out.splitlines() if line.startswith("5 ")).endswith("-")
    assert f"warning: {run / 'checkpoints' / 'ckpt-10'}: " in err and "bytes on disk" in err and "when saved" in err
