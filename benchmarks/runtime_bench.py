"""Runtime benchmark: measured iteration time of the Spindle plan, the sequential plan (both run
by Spindle's runtime) and plain DDP (``spindle.runtime.ddp_baseline``), side by side on the
same ranks in one launch.

    .venv/bin/python benchmarks/runtime_bench.py [--workload W ...] [--nproc 2] [--steps 20]
        [--warmup 3] [--rounds 2] [--hardware cpu | --profile profile.json] [--json FILE]

The script makes the two plans, then launches itself under torchrun (``--worker``).  Each worker
runs, per workload and per round, the three contenders one after the other: every iteration
starts after a barrier and the slowest rank's time counts; input data generation is not timed
(for DDP neither).  The table shows the median iteration over all rounds, Spindle's speedup over
each, the simulator's predicted speedup over sequential, and where Spindle's time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

PLANNED = ("spindle", "sequential")
DEFAULT_WORKLOADS = ("tiny-multitask-clip", "tiny-ofasys", "tiny-qwen-val")


# --- the worker (one per rank, under torchrun) ------------------------------------------------


def _time_runtime(run: Any, steps: range, device: Any) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from spindle.runtime.metrics import PHASES

    times: list[float] = []
    phases = {p: 0.0 for p in PHASES}
    for step in steps:
        run.prepare_data(step)
        dist.barrier()
        outcome = run.step(step)
        times.append(outcome.rank_iteration.time_s)
        for p in PHASES:
            phases[p] += outcome.rank_iteration.phases[p]
    vec = torch.tensor(times + [phases[p] / max(len(times), 1) for p in PHASES],
                       dtype=torch.float64, device=device)
    dist.all_reduce(vec, op=dist.ReduceOp.MAX)
    vals = vec.tolist()
    return {"iteration_s": vals[:len(times)],
            "phases_s": dict(zip(PHASES, vals[len(times):]))}


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from spindle.plan import Plan
    from spindle.runtime.ddp_baseline import run_ddp_baseline
    from spindle.runtime.executor import TrainingRun
    from spindle.workload import load_workload

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    plans_dir = Path(args.plans_dir)
    for name in args.workload:
        workload = load_workload(name)
        runs = {
            p: TrainingRun(workload, Plan.load(plans_dir / f"{name}-{p}.json"), rank, world,
                           device, seed=args.seed)
            for p in PLANNED
        }
        iterations: dict[str, list[float]] = {p: [] for p in (*PLANNED, "ddp")}
        phases: dict[str, dict[str, float]] = {}
        next_step = {p: 0 for p in PLANNED}
        for _ in range(args.rounds):
            for p, run in runs.items():
                warm = range(next_step[p], next_step[p] + args.warmup)
                _time_runtime(run, warm, device)
                timed = range(warm.stop, warm.stop + args.steps)
                res = _time_runtime(run, timed, device)
                next_step[p] = timed.stop
                iterations[p] += res["iteration_s"]
                phases[p] = res["phases_s"]
            ddp = run_ddp_baseline(workload, steps=args.steps, seed=args.seed, warmup=args.warmup)
            iterations["ddp"] += ddp["iteration_s"]
        if rank == 0:
            sys.stdout.write(json.dumps({"workload": name, "world_size": world,
                                         "iteration_s": iterations, "spindle_phases_s":
                                         phases["spindle"], "phases_s": phases}) + "\n")
            sys.stdout.flush()
    dist.barrier()
    # leave without the interpreter's teardown (gloo's threads sometimes abort or hang there)
    sys.stdout.flush()
    os._exit(0)


# --- the parent: plan, launch, tabulate -------------------------------------------------------


def _median_ms(xs: list[float]) -> float:
    return 1000.0 * statistics.median(xs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", nargs="+", default=list(DEFAULT_WORKLOADS))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="timed iterations per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations per round")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the contenders")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hardware", default="cpu", help="hardware preset for planning")
    parser.add_argument("--profile", default=None, help="measured profile for planning")
    parser.add_argument("--profile-each", action="store_true",
                        help="first run `spindle profile` on this machine for every workload and"
                             " plan (and predict) from that profile")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--plans-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0

    from spindle.planning import make_plan

    predicted: dict[str, float] = {}
    predicted_s: dict[tuple[str, str], float] = {}
    predicted_phases: dict[tuple[str, str], dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="spindle-bench-") as tmp:
        for name in args.workload:
            profile = args.profile
            if args.profile_each:
                profile = str(Path(tmp) / f"{name}.profile.json")
                subprocess.run([sys.executable, "-m", "spindle.cli", "profile", name,
                                "--devices", str(args.nproc), "--out", profile,
                                "--no-progress"], check=True)
            schedule = {}
            for p in PLANNED:
                plan = make_plan(name, p, args.nproc, args.nproc, args.hardware, profile)
                plan.save(Path(tmp) / f"{name}-{p}.json")
                schedule[p] = plan.estimates.get("makespan_s", 0.0)
                predicted_s[(name, p)] = schedule[p]
                predicted_phases[(name, p)] = {
                    k: plan.estimates.get(f"{k}_s", 0.0) for k in ("compute", "param_sync",
                                                                    "optimizer")}
                predicted_phases[(name, p)]["send_recv"] = plan.estimates.get(
                    "send_recv_time_s", 0.0)
            if schedule["spindle"] > 0:
                predicted[name] = schedule["sequential"] / schedule["spindle"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={args.nproc}", __file__, "--worker", "--plans-dir", tmp,
               "--workload", *args.workload, "--steps", str(args.steps), "--warmup",
               str(args.warmup), "--rounds", str(args.rounds), "--seed", str(args.seed)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "LOGLEVEL": "ERROR"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        return proc.returncode
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))

    print(f"Measured on {args.nproc} CPU ranks (gloo), median of {args.rounds} x {args.steps}"
          f" iterations; plans from the '{args.profile or args.hardware}' cost model.\n")
    print("| workload | Spindle ms | sequential ms | DDP ms | vs sequential | vs DDP |"
          " predicted vs seq. | compute / send_recv / param_sync / optimizer |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        it = r["iteration_s"]
        sp, sq, dd = (_median_ms(it[k]) for k in ("spindle", "sequential", "ddp"))
        ph = r["spindle_phases_s"]
        total = sum(ph.values()) or 1.0
        shares = " / ".join(f"{100 * ph[k] / total:.0f}%"
                            for k in ("compute", "send_recv", "param_sync", "optimizer"))
        pred = predicted.get(r["workload"])
        print(f"| {r['workload']} | {sp:.1f} | {sq:.1f} | {dd:.1f} | {sq / sp:.2f}x |"
              f" {dd / sp:.2f}x | {f'{pred:.2f}x' if pred else '-'} | {shares} |")
    print("\nsequential plan (Spindle's runtime) against plain DDP, same ranks: ")
    for r in results:
        it = r["iteration_s"]
        sq, dd = _median_ms(it["sequential"]), _median_ms(it["ddp"])
        print(f"- {r['workload']}: sequential / DDP = {sq / dd:.3f} (target <= 1.10)")
    print("\nSimulator's prediction (compute + send/recv + param sync + optimizer) against the"
          " measured iteration:\n")
    print("| workload | plan | predicted ms | measured ms | error |")
    print("|---|---|---:|---:|---:|")
    for r in results:
        for p in PLANNED:
            meas = _median_ms(r["iteration_s"][p])
            pred = predicted_s.get((r["workload"], p), 0.0) * 1e3
            print(f"| {r['workload']} | {p} | {pred:.1f} | {meas:.1f} |"
                  f" {100 * (pred - meas) / meas:+.0f}% |")
    print("\nPer phase, predicted / measured ms (measured: each phase's per-rank mean, slowest"
          " rank; the phases of the slowest rank need not add up to its iteration):\n")
    print("| workload | plan | compute | send_recv | param_sync | optimizer |")
    print("|---|---|---:|---:|---:|---:|")
    for r in results:
        for p in PLANNED:
            pp = predicted_phases.get((r["workload"], p), {})
            mp = r.get("phases_s", {}).get(p, {})
            cells = " | ".join(f"{1e3 * pp.get(k, 0.0):.1f} / {1e3 * mp.get(k, 0.0):.1f}"
                               for k in ("compute", "send_recv", "param_sync", "optimizer"))
            print(f"| {r['workload']} | {p} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
