"""Test helpers: hand-written plans, the naive placement's validation, and launching
``spindle.train`` under torchrun.

The hand-written plans stay even though the planners exist: ``sequential-hand`` runs every
MetaOp on all ranks that divide its batch (the contrastive losses too, which the runtime then
runs on the group's first rank), and ``mixed`` (:func:`mixed_plan`) splits MetaOps' layers over
waves with different, permuted device groups and runs several MetaOps side by side, so the
batch is re-split between almost every pair of consecutive slices.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import torch

from spindle.costs.graph import contract
from spindle.declare.workload import Workload
from spindle.plan.checks import validate_plan
from spindle.plan.contract import Plan, Slice, Wave
from spindle.planner.baselines import place_naive

WORKLOADS = ("tiny-multitask-clip", "tiny-ofasys", "tiny-qwen-val")
WORLD_SIZES = (1, 2, 4)
PLANNERS = ("spindle", "sequential", "optimus")
STEPS = 3
SEED = 7
REPO = Path(__file__).resolve().parents[1]


def _plan(workload: Workload, name: str, num_devices: int, waves: list[Wave]) -> Plan:
    graph = contract(workload)
    plan = Plan(
        planner=name, workload=workload.name, workload_fingerprint=workload.fingerprint(),
        num_devices=num_devices, devices_per_node=num_devices, hardware="hand",
        metaops=tuple(graph.metaops), waves=tuple(waves),
    )
    validate_plan(plan, graph.metaops, source=name)
    return plan


def sequential_hand_plan(workload: Workload, num_devices: int) -> Plan:
    """One wave per MetaOp, on the largest group (devices 0..n-1) whose size divides its batch."""
    waves = []
    for m in contract(workload).metaops:
        n = max(k for k in range(1, num_devices + 1) if m.batch % k == 0)
        waves.append(Wave((Slice(m.id, 0, m.num_layers, tuple(range(n))),)))
    return _plan(workload, "sequential-hand", num_devices, waves)


def mixed_plan(workload: Workload, num_devices: int, seed: int = 0) -> Plan:
    """A valid plan drawn at random: each wave takes ready MetaOps in a shuffled order and gives
    each a random number of its next layers on a random, permuted device group whose size
    divides its batch, until the devices run out; MetaOps run side by side and are split over
    waves with different groups."""
    graph = contract(workload)
    rng = random.Random(seed)
    next_layer = {m.id: 0 for m in graph.metaops}
    finished_in: dict[int, int] = {}
    waves: list[Wave] = []
    while any(next_layer[m.id] < m.num_layers for m in graph.metaops):
        wi = len(waves)
        ready = [
            m for m in graph.metaops
            if next_layer[m.id] < m.num_layers
            and (next_layer[m.id] > 0 or all(finished_in.get(d, wi) < wi for d in m.deps))
        ]
        rng.shuffle(ready)
        free = list(range(num_devices))
        rng.shuffle(free)
        slices = []
        for m in ready:
            sizes = [n for n in range(1, len(free) + 1) if m.batch % n == 0]
            if not sizes:
                continue
            n = rng.choice(sizes)
            devices, free = tuple(free[:n]), free[n:]
            start = next_layer[m.id]
            end = start + rng.randint(1, m.num_layers - start)
            slices.append(Slice(m.id, start, end, devices))
            if not free:
                break
        for s in slices:
            next_layer[s.metaop] = s.layer_end
            if s.layer_end == graph.metaops[s.metaop].num_layers:
                finished_in[s.metaop] = wi
        waves.append(Wave(tuple(slices)))
    return _plan(workload, "mixed", num_devices, waves)


def is_demanding(plan: Plan) -> bool:
    """Some MetaOp is split over waves on groups of different sizes, and some wave runs two
    MetaOps side by side."""
    sizes: dict[int, set[int]] = {}
    for w in plan.waves:
        for s in w.slices:
            sizes.setdefault(s.metaop, set()).add(s.n)
    side_by_side = any(len(w.slices) > 1 for w in plan.waves)
    return side_by_side and any(len(v) > 1 for v in sizes.values())


def demanding_mixed_plan(workload: Workload, num_devices: int) -> Plan:
    """The first :func:`mixed_plan` seed whose plan :func:`is_demanding` (deterministic)."""
    for seed in range(100):
        plan = mixed_plan(workload, num_devices, seed)
        if num_devices == 1 or is_demanding(plan):
            return plan
    raise AssertionError("no demanding plan in 100 seeds")


def all_plans(workload: Workload, nproc: int) -> dict[str, Plan]:
    from spindle.planner.pipeline import make_plan

    plans = {p: make_plan(workload, p, nproc, nproc) for p in PLANNERS}
    plans["sequential-hand"] = sequential_hand_plan(workload, nproc)
    plans["mixed"] = demanding_mixed_plan(workload, nproc)
    return plans


def train_command(
    nproc: int, workload: str, args: list[str], log_dir: Path | None = None,
    entry: str = "spindle.train", extra: tuple[str, ...] | list[str] = (),
) -> list[str]:
    """``python -m torch.distributed.run [EXTRA] ... -m ENTRY WORKLOAD ARGS``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", *extra]
    if log_dir is not None:  # each rank's stdout/stderr in its own file
        cmd += ["--log-dir", str(log_dir), "--redirects", "3"]
    return cmd + ["-m", entry, workload, *args]


