"""Run ToyTrainer in its own process: python toy_run.py RUN_DIR [KEY=VALUE ...]

Values are YAML (``trainer.max_steps=30``, ``model.kind=keras_list``). Prints one line
``RESULT {json}`` at the end, with the step reached, where it resumed from and a hash of
every model and optimizer variable, so tests can compare runs bit for bit. ``data.step_sleep``
makes each step sleep (inside the graph) so a signal can arrive mid-run.

``TOY_PAUSE=<phase>:<seconds>`` pauses once in one phase of ``fit()`` outside the train loop,
after printing ``PAUSE <phase>``, so a test can send a signal right then: ``build`` (building
the model), ``restore`` (restoring a checkpoint), ``final_eval`` (the eval at the last step),
``final_save`` (the background write of the last checkpoint, while fit() waits for it),
``export`` (building the serving signatures of the final export).

``TOY_KILL_AT=<file name>:<before|after>:<k>`` kills the process with SIGKILL right before or
right after ckptkit's k-th atomic rename of a file of that name (``metadata.json``,
``checkpoint``): what a crash between the two renames of a save leaves.

``TOY_KILL_AT_COPY=<before|after>:<k>`` kills it right before or after the k-th rename of a
file that the local tier's copier moves into ``checkpoint.dir`` (the toy's checkpoints have
two files, the data then the index: k=1 before is after the temporaries are written, k=2
before is between data and index, k=2 after is before the copy is recorded).

``TOY_HOST=<name>`` makes the process see itself on host ``<name>`` (a requeue on another node).
"""

import hashlib
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import yaml  # noqa: E402
from conftest import ToyTrainer, make_cfg  # noqa: E402

PHASE, _, PAUSE = os.environ.get("TOY_PAUSE", "").partition(":")


def pause(phase: str) -> None:
    global PHASE
    if phase == PHASE:
        PHASE = None  # once
        print(f"PAUSE {phase}", flush=True)
        __import__("time").sleep(float(PAUSE))


def _kill_at_a_rename() -> None:
    name, when, k = (os.environ.get("TOY_KILL_AT") or "::").split(":")
    if not name:
        return
    from ckptkit import storage

    real, seen = storage.atomic_write_text, []

    def write(path, text):
        if os.path.basename(path) == name:
            seen.append(path)
        due = len(seen) == int(k) and os.path.basename(path) == name
        if due and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, text)
        if due and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)

    storage.atomic_write_text = write


def _kill_in_a_copy() -> None:
    when, _, k = os.environ.get("TOY_KILL_AT_COPY", "").partition(":")
    if not when:
        return
    from ckptkit import local_tier

    real, seen = local_tier._tf_gfile, []

    class Renames:
        def __getattr__(self, name):
            return getattr(real(), name)

        def rename(self, src, dst, overwrite=False):
            seen.append(dst)
            due = len(seen) == int(k)
            if due and when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            real().rename(src, dst, overwrite=overwrite)
            if due and when == "after":
                os.kill(os.getpid(), signal.SIGKILL)

    local_tier._tf_gfile = Renames


def _on_host() -> None:
    host = os.environ.get("TOY_HOST")
    if host:
        from ckptkit import local_tier, lock_records

        lock_records.hostname = local_tier.hostname = lambda: host


def _pause_in_ckptkit() -> None:
    from ckptkit import checkpointer, metadata

    restore, fsync = checkpointer.Checkpointer.restore, metadata.fsync_checkpoint

    def slow_restore(self, *a, **kw):
        pause("restore")
        return restore(self, *a, **kw)

    def slow_fsync(prefix):
        if os.path.basename(prefix) == f"ckpt-{os.environ.get('TOY_LAST_STEP')}":
            pause("final_save")
        return fsync(prefix)

    checkpointer.Checkpointer.restore = slow_restore
    metadata.fsync_checkpoint = slow_fsync


class SlowToyTrainer(ToyTrainer):
    def build_model(self):
        pause("build")
        return super().build_model()

    def eval_step(self, batch):
        if PHASE == "final_eval":
            last = int(self.cfg.trainer.max_steps)
            tf.py_function(lambda s: pause("final_eval") if int(s) == last else None, [self.global_step], [])
        return super().eval_step(batch)

    def serving_signatures(self):
        pause("export")
        return super().serving_signatures()

    def train_step(self, batch):
        pause = float(self.cfg.data.get("step_sleep") or 0.0)
        if pause:
            tf.py_function(lambda: __import__("time").sleep(pause), [], [])
        return super().train_step(batch)


def digest(variables) -> str:
    h = hashlib.sha256()
    for v in variables:
        h.update(np.ascontiguousarray(v.numpy()).tobytes())
    return h.hexdigest()


def main() -> None:
    run_dir, overrides = sys.argv[1], sys.argv[2:]
    kw = {}
    for item in overrides:
        key, value = item.split("=", 1)
        kw[key] = yaml.safe_load(value)
    trainer = SlowToyTrainer(make_cfg(run_dir, **kw))
    os.environ["TOY_LAST_STEP"] = str(trainer.settings.trainer.max_steps)
    _pause_in_ckptkit()
    _kill_at_a_rename()
    _kill_in_a_copy()
    _on_host()
    marker = kw.get("data.chain_marker")
    if marker:  # stands in for a scheduler helper's handler (submitit's requeue on SIGUSR2)

        def requeue(signum, frame):
            from ckptkit import metadata

            newest = metadata.scan(os.path.join(run_dir, "checkpoints"))[-1].step
            with open(marker, "w") as f:
                f.write(f"newest checkpoint: {newest}")
            sys.exit(3)

        signal.signal(signal.SIGUSR2, requeue)
    result = trainer.fit()
    print(
        "RESULT "
        + json.dumps(
            {
                "step": result.step,
                "resumed_from": result.resumed_from,
                "steps_run": result.steps_run,
                "model": digest(trainer.model.variables),
                "optimizer": digest(trainer.optimizer.variables),
                "sums": [float(np.sum(v.numpy())) for v in trainer.model.trainable_variables],
                "elapsed": result.elapsed_seconds,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
