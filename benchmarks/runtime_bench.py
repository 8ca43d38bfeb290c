"""Runtime benchmark: measured iteration time of the Spindle plan, the sequential plan (both run
by Spindle's runtime) and plain DDP (``spindle.runtime.ddp_baseline``), side by side on the
same ranks, and the simulator's prediction of each plan against its measured time.

    .venv/bin/python benchmarks/runtime_bench.py --profile-each [--workload W ...] [--nproc 2]
        [--cycles 3] [--rounds 3] [--steps 10] [--warmup 3] [--json FILE]

Per workload and *cycle*: ``spindle profile`` on this machine (``--profile-each``), the two
plans from that profile, then one torchrun launch (``--worker``) that runs, per round, the
three contenders one after the other: every iteration starts after a barrier and the slowest
rank's time counts; input data generation is not timed (for DDP neither).  A cycle's
prediction error compares its plans' simulated iteration with their median measured iteration;
the table reports every cycle's error and their median (identical cycles differ by up to
~15% on a shared 2-core box, so one cycle says little).  The default workloads are the
``small-*`` ones: the ``tiny-*`` ones iterate in ~20 ms, where per-operator Python overhead and
gloo's millisecond wake-ups dominate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PLANNED = ("spindle", "sequential")
# the Spindle plan run with its gradient buckets started inside the backward of their ready wave
# ("layer"), after it ("wave") and after the whole backward ("after")
SYNC_VARIANTS: dict[str, dict[str, Any]] = {
    "spindle/sync-layer": {"sync_start": "layer"},
    "spindle/sync-wave": {"sync_start": "wave"},
    "spindle/sync-after": {"overlap_sync": False},
}
# ... and with its slices' rows sent in K chunks as they are computed (--transfer-chunks K)
CHUNK_VARIANTS: dict[str, dict[str, Any]] = {
    "spindle/chunks-2": {"transfer_chunks": 2},
    "spindle/chunks-4": {"transfer_chunks": 4},
}
DEFAULT_WORKLOADS = ("small-multitask-clip", "small-ofasys", "small-qwen-val")


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

    from spindle.declare.workload import load_workload
    from spindle.plan.checks import load_plan
    from spindle.runtime.config import RunConfig
    from spindle.runtime.ddp_baseline import run_ddp_baseline
    from spindle.runtime.executor import TrainingRun

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    plans_dir = Path(args.plans_dir)
    for name in args.workload:
        workload = load_workload(name)
        runs = {
            p: TrainingRun(workload, load_plan(plans_dir / f"{name}-{p}.json"), rank, world,
                           device, RunConfig(seed=args.seed))
            for p in PLANNED
        }
        # the Spindle plan again with the gradient sync started later (the sync A/B)
        for label, config in (SYNC_VARIANTS | CHUNK_VARIANTS).items():
            runs[label] = TrainingRun(workload, load_plan(plans_dir / f"{name}-spindle.json"),
                                      rank, world, device, RunConfig(seed=args.seed, **config))
        iterations: dict[str, list[float]] = {p: [] for p in (*runs, "ddp")}
        phases: dict[str, dict[str, float]] = {}
        next_step = {p: 0 for p in runs}
        for _ in range(args.rounds):
            for p, run in runs.items():
                warm = range(next_step[p], next_step[p] + args.warmup)
                _time_runtime(run, warm, device)
                timed = range(warm.stop, warm.stop + args.steps)
                res = _time_runtime(run, timed, device)
                next_step[p] = timed.stop
                iterations[p] += res["iteration_s"]
                phases[p] = res["phases_s"]
            ddp = run_ddp_baseline(workload, RunConfig(steps=args.steps, seed=args.seed),
                                   warmup=args.warmup)
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


@dataclass
class Cycle:
    """One profile -> plan -> measure cycle of one workload."""

    workload: str
    predicted_s: dict[str, float]  # plan -> the simulator's iteration
    predicted_phases: dict[str, dict[str, float]]
    measured: dict[str, Any]  # the worker's record

    def measured_ms(self, contender: str) -> float:
        return _median_ms(self.measured["iteration_s"][contender])

    def error(self, plan: str) -> float:
        meas = self.measured_ms(plan)
        return (1e3 * self.predicted_s[plan] - meas) / meas


def run_cycle(name: str, args: argparse.Namespace) -> Cycle:
    """Profile ``name`` on this machine (with ``--profile-each``), plan it, and measure the
    plans and DDP at once: the profile and the timed iterations see the same machine (on a
    shared box its speed drifts over minutes)."""
    from spindle.planner.pipeline import make_plan

    predicted_s: dict[str, float] = {}
    phases: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="spindle-bench-") as tmp:
        profile = args.profile
        if args.profile_each:
            profile = str(Path(tmp) / f"{name}.profile.json")
            subprocess.run([sys.executable, "-m", "spindle.tools.cli", "profile", name,
                            "--devices", str(args.nproc), "--out", profile,
                            "--no-progress"], check=True)
        for p in PLANNED:
            plan = make_plan(name, p, args.nproc, args.nproc, args.hardware, profile)
            plan.save(Path(tmp) / f"{name}-{p}.json")
            est = plan.estimates
            predicted_s[p] = est.get("makespan_s", 0.0)
            phases[p] = {k: est.get(f"{k}_s", 0.0) for k in ("compute", "param_sync",
                                                             "optimizer")}
            phases[p]["send_recv"] = est.get("send_recv_time_s", 0.0)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={args.nproc}", __file__, "--worker", "--plans-dir", tmp,
               "--workload", name, "--steps", str(args.steps), "--warmup",
               str(args.warmup), "--rounds", str(args.rounds), "--seed", str(args.seed)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "LOGLEVEL": "ERROR"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the timed run of {name} failed:\n{proc.stderr[-4000:]}")
    (record,) = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return Cycle(name, predicted_s, phases, record)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", nargs="+", default=list(DEFAULT_WORKLOADS))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed iterations per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the contenders")
    parser.add_argument("--cycles", type=int, default=3,
                        help="independent profile -> plan -> measure cycles per workload; the"
                             " prediction error is their median (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hardware", default="cpu", help="hardware preset for planning")
    parser.add_argument("--profile", default=None, help="measured profile for planning")
    parser.add_argument("--profile-each", action="store_true",
                        help="run `spindle profile` on this machine at the start of every cycle"
                             " and plan (and predict) from that profile")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--plans-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0

    cycles: dict[str, list[Cycle]] = {}
    try:
        for c in range(args.cycles):
            for name in args.workload:
                cycles.setdefault(name, []).append(run_cycle(name, args))
                sys.stderr.write(f"cycle {c + 1}/{args.cycles}: {name} done\n")
    except (RuntimeError, subprocess.CalledProcessError) as err:
        sys.stderr.write(f"runtime_bench: {err}\n")
        return 1
    if args.json:
        Path(args.json).write_text(json.dumps(
            {n: [dataclasses.asdict(c) for c in cs] for n, cs in cycles.items()}, indent=1))

    def pooled(cs: list[Cycle], contender: str) -> float:
        return _median_ms([t for c in cs for t in c.measured["iteration_s"][contender]])

    print(f"Measured on {args.nproc} CPU ranks (gloo): {args.cycles} cycles x {args.rounds}"
          f" rounds x {args.steps} iterations per contender, medians; plans from the"
          f" '{args.profile or ('profile of each cycle' if args.profile_each else args.hardware)}'"
          " cost model.\n")
    print("| workload | Spindle ms | sequential ms | DDP ms | Spindle vs sequential |"
          " Spindle vs DDP | predicted vs seq. | sequential / DDP (target <= 1.10) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, cs in cycles.items():
        sp, sq, dd = (pooled(cs, k) for k in ("spindle", "sequential", "ddp"))
        pred = statistics.median(c.predicted_s["sequential"] / c.predicted_s["spindle"]
                                 for c in cs)
        print(f"| {name} | {sp:.1f} | {sq:.1f} | {dd:.1f} | {sq / sp:.2f}x | {dd / sp:.2f}x |"
              f" {pred:.2f}x | {sq / dd:.3f} |")
    print("\nGradient sync started inside a wave (`--sync-start layer`, CUDA's default), after"
          " its ready wave (`--sync-start wave`, CPU's default) and after the whole backward"
          " (`--no-overlap-sync`), the Spindle plan in the same launch; communication hidden ="
          " (compute + communication - overlapped total) / communication, with compute +"
          " communication = the no-overlap iteration and communication = its send/recv +"
          " param-sync phases:\n")
    print("| workload | layer ms | wave ms | after ms | layer vs wave | hidden (layer) |"
          " hidden (wave) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, cs in cycles.items():
        lay, wav, aft = (pooled(cs, k) for k in ("spindle/sync-layer", "spindle/sync-wave",
                                                 "spindle/sync-after"))
        ph = cs[-1].measured["phases_s"]["spindle/sync-after"]
        comm = 1e3 * (ph["send_recv"] + ph["param_sync"])
        print(f"| {name} | {lay:.1f} | {wav:.1f} | {aft:.1f} | {wav / lay:.3f}x |"
              f" {100 * (aft - lay) / comm:.0f}% | {100 * (aft - wav) / comm:.0f}% |")
    print("\nChunked transfers (`--transfer-chunks K`: a slice computed in K row chunks, each"
          " sent as soon as computed; gradients likewise), the Spindle plan in the same launch;"
          " send/recv = that phase's per-rank mean in the last cycle (chunk sends are posted"
          " inside the compute phase):\n")
    print("| workload | K=1 ms | K=2 ms | K=4 ms | K=2 vs 1 | K=4 vs 1 |"
          " send/recv ms K=1 / 2 / 4 |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, cs in cycles.items():
        one, two, four = (pooled(cs, k) for k in ("spindle", "spindle/chunks-2",
                                                  "spindle/chunks-4"))
        ph = cs[-1].measured["phases_s"]
        sr = " / ".join(f"{1e3 * ph[k]['send_recv']:.1f}" for k in
                        ("spindle", "spindle/chunks-2", "spindle/chunks-4"))
        print(f"| {name} | {one:.1f} | {two:.1f} | {four:.1f} | {one / two:.3f}x |"
              f" {one / four:.3f}x | {sr} |")
    print("\nSimulator's prediction (compute + send/recv + param sync + optimizer) against the"
          " measured iteration, per cycle (each cycle's own profile), and the median error:\n")
    head = " | ".join(f"cycle {i + 1} pred. / meas. ms" for i in range(args.cycles))
    print(f"| workload | plan | {head} | errors | median error |")
    print("|---|---|" + "---:|" * args.cycles + "---|---:|")
    for name, cs in cycles.items():
        for p in PLANNED:
            cells = " | ".join(f"{1e3 * c.predicted_s[p]:.1f} / {c.measured_ms(p):.1f}"
                               for c in cs)
            errs = [c.error(p) for c in cs]
            listed = ", ".join(f"{100 * e:+.0f}%" for e in errs)
            print(f"| {name} | {p} | {cells} | {listed} | {100 * statistics.median(errs):+.0f}% |")
    print("\nPer phase in the last cycle, predicted / measured ms (measured: each phase's per-rank"
          " mean, slowest rank; a rank waiting for a peer counts the wait in send/recv or"
          " param sync):\n")
    print("| workload | plan | compute | send_recv | param_sync | optimizer |")
    print("|---|---|---:|---:|---:|---:|")
    for name, cs in cycles.items():
        last = cs[-1]
        for p in PLANNED:
            pp = last.predicted_phases[p]
            mp = last.measured.get("phases_s", {}).get(p, {})
            cells = " | ".join(f"{1e3 * pp.get(k, 0.0):.1f} / {1e3 * mp.get(k, 0.0):.1f}"
                               for k in ("compute", "send_recv", "param_sync", "optimizer"))
            print(f"| {name} | {p} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