def run_train(
    nproc: int, workload: str, args: list[str], timeout: float = 240, log_dir: Path | None = None,
    env: dict[str, str] | None = None, entry: str = "spindle.train",
    extra: tuple[str, ...] | list[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Launch ``entry`` (``tests.faulty_train`` for a faulty rank) under torchrun (``extra``:
    torchrun's own options)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "LOGLEVEL": "ERROR", **(env or {})}
    return subprocess.run(
        train_command(nproc, workload, args, log_dir, entry, extra), cwd=REPO, env=full_env,
        text=True, capture_output=True, timeout=timeout,
    )


def assert_matches(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float,
                   rtol: float, label: str) -> None:
    assert sorted(got) == sorted(want), f"{label}: parameter names differ"
    worst = max(want, key=lambda n: float((got[n] - want[n]).abs().max()))
    err = float((got[worst] - want[worst]).abs().max())
    for name in want:
        assert got[name].dtype == want[name].dtype, f"{label}: {name} dtype"
        assert got[name].shape == want[name].shape, f"{label}: {name} shape"
        assert torch.allclose(got[name], want[name], atol=atol, rtol=rtol), (
            f"{label}: {name} differs by {float((got[name] - want[name]).abs().max()):.3g}"
            f" (worst parameter {worst}: {err:.3g})"
        )


def rank_stderr(log_dir: Path, nproc: int) -> list[str]:
    """Each rank's stderr from torchrun's ``--log-dir`` (``--redirects 3``)."""
    out = []
    for rank in range(nproc):
        (path,) = log_dir.glob(f"*/attempt_0/{rank}/stderr.log")
        out.append(path.read_text())
    return out
STOPPED = "stopped by the launcher (another rank failed)"


def assert_one_line_each(logs: list[str], expect: list[str | tuple[str, ...]]) -> None:
    """Each rank wrote exactly one line, which contains (one of) its expected text(s)."""
    for rank, (text, want) in enumerate(zip(logs, expect)):
        lines = [ln for ln in text.splitlines() if ln.strip()]
        assert len(lines) == 1, f"rank {rank}: {text!r}"
        assert lines[0].startswith(f"spindle.train: rank {rank}: "), lines[0]
        options = (want,) if isinstance(want, str) else want
        assert any(w in lines[0] for w in options), lines[0]
        assert "Traceback" not in text


def validate_placed(waves: list[Wave], graph, num_devices: int) -> None:  # type: ignore[no-untyped-def]
    """Place ``waves`` naively and run the plan validator on the result."""
    placed = tuple(place_naive(waves, num_devices))
    validate_plan(Plan("t", "t", "0", num_devices, 1, "", tuple(graph.metaops), placed),
                  graph.metaops)
