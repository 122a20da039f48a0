"""The digits example as a user runs it: a subprocess, launched twice, then `ckptkit ls`."""

import os
import subprocess
import sys

import pytest

from ckptkit import cli, metadata

from conftest import REPO

EXAMPLE = os.path.join(REPO, "examples", "digits.py")


def run_example(cwd, *overrides):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", HYDRA_FULL_ERROR="0")
    proc = subprocess.run([sys.executable, EXAMPLE, *overrides], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    return proc.returncode, proc.stdout


@pytest.mark.slow
def test_digits_runs_end_to_end_and_resumes(tmp_path, capsys):
    overrides = ["trainer.max_steps=200", "trainer.eval_every_steps=100", "trainer.log_every_steps=100",
                 "checkpoint.save_every_steps=100"]
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
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "examples", "transfer.py"), "trainer.max_steps=100",
         "finetune.max_steps=60", "trainer.eval_every_steps=50", "checkpoint.save_every_steps=50"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    out = proc.stdout
    assert "pretrained on [0, 1, 2, 3, 4]" in out and "fine-tuned on [5, 6, 7, 8, 9]" in out
    assert "restored: model/backbone/0/_kernel, model/backbone/0/bias" in out
    assert "skipped by selection (kept fresh): model/head/_kernel, model/head/bias" in out
    assert (tmp_path / "runs" / "transfer-finetune" / "export" / "1" / "saved_model.pb").exists()
