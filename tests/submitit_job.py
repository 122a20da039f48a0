"""A ckptkit training as a submitit job (run by tests/test_resume.py with submitit's
LocalExecutor): Checkpointable, so submitit requeues it after its timeout signal."""

import os
import sys

import submitit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


class ToyJob(submitit.helpers.Checkpointable):
    def __call__(self, run_dir, overrides):
        from conftest import make_cfg
        from toy_run import SlowToyTrainer

        result = SlowToyTrainer(make_cfg(run_dir, **overrides)).fit()
        return {"step": result.step, "resumed_from": result.resumed_from}
