"""A torchrun entry for the failure tests: ``python -m spindle.train`` with one faulty rank.

``FAIL_RANK`` (and ``FAIL_STEP``, default 1, and ``FAIL_MODE``: ``raise`` or ``hang``) in the
environment choose the rank, the step and the fault: at the start of that step the rank raises,
or stops responding.  ``KILL_RANK`` and ``KILL_IN_SAVE_STEP``: in the first attempt (torchrun's
restart count 0), that rank kills itself (SIGKILL) while the checkpoint of that step is being
written, once its DCP files are on disk and before the checkpoint is published.  Everything
else is the real entry, run as the main module.
"""

import os
import runpy
import signal
import time
from pathlib import Path

import spindle.runtime.checkpoint as checkpoint
from spindle.runtime.executor import StepOutcome, TrainingRun

_real_step = TrainingRun.step
_real_save = checkpoint.Checkpointer.save


def _dying_digest(path: Path) -> list[int]:
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")


def _faulty_save(self: checkpoint.Checkpointer, steps_done: int) -> float:
    if (os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
            and self.run.rank == int(os.environ.get("KILL_RANK", "-1"))
            and steps_done == int(os.environ.get("KILL_IN_SAVE_STEP", "-1"))):
        checkpoint.digest = _dying_digest
    return _real_save(self, steps_done)


def _faulty_step(self: TrainingRun, step: int) -> StepOutcome:
    if "FAIL_RANK" not in os.environ:
        return _real_step(self, step)
    if self.rank == int(os.environ["FAIL_RANK"]) and step == int(os.environ.get("FAIL_STEP", "1")):
        if os.environ.get("FAIL_MODE") == "hang":
            time.sleep(24 * 3600)
        raise RuntimeError(f"injected failure at step {step}")
    return _real_step(self, step)


if __name__ == "__main__":
    TrainingRun.step = _faulty_step  # type: ignore[method-assign]
    checkpoint.Checkpointer.save = _faulty_save  # type: ignore[method-assign]
    runpy.run_module("spindle.tools.train", run_name="__main__", alter_sys=True)
