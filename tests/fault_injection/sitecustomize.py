"""A fault on one rank, for the tests of what the other ranks do about it.

With this folder on PYTHONPATH and ``ISMCTL_TEST_FAULT=RANK:STEP`` in the environment, every
Python process that starts imports this module; in a training process, rank RANK's loss is
reported non-finite at step STEP (the trainer's own check then stops that rank alone, as a
real NaN on one rank would), while the other ranks carry on into the next step's collective.
"""

import os

_FAULT = os.environ.get("ISMCTL_TEST_FAULT")

if _FAULT:
    import torch

    import ismctl.training.step as _step

    _rank, _at = (int(v) for v in _FAULT.split(":"))
    _call = _step.TrainStep.__call__

    def _faulty(self, step):  # noqa: ANN001, ANN202 - a test's patch
        sums, pool, bad, grad_norm = _call(self, step)
        if self.info.rank == _rank and step == _at:
            bad = torch.ones((), dtype=torch.bool, device=bad.device)
        return sums, pool, bad, grad_norm

    _step.TrainStep.__call__ = _faulty
