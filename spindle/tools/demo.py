"""`spindle demo`: plan the default tiny workload, train it with torchrun on local processes, and
compare Spindle's plan with the `sequential` plan, predicted and measured, side by side."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from spindle.planner.pipeline import evaluate, make_context
from spindle.runtime.config import RunConfig
from spindle.tools.launcher import torchrun_command

WARMUP = 3


def _measured(metrics: Path) -> tuple[float, dict[str, float]]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    times = [r["time_s"] for r in rows[WARMUP:]] or [r["time_s"] for r in rows]
    return statistics.median(times), rows[-1].get("losses", {})


def run_demo(args: argparse.Namespace) -> int:
    nproc, steps = args.nproc, max(args.steps, WARMUP + 2)
    ctx = make_context(args.workload, nproc, nproc, "cpu")
    print(f"Spindle demo: {args.workload}, {len(ctx.workload.tasks)} tasks,"
          f" {len(ctx.graph.metaops)} MetaOps, {nproc} CPU processes (gloo), {steps} steps")
    results = {}
    with tempfile.TemporaryDirectory(prefix="spindle-demo-") as tmp:
        for planner in ("spindle", "sequential"):
            res = evaluate(ctx, planner)
            plan_path = Path(tmp) / f"{planner}.json"
            metrics = Path(tmp) / f"{planner}.jsonl"
            res.plan.save(plan_path)
            print(f"\n[{planner}] plan: {len(res.plan.waves)} waves; training ...", flush=True)
            config = RunConfig(steps=steps, metrics=str(metrics))
            cmd = torchrun_command(nproc, [args.workload, "--plan", str(plan_path),
                                           *config.to_argv()])
            # torchrun prints a banner unless OMP_NUM_THREADS is set; 1 is its default anyway
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            code = subprocess.call(cmd, env=env)
            if code != 0:
                print(f"spindle: error: training with the {planner} plan failed (exit {code})",
                      file=sys.stderr)
                return code or 1
            results[planner] = (res, *_measured(metrics))
    print(f"\n{'planner':<11} {'waves':>5} {'measured iter (ms)':>19} {'final loss':>11}")
    for planner, (res, t, losses) in results.items():
        total = sum(losses.values()) if losses else float("nan")
        print(f"{planner:<11} {len(res.plan.waves):>5} {t * 1e3:>19.2f} {total:>11.4f}")
    t_sp, t_seq = results["spindle"][1], results["sequential"][1]
    print(f"\nmeasured speedup of Spindle over sequential: x{t_seq / t_sp:.2f}"
          f" (median of steps {WARMUP + 1}..{steps}; tiny CPU models are overhead-bound,"
          " see BENCHMARKS.md for the GPU-scale plans)")
    return 0
