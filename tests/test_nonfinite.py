"""Non-finite train metrics are seen at every step, whatever the log cadence (issue 30): the
compiled loop keeps an on-device window of the steps since the last log line, read at each
log line and save; ``trainer.on_nonfinite`` says what a bad step does, and the logged metrics
are means over the window."""

import math

import pytest
import tensorflow as tf
from conftest import ToyTrainer, make_cfg, steps_on_disk

import ckptkit


class BadBatch(ToyTrainer):
    """Step ``data.bad_step`` has a NaN loss. Without ``data.skip`` the NaN reaches the
    gradients and so the weights; with it, train_step skips the update of a non-finite loss
    (what mixed-precision loss scaling and many research loops do)."""

    def train_step(self, batch):
        x, y = batch
        bad = tf.equal(self.global_step + 1, self.cfg.data.bad_step)
        with tf.GradientTape() as tape:
            per_example = tf.keras.losses.sparse_categorical_crossentropy(y, self.model(x), from_logits=True)
            loss = tf.reduce_mean(per_example) * tf.where(bad, float("nan"), 1.0)
        variables = self.model.trainable_variables
        grads = tape.gradient(loss, variables)

        def update():
            self.optimizer.apply_gradients(zip(grads, variables, strict=True))
            return tf.constant(True)

        if self.cfg.data.skip:
            tf.cond(tf.math.is_finite(loss), update, lambda: tf.constant(False))
        else:
            update()
        return {"loss": loss}


def _cfg(tmp_path, bad_step, skip, mode):
    return make_cfg(
        tmp_path / "run",
        **{
            "trainer.max_steps": 20,
            "trainer.steps_per_loop": 1,
            "trainer.log_every_steps": 4,
            "trainer.eval_every_steps": None,
            "trainer.on_nonfinite": mode,
            "checkpoint.save_every_steps": 5,
            "checkpoint.max_to_keep": None,
            "data.eval": False,
            "data.bad_step": bad_step,
            "data.skip": skip,
        },
    )


# Step 7 is neither logged nor saved, step 8 is logged, step 10 is saved but not logged.
@pytest.mark.parametrize("bad_step", [7, 8, 10])
@pytest.mark.parametrize("skip", [False, True], ids=["update", "skip"])
def test_stop_names_the_first_bad_step_whatever_the_cadence(tmp_path, bad_step, skip):
    with pytest.raises(ckptkit.NonFiniteError) as err:
        BadBatch(_cfg(tmp_path, bad_step, skip, "stop")).fit()
    message = str(err.value)
    assert f"non-finite train metrics (a NaN or infinite loss) at step {bad_step}" in message
    assert "set trainer.on_nonfinite=warn" in message and "ckpt-5 (step 5)" in message
    assert steps_on_disk(tmp_path / "run" / "checkpoints") == [5]  # nothing after the bad step


@pytest.mark.parametrize("bad_step", [7, 8, 10])
def test_warn_goes_on_when_the_step_skipped_the_update(tmp_path, caplog, bad_step):
    with caplog.at_level("WARNING", logger="ckptkit"):
        result = BadBatch(_cfg(tmp_path, bad_step, True, "warn")).fit()
    assert result.step == 20
    assert caplog.text.count(f"non-finite train metrics at step {bad_step}") == 1
    assert steps_on_disk(tmp_path / "run" / "checkpoints") == [5, 10, 15, 20]
    assert math.isfinite(result.metrics["loss"])


@pytest.mark.parametrize("bad_step", [7, 8, 10])
def test_warn_still_refuses_to_save_poisoned_weights(tmp_path, bad_step):
    with pytest.raises(ckptkit.NonFiniteError, match=r"non-finite values at step 10 in \d+ variable"):
        BadBatch(_cfg(tmp_path, bad_step, False, "warn")).fit()
    assert steps_on_disk(tmp_path / "run" / "checkpoints") == [5]


class CountingLoss(ToyTrainer):
    def train_step(self, batch):
        super().train_step(batch)
        return {"loss": tf.cast(self.global_step, tf.float32)}  # the step before this one


@pytest.mark.parametrize("steps_per_loop", [1, 3, 8])
def test_the_logged_loss_is_the_mean_since_the_last_log_line(tmp_path, steps_per_loop):
    cfg = make_cfg(
        tmp_path / "run",
        **{
            "trainer.max_steps": 8,
            "trainer.steps_per_loop": steps_per_loop,
            "trainer.log_every_steps": 4,
            "data.eval": False,
        },
    )
    result = CountingLoss(cfg).fit()
    assert result.metrics["loss"] == pytest.approx((4 + 5 + 6 + 7) / 4)


def test_the_window_folds_rare_log_lines_into_host_sums():
    """With log lines far apart the calls are folded every FOLD_EVERY calls (memory stays
    bounded); the means, counts and first bad step are the same as read at once."""
    from ckptkit import loop

    def call(loss, finite, bad, first):
        return {
            "loss": tf.constant(loss),
            loop.FINITE_STEPS: tf.constant(finite, tf.int64),
            loop.BAD_STEPS: tf.constant(bad, tf.int64),
            loop.FIRST_BAD: tf.constant(first, tf.int64),
        }

    window = loop.TrainWindow()
    window.FOLD_EVERY = 3
    calls = [call(1.0, 2, 0, -1), call(3.0, 1, 1, 7), call(5.0, 2, 0, -1), call(2.0, 0, 2, 11), call(4.0, 1, 0, -1)]
    for c in calls:
        window.add(c)
    assert len(window.calls) == 2  # three were folded
    w = window.read(reset=True)
    assert w.steps == 6 and w.bad_steps == 3 and w.first_bad == 7
    assert w.means["loss"] == pytest.approx((1 * 2 + 3 * 1 + 5 * 2 + 4 * 1) / 6)
    assert window.read() == loop.Window({}, 0, 0, None)
