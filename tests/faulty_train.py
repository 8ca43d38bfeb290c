"""A torchrun entry for the failure tests: ``python -m spindle.train`` with one faulty rank.

``FAIL_RANK`` (and ``FAIL_STEP``, default 1, and ``FAIL_MODE``: ``raise`` or ``hang``) in the
environment choose the rank, the step and the fault: at the start of that step the rank raises,
or stops responding.  Everything else is the real entry, run as the main module.
"""

import os
import runpy
import time

from spindle.runtime.executor import StepOutcome, TrainingRun

_real_step = TrainingRun.step


def _faulty_step(self: TrainingRun, step: int) -> StepOutcome:
    if self.rank == int(os.environ["FAIL_RANK"]) and step == int(os.environ.get("FAIL_STEP", "1")):
        if os.environ.get("FAIL_MODE") == "hang":
            time.sleep(24 * 3600)
        raise RuntimeError(f"injected failure at step {step}")
    return _real_step(self, step)


if __name__ == "__main__":
    TrainingRun.step = _faulty_step  # type: ignore[method-assign]
    runpy.run_module("spindle.tools.train", run_name="__main__", alter_sys=True)
