"""``spindle train``: plan a workload for N local processes and train it with torchrun.

The launcher makes (or reads) the plan, writes it to a temporary folder and runs
``python -m torch.distributed.run --standalone --nproc-per-node N -m spindle.train ...`` as a
subprocess, returning its exit status.  It never launches ranks itself: torchrun does.

torchrun's own messages (its log lines, and for a failed job its traceback and table of failed
ranks) are left out of the output, since every rank already printed one line saying why it
stopped; ``spindle --verbose train ...`` shows everything.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

import torch

from spindle.declare.workload import load_workload
from spindle.plan.checks import load_plan
from spindle.plan.contract import Plan
from spindle.planner.pipeline import make_plan
from spindle.runtime.config import RunConfig
from spindle.tools.preflight import check_model, check_plan, check_resume, check_run

log = logging.getLogger(__name__)

MAX_LOCAL_PROCESSES = 1024
STOP_GRACE_S = 30.0  # how long Ctrl-C waits for torchrun and its ranks to stop
_TORCHRUN_LOG = re.compile(rb"^[DIWEF]\d{4} [\d:.]+ +\d+ \S*torch/distributed/(elastic|run)")
"""A line of torchrun's own log (glog style: level, date, time, pid, file)."""


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``spindle train``: what to train and how to plan it, then every run
    option of :class:`~spindle.runtime.config.RunConfig` (the torchrun entry's own)."""
    parser.add_argument("workload", help="a shipped workload name or a YAML/TOML file")
    parser.add_argument("--nproc", type=int, default=2, help="processes (ranks) to launch")
    parser.add_argument("--planner", default="spindle",
                        help="planner that makes the plan (spindle or a baseline)")
    parser.add_argument("--plan", default=None, metavar="FILE",
                        help="train this plan instead of planning (must be for --nproc devices)")
    parser.add_argument("--save-plan", default=None, metavar="FILE",
                        help="also keep the plan that was trained")
    parser.add_argument("--devices-per-node", type=int, default=None,
                        help="devices per node for planning (default: --nproc, one node)")
    parser.add_argument("--hardware", default=None,
                        help="hardware preset for planning (default: a800 with CUDA, else cpu)")
    parser.add_argument("--profile", default=None, help="measured profile for planning")
    parser.add_argument("--max-restarts", type=int, default=0, metavar="K",
                        help="restart the job up to K times when a rank fails (torchrun's);"
                             " with --checkpoint-dir it resumes from the latest checkpoint")
    RunConfig.add_arguments(parser)


def train_arguments(args: argparse.Namespace, plan_path: Path) -> list[str]:
    """The ``spindle.train`` arguments that carry ``args`` over: the workload, the plan file and
    exactly the run options of ``args``."""
    out = [str(args.workload), "--plan", str(plan_path), *RunConfig.from_args(args).to_argv()]
    if getattr(args, "verbose", False):
        out.append("--verbose")
    return out


def torchrun_command(nproc: int, train_args: list[str], max_restarts: int = 0) -> list[str]:
    restarts = [f"--max-restarts={max_restarts}"] if max_restarts else []
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", *restarts, "-m", "spindle.train", *train_args]


def _make_plan(args: argparse.Namespace) -> Plan:
    workload = load_workload(args.workload)
    if args.plan:
        plan = load_plan(args.plan)
        check_plan(plan, workload, args.nproc, str(args.plan))
    else:
        hardware = args.hardware or ("a800" if torch.cuda.is_available() else "cpu")
        # the plan's memory strategy is --recompute / --zero where given, else chosen
        plan = make_plan(workload, args.planner, args.nproc,
                         args.devices_per_node or args.nproc, hardware, args.profile,
                         recompute=args.recompute, zero=args.zero,
                         reduce_bytes=2 if args.reduce_dtype == "bf16" else None)
    check_model(plan, workload)
    return plan


def run_train_command(args: argparse.Namespace) -> int:
    """Plan, launch torchrun, and return its exit status (0 when every rank succeeded)."""
    if not 1 <= args.nproc <= MAX_LOCAL_PROCESSES:
        raise ValueError(f"--nproc {args.nproc}: must be 1 to {MAX_LOCAL_PROCESSES} (processes"
                         " on this machine; a cluster starts torchrun on every node)")
    if not 0 <= args.max_restarts <= 1000:
        raise ValueError(f"--max-restarts {args.max_restarts}: must be 0 to 1000")
    config = RunConfig.from_args(args)
    check_run(config)
    if config.resume:
        assert config.checkpoint_dir is not None  # RunConfig.check
        log.info("%s", check_resume(config.checkpoint_dir, load_workload(args.workload)))
    plan = _make_plan(args)
    if args.save_plan:
        plan.save(args.save_plan)
    verbose = bool(getattr(args, "verbose", False))
    with tempfile.TemporaryDirectory(prefix="spindle-train-") as tmp:
        plan_path = Path(tmp) / "plan.json"
        plan.save(plan_path)
        cmd = torchrun_command(args.nproc, train_arguments(args, plan_path), args.max_restarts)
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        if not verbose:
            env.setdefault("LOGLEVEL", "ERROR")  # torchrun's banner and warnings
        log.info("running %s", " ".join(cmd))
        proc = subprocess.Popen(cmd, env=env, stderr=None if verbose else subprocess.PIPE)
        try:
            if proc.stderr is not None:
                _forward_without_torchrun_report(proc.stderr, sys.stderr)
            status = proc.wait()
        except KeyboardInterrupt:
            _stop(proc)  # torchrun stops its ranks; nothing is left behind when we return
            raise
    if status != 0:
        log.error("training failed (torchrun exit status %d)", status)
    return status


def _stop(proc: subprocess.Popen[bytes], grace_s: float = STOP_GRACE_S) -> None:
    """After Ctrl-C: make sure torchrun got the interrupt (it stops its ranks, which remove
    their half-written outputs), swallow what they print about it, and wait for all of them;
    past ``grace_s`` torchrun is killed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace_s
    if proc.stderr is not None:  # drained, so that no process blocks on a full pipe
        threading.Thread(target=proc.stderr.read, daemon=True).start()
    while proc.poll() is None:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            proc.kill()
        except KeyboardInterrupt:  # a second Ctrl-C: stop waiting politely
            proc.kill()


def _forward_without_torchrun_report(src: IO[bytes], dst: IO[str]) -> None:
    """Copy ``src`` to ``dst`` as it arrives (progress bars included), leaving out torchrun's
    own traceback and failure report at the end of a failed job."""
    pending = b""  # the current, unfinished line
    held: list[bytes] = []  # lines of a traceback being read
    dropping = False
    fd = src.fileno()
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        pending += chunk
        while True:
            cut = min((i for i in (pending.find(b"\n"), pending.find(b"\r")) if i >= 0),
                      default=-1)
            if cut < 0:
                break
            line, pending = pending[:cut + 1], pending[cut + 1:]
            if dropping or _TORCHRUN_LOG.match(line):
                continue
            if held or line.startswith(b"Traceback (most recent call last):"):
                held.append(line)
                if not line[:1].isspace() and len(held) > 1:  # the exception line ends it
                    if b"ChildFailedError" in line:
                        dropping = True
                    else:
                        _write(dst, b"".join(held))
                    held = []
                continue
            _write(dst, line)
        marker = b"Traceback (most recent call last):"
        if pending and not held and not dropping and not (
            pending.startswith(marker) or marker.startswith(pending)
        ):
            _write(dst, pending)  # a progress bar redraw: show it now
            pending = b""
    if not dropping:
        _write(dst, b"".join(held) + pending)


def _write(dst: IO[str], data: bytes) -> None:
    if data:
        dst.write(data.decode(errors="replace"))
        dst.flush()
