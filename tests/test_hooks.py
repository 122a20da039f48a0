"""A newcomer's own hook mistakes, launched for real (issue 31): the README's own project
with one mistake each; every one is refused before training in a few lines naming the hook,
with no traceback."""

import os

import pytest
from conftest import own_project_block
from procs import run_command

EVAL = """
    def eval_dataset(self):
        return self.train_dataset().take(EVAL_BATCHES)

    def eval_step(self, batch):
        x, y = batch
        return {"mse": tf.reduce_mean(tf.square(self.model(x) - y))}
"""

MISTAKES = {
    "two hooks missing": (
        lambda src: _without_method(_without_method(src, "build_optimizer"), "train_step"),
        [],
        "MyTrainer does not override build_optimizer() and train_step(), which every Trainer must",
    ),
    "train_step returns the loss tensor": (
        lambda src: src.replace('return {"loss": loss}', "return loss"),
        [],
        "train_step() returned a tensor; return a dict of scalar metrics such as {'loss': loss}",
    ),
    "an empty eval dataset": (
        lambda src: _add_methods(src, EVAL.replace("EVAL_BATCHES", "0")),
        [],
        "eval_dataset() yielded no batch: it is empty",
    ),
    "a best metric eval does not return": (
        lambda src: _add_methods(src, EVAL.replace("EVAL_BATCHES", "2")),
        ["checkpoint.best.metric=accuracy"],
        "config key `checkpoint.best.metric`: 'accuracy' is not among the metrics eval_step() returns (mse)",
    ),
}


def _without_method(src: str, name: str) -> str:
    start = src.index(f"    def {name}(")
    end = src.find("\n    def ", start + 1)
    end = end if end != -1 else src.index("\n\n\n", start)
    return src[:start] + src[end + 1 :]


def _add_methods(src: str, methods: str) -> str:
    at = src.index("    def train_step(")
    return src[:at] + methods.lstrip("\n") + "\n" + src[at:]


@pytest.mark.slow
@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_each_hook_mistake_is_a_few_lines_naming_it(tmp_path, mistake):
    edit, overrides, says = MISTAKES[mistake]
    (tmp_path / "config.yaml").write_text(own_project_block("# Your own project", "yaml"))
    src = edit(own_project_block("`train.py`, next to it:", "python"))
    (tmp_path / "train.py").write_text(src)
    proc = run_command(
        ["train.py", "export.verify=false", *overrides],
        cwd=tmp_path,
        env=dict(os.environ, HYDRA_FULL_ERROR="0"),
        timeout=600,
    )
    out = proc.stdout
    assert proc.returncode == 1, out[-3000:]
    assert says in out, out[-3000:]
    assert "Traceback" not in out and "in user code" not in out, out[-3000:]
    ours = [line for line in out.splitlines() if line.strip() and not _tensorflow_start_up(line)]
    assert len(ours) <= 8, out[-3000:]
    assert "training my-model" not in out  # refused before the first step
    ckpts = tmp_path / "runs" / "my-model" / "checkpoints"
    assert not [n for n in (os.listdir(ckpts) if ckpts.exists() else []) if n.startswith("ckpt-")]


def _tensorflow_start_up(line: str) -> bool:
    """TensorFlow's C++ start-up lines, which TF_CPP_MIN_LOG_LEVEL does not reach."""
    return line.startswith(("WARNING: All log messages before absl::InitializeLog()", "I0000", "E0000", "W0000"))


@pytest.mark.parametrize(
    "mistake, says",
    [
        ("per-example", "train_step() returned 'loss' with shape [16]; metrics must be scalars"),
        ("none", "train_step() returned None (is a return statement missing?)"),
        ("no eval_step", "has an eval_dataset() but does not override eval_step()"),
    ],
)
def test_more_hook_mistakes_in_process(tmp_path, mistake, says):
    import tensorflow as tf
    from conftest import ToyTrainer, make_cfg

    import ckptkit

    class Bad(ToyTrainer):
        def train_step(self, batch):
            out = super().train_step(batch)
            if mistake == "per-example":
                return {"loss": tf.ones([16]) * out["loss"]}
            return None if mistake == "none" else out

    if mistake == "no eval_step":
        Bad.eval_step = ckptkit.Trainer.eval_step
    with pytest.raises(ckptkit.HookError) as err:
        Bad(make_cfg(tmp_path / "run", **{"trainer.max_steps": 5})).fit()
    assert says in str(err.value) and "\n" not in str(err.value)
