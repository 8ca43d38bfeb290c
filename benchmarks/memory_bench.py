"""The memory model against the runtime's measured memory, for every memory strategy.

For each workload, the ``sequential`` plan on 2 CPU ranks (every MetaOp on both devices, so every
parameter pool is the group {0, 1} and ZeRO shards it in two) is made with each memory strategy
(``--zero 0|1|2``, ``--recompute``, and combinations), trained by the runtime (gloo, fp32) for
two steps, and the third step profiled on every rank with ``torch.profiler``'s memory events.
Measured = what the rank holds when the step starts (parameters, gradients, AdamW state) + the
peak allocated above that during the step; modelled = :func:`spindle.costs.memory.memory_report`
of the plan for that device.  Prints one row per (workload, strategy, rank) and the error.

    .venv/bin/python benchmarks/memory_bench.py [--workloads W ...] [--strategies S ...]

The worker (``--worker``) is what each torchrun rank runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

STRATEGIES = {  # label -> (zero, recompute)
    "none": (0, False),
    "recompute": (0, True),
    "zero-1": (1, False),
    "zero-2": (2, False),
    "recompute + zero-2": (2, True),
}
DEFAULT = ("tiny-multitask-clip", "tiny-ofasys", "tiny-qwen-val", "small-multitask-clip",
           "small-ofasys", "small-qwen-val")


def _held_bytes(run: object) -> int:
    """Bytes of what a rank holds between steps: parameters, gradients, AdamW state."""
    import torch

    params = run.local.params  # type: ignore[attr-defined]
    total = sum(p.nbytes + (p.grad.nbytes if p.grad is not None else 0) for p in params.values())
    for shard in run.groups.all_shards:  # type: ignore[attr-defined]
        for v in shard.views:
            total += v.grad.nbytes if v.grad is not None else 0  # its own buffer
    opt = run.optimizer  # type: ignore[attr-defined]
    if opt is not None:
        total += sum(t.nbytes for st in opt.state.values() for k, t in st.items()
                     if torch.is_tensor(t) and k != "step")
    return int(total)


def worker(workload: str, plans: list[str], out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile, record_function

    from spindle.declare.workload import load_workload
    from spindle.plan.checks import load_plan
    from spindle.runtime.config import RunConfig
    from spindle.runtime.executor import TrainingRun

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    w = load_workload(workload)
    rows = []
    for path in plans:
        plan = load_plan(path)
        run = TrainingRun(w, plan, rank, world, torch.device("cpu"), RunConfig(seed=0))
        run.step(0)  # gradients and AdamW state exist from here on
        run.prepare_data(1)
        dist.barrier()
        held = _held_bytes(run)
        # step 1 first, under the profiler too: its frees of what it allocated are recorded
        # (the profiler records no free of a block allocated before it started), so step 2's
        # peak above its own start is what the step really adds
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run.step(1)
            run.prepare_data(2)
            dist.barrier()
            with record_function("measured step"):
                run.step(2)
        evs = list(prof.profiler.kineto_results.events())
        (start, end), = [(e.start_ns(), e.end_ns()) for e in evs if e.name() == "measured step"]
        live = peak = 0
        base: int | None = None
        for t, nbytes in sorted((e.start_ns(), e.nbytes()) for e in evs
                                if e.name() == "[memory]"):
            if t >= start and base is None:
                base = live
            live += nbytes
            if base is not None and t <= end:
                peak = max(peak, live - base)
        rows.append({"plan": Path(path).stem, "rank": rank, "held": held, "peak": peak})
        del run
    with open(f"{out}.{rank}", "w") as f:
        json.dump(rows, f)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="+", default=list(DEFAULT))
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[2:], args.worker[1])
        return

    from spindle.costs.graph import contract
    from spindle.costs.memory import FP32, memory_report
    from spindle.declare.workload import load_workload
    from spindle.planner.pipeline import make_plan

    print("| workload | strategy | rank | modelled MB | measured MB (held + step peak) | error |")
    print("|---|---|---:|---:|---:|---:|")
    errors = []
    table = []
    for name in args.workloads:
        w = load_workload(name)
        g = contract(w)
        with tempfile.TemporaryDirectory() as tmp:
            plans, modelled = [], {}
            for label in args.strategies:
                zero, recompute = STRATEGIES[label]
                plan = make_plan(w, "sequential", 2, 2, "cpu", check_memory=False, zero=zero,
                                 recompute=recompute)
                path = Path(tmp) / f"{label.replace(' + ', '+')}.json"
                plan.save(path)
                plans.append(str(path))
                modelled[path.stem] = [d.total_bytes for d in
                                       memory_report(plan, g, FP32).devices]
            out = str(Path(tmp) / "rows")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node=2", __file__, "--worker", name, out, *plans]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "LOGLEVEL": "ERROR"}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
            if proc.returncode:
                sys.exit(f"{name}: the ranks failed: {proc.stderr[-2000:]}")
            rows = [r for k in range(2) for r in json.loads(Path(f"{out}.{k}").read_text())]
        for label in args.strategies:
            stem = label.replace(" + ", "+")
            for r in sorted((r for r in rows if r["plan"] == stem), key=lambda r: r["rank"]):
                measured = r["held"] + r["peak"]
                model = modelled[stem][r["rank"]]
                err = (model - measured) / measured
                errors.append(err)
                table.append({"workload": name, "strategy": label, "rank": r["rank"],
                              "modelled": model, "held": r["held"], "peak": r["peak"]})
                print(f"| {name} | {label} | {r['rank']} | {model / 1e6:.3f} |"
                      f" {measured / 1e6:.3f} ({r['held'] / 1e6:.3f} + {r['peak'] / 1e6:.3f}) |"
                      f" {100 * err:+.1f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))
    worst = max(errors, key=abs)
    print(f"\n{len(errors)} rows; worst error {100 * worst:+.1f}%, mean |error|"
          f" {100 * sum(map(abs, errors)) / len(errors):.1f}%")


if __name__ == "__main__":
    main()
