"""Ctrl-C on ``spindle train`` and ``spindle profile``: one line, exit 130, and nothing left
behind (no rank process, no half-written output, no temporary folder)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.plans import REPO


def _interruptible() -> None:
    """Ctrl-C's default action in the child, as a terminal's foreground job has it: a suite run
    as a background job (``make test &``) inherits SIGINT ignored, and Python then never
    raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(argv: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "spindle", *argv], cwd=REPO, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True,  # a process group, as a terminal's job
                            preexec_fn=_interruptible)


def _ctrl_c(proc: subprocess.Popen[str]) -> tuple[str, float]:
    """Ctrl-C: SIGINT to the whole process group, as a terminal sends it."""
    start = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=90)
    return err, time.monotonic() - start


def _processes_mentioning(text: str) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if text in line and "ps -eo" not in line]


def test_ctrl_c_on_spindle_train_stops_everything_and_says_one_line(tmp_path: Path) -> None:
    temp_dirs = set(Path(tempfile.gettempdir()).glob("spindle-train-*"))
    metrics = tmp_path / "m.jsonl"
    proc = _start(["train", "small-ofasys", "--nproc", "2", "--steps", "100000", "--save",
                   str(tmp_path / "run"), "--metrics", str(metrics), "--no-progress"])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text()):
        time.sleep(0.5)  # until the ranks are training
    assert metrics.read_text(), "training never started"
    err, elapsed = _ctrl_c(proc)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["spindle: interrupted"], err
    assert elapsed < 60
    assert _processes_mentioning(str(tmp_path)) == []
    assert list((tmp_path / "run").iterdir()) == []  # nothing half-written
    assert set(Path(tempfile.gettempdir()).glob("spindle-train-*")) == temp_dirs


def test_ctrl_c_on_spindle_profile_says_one_line(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    # enough repeats that it is still measuring after 15 s on any machine (with the default it
    # may finish first on an idle one, and then there is nothing to interrupt)
    proc = _start(["profile", "small-ofasys", "--devices", "2", "--out", str(out),
                   "--repeats", "1000", "--no-progress"])
    time.sleep(15)  # measuring by now
    err, _ = _ctrl_c(proc)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["spindle: interrupted"], err
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert _processes_mentioning(str(out)) == []
