"""One launch for the resume-latency benchmark: python resume_child.py ckptkit|manager RUN_DIR first|resume

``first`` trains 50 steps and saves; ``resume`` restores and prints ``FIRST_STEP <unix time>``
when the first training step after the restore has finished.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    kind, run_dir, mode = sys.argv[1:4]
    import tensorflow as tf
    from workload_loop import make_step, mlp, small_data

    steps = 50 if mode == "first" else 1
    if kind == "manager":
        model, opt = mlp(), tf.keras.optimizers.Adam(1e-3)
        it = iter(small_data())
        step = tf.function(lambda: make_step(model, opt)(next(it)))
        ckpt = tf.train.Checkpoint(model=model, optimizer=opt, data=it)
        manager = tf.train.CheckpointManager(ckpt, os.path.join(run_dir, "manager"), max_to_keep=2)
        manager.restore_or_initialize()
        for _ in range(steps):
            loss = step()
        loss.numpy()
        print(f"FIRST_STEP {time.time()}", flush=True)
        if mode == "first":
            manager.save()
        return
    from workload_loop import MLPTrainer

    cfg = {
        "name": "resume",
        "run_dir": os.path.join(run_dir, "ckptkit"),
        "trainer": {
            "max_steps": 50 if mode == "first" else 1_000_000,
            "steps_per_loop": 1,
            "eval_every_steps": None,
            "progress": "log",
        },
        "checkpoint": {"save_every_steps": None},
        "export": {"enabled": False},
    }
    trainer = MLPTrainer(cfg)
    trainer.build()
    inner = trainer._train_fn

    def first(n):
        out = inner(n)
        out["loss"].numpy()
        print(f"FIRST_STEP {time.time()}", flush=True)
        os._exit(0)  # measured: stop here

    if mode == "resume":
        trainer._train_fn = first
    trainer.fit()


if __name__ == "__main__":
    main()
