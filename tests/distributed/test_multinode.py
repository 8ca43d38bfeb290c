"""Two nodes on this machine: two torchrun agents with the README's multi-node command (c10d
rendezvous on localhost, 2 ranks each) train like one process; and when one node dies, the other
stops within the timeout with one line per rank."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from spindle.declare.workload import load_workload
from spindle.planner.pipeline import make_plan
from spindle.runtime.reference import train_reference
from tests.plans import REPO, STOPPED, assert_matches

WORKLOAD = "tiny-ofasys"
STEPS = 3
SEED = 7


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _agent(port: int, log_dir: Path, args: list[str]) -> subprocess.Popen[str]:
    """One node: ``torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint
    HOST0:PORT -m spindle.train ...``, as the README writes it (HOST0 = 127.0.0.1)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
           "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
           "--log-dir", str(log_dir), "--redirects", "3", "-m", "spindle.train", WORKLOAD, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOGLEVEL": "ERROR"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


def _nodes(port: int, tmp_path: Path, args: list[str]) -> list[subprocess.Popen[str]]:
    """Both nodes; the second starts once the first listens on the rendezvous port (on one
    machine both agents would otherwise race to host the rendezvous store)."""
    first = _agent(port, tmp_path / "node0", args)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    return [first, _agent(port, tmp_path / "node1", args)]


def _kill_node(agent: subprocess.Popen[str]) -> None:
    """The node dies: its agent and its ranks (torchrun starts each rank in a session of its
    own, so they are found as the agent's children) at the same moment."""
    ranks = subprocess.run(["ps", "-o", "pid=", "--ppid", str(agent.pid)], capture_output=True,
                           text=True).stdout.split()
    for pid in [agent.pid, *map(int, ranks)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _plan(tmp_path: Path) -> Path:
    path = tmp_path / "plan.json"
    make_plan(load_workload(WORKLOAD), "spindle", 4, 2, "cpu").save(path)  # 2 nodes of 2
    return path


def test_two_nodes_train_like_one_process(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    port = _free_port()
    args = ["--plan", str(plan), "--steps", str(STEPS), "--seed", str(SEED), "--dtype",
            "float64", "--save", str(tmp_path / "out"), "--no-progress", "--timeout", "60"]
    nodes = _nodes(port, tmp_path, args)
    for node in nodes:
        _, err = node.communicate(timeout=240)
        assert node.returncode == 0, err[-3000:]
    got = torch.load(tmp_path / "out" / "params.pt")
    want = train_reference(load_workload(WORKLOAD), SEED, STEPS, dtype=torch.float64)
    assert_matches(got, want, atol=1e-9, rtol=1e-9, label="2 nodes x 2 ranks")


def test_a_dead_node_stops_the_other_within_the_timeout(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    port = _free_port()
    args = ["--plan", str(plan), "--steps", "100000", "--no-progress", "--timeout", "15"]
    alive, doomed = _nodes(port, tmp_path, args)
    logs = tmp_path / "node0"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(logs.glob("*/attempt_0/*/stderr.log"))) < 2:
        time.sleep(0.5)
    time.sleep(8)  # both nodes are training by now
    start = time.monotonic()
    _kill_node(doomed)
    _, err = alive.communicate(timeout=120)
    elapsed = time.monotonic() - start
    doomed.wait(timeout=30)
    print(f"the surviving node stopped {elapsed:.1f} s after the other died")
    assert alive.returncode != 0, (alive.returncode, err[-2000:],
                                   [p.read_text() for p in logs.glob('*/attempt_0/*/stderr.log')])
    assert elapsed < 15 + 45, f"took {elapsed:.0f} s after the node died"
    lost = ("lost contact with another rank", STOPPED)
    for log in sorted(logs.glob("*/attempt_0/*/stderr.log")):  # this node's 2 ranks
        # gloo's own C++ logger may add its reconnect attempts to the dead peer (seen on a
        # loaded machine: "[.../gloo/transport/tcp/...] ... failed to connect"); Spindle's
        # reason is the one line of its own
        rows = [ln for ln in log.read_text().splitlines()
                if ln.strip() and "gloo/transport/tcp" not in ln]
        assert len(rows) == 1 and rows[0].startswith("spindle.train: rank "), (log, rows)
        assert any(w in rows[0] for w in lost), rows[0]
