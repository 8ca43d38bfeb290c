"""Placement benchmark: Spindle's placement against the sequential (naive) placement.

For every shipped paper workload at 8/16/32/64 devices of the A800 model (8 per node), the
Spindle planner's waves are placed both ways and simulated: inter-wave send/recv volume (all,
and the part crossing nodes), its time and share of the simulated iteration, parameter-sync
time, and the modelled peak device memory (bf16 mixed precision + AdamW, 16 B/param; memory is
reported, not enforced, so that plans that do not fit still show their numbers; "fits" says
whether the peak is within the 80 GiB of an A800).  Then the memory options for QWen-VAL, and
the placement time of a 50-task workload on 1024 devices.

    .venv/bin/python benchmarks/placement_bench.py [--devices 8 16 32 64] [--hardware a800]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from spindle.costs.cluster import load_cluster
from spindle.costs.graph import contract
from spindle.costs.memory import GB
from spindle.costs.scalability import make_estimator
from spindle.planner.pipeline import PlanResult, evaluate, make_context
from spindle.planner.placement import PlacementError, best_candidate, place_candidates
from spindle.planner.registry import plan_waves
from spindle.planner.simulator import links_for_cluster, wave_compute_times

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fixtures import random_workload  # noqa: E402  (the tests' synthetic workloads)

PAPER = ["multitask-clip-4", "multitask-clip-7", "multitask-clip-10", "ofasys-4", "ofasys-7",
         "qwen-val-3"]


def _row(res: PlanResult) -> str:
    sim = res.simulation
    share = sim.send_recv_s / sim.makespan_s
    return (f"{sim.send_recv_bytes / GB:6.2f} | {sim.send_recv_bytes_inter / GB:6.2f} |"
            f" {sim.send_recv_s * 1e3:6.2f} ({share:5.1%}) | {sim.sync_s * 1e3:7.1f} |"
            f" {res.memory.peak_gb:6.1f} {'yes' if res.memory.fits() else 'NO '}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hardware", default="a800")
    ap.add_argument("--devices", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--workloads", nargs="+", default=PAPER)
    args = ap.parse_args()

    cols = "send/recv GB | inter-node GB | send/recv ms (share) | sync ms | peak GB fits"
    print(f"| workload | N | chosen | Spindle: {cols} | sequential: {cols} | inter-node x |")
    print("|---|---|---|" + "---|" * 10 + "---|")
    for name in args.workloads:
        for n in args.devices:
            res = {}
            for placement in ("spindle", "naive"):
                ctx = make_context(name, n, hardware=args.hardware, placement=placement,
                                   check_memory=False)
                res[placement] = evaluate(ctx, "spindle")
            waves = plan_waves("spindle", ctx.graph, ctx.estimator, n)
            # ranked as build_plan ranks them: with the waves' compute (the sync overlap)
            compute = wave_compute_times(waves, ctx.graph, ctx.estimator, ctx.links)
            chosen = best_candidate(place_candidates(ctx.graph, waves, ctx.cluster,
                                                     capacity_bytes=float("inf"),
                                                     wave_compute=compute)).name
            s, q = res["spindle"].simulation, res["naive"].simulation
            ratio = (q.send_recv_bytes_inter / s.send_recv_bytes_inter
                     if s.send_recv_bytes_inter else float("inf") if q.send_recv_bytes_inter
                     else 1.0)
            print(f"| {name} | {n} | {chosen} | {_row(res['spindle'])} | {_row(res['naive'])} |"
                  f" {ratio:.2f} |")

    print("\nQWen-VAL memory (Spindle plan, Spindle placement, peak GB per device; 'fits' tries"
          " the placement with the 80 GiB limit):\n")
    print("| N | memory model | peak GB | mean GB | placement with the limit |")
    print("|---|---|---|---|---|")
    for n in (32, 64):
        for label, opts in (("bf16-mixed + AdamW, 18 B/param, no strategy", {"zero": 0}),
                            ("+ ZeRO-1 optimizer sharding", {"zero": 1}),
                            ("+ ZeRO-2 gradients sharded too", {"zero": 2}),
                            ("+ ZeRO-2 + activation recompute", {"zero": 2, "recompute": True}),
                            ("the planner's choice (default)", {})):
            ctx = make_context("qwen-val-3", n, hardware=args.hardware, check_memory=False,
                               **opts)
            r = evaluate(ctx, "spindle")
            try:
                evaluate(make_context("qwen-val-3", n, hardware=args.hardware, **opts), "spindle")
                verdict = "fits"
            except PlacementError as err:
                verdict = str(err)
            print(f"| {n} | {label} | {r.memory.peak_gb:.1f} | {r.memory.mean_bytes / GB:.1f} |"
                  f" {verdict} |")

    print()
    w = random_workload(50)
    g = contract(w)
    c = load_cluster(args.hardware, num_devices=1024)
    est = make_estimator(c.hardware, None, c.devices_per_node)
    t0 = time.perf_counter()
    waves = plan_waves("spindle", g, est, 1024)
    t1 = time.perf_counter()
    compute = wave_compute_times(waves, g, est, links_for_cluster(c))
    cands = place_candidates(g, waves, c, capacity_bytes=float("inf"), wave_compute=compute)
    t2 = time.perf_counter()
    best = best_candidate(cands)
    print(f"50-task random workload ({len(g.metaops)} MetaOps) on 1024 devices: planner"
          f" {t1 - t0:.2f} s, placement ({len(cands)} candidates, simulated) {t2 - t1:.2f} s;"
          f" chosen {best.name}: inter-node {best.communication.bytes_inter / GB:.2f} GB,"
          f" sequential placement "
          f"{next(x for x in cands if x.name == 'sequential').communication.bytes_inter / GB:.2f}"
          f" GB")


if __name__ == "__main__":
    main()
