"""Precision and recomputation benchmark: bf16-mixed against fp32, and --recompute against none,
on one CPU process (the runtime's TrainingRun with a one-device plan), side by side.

Prints, per workload: the largest and the final relative difference of the summed task loss
over ``--steps`` steps (bf16-mixed vs fp32, same seed and data), the time of those steps for
each precision, and the time of one step with and without recomputation.

    .venv/bin/python benchmarks/precision_bench.py [--workloads W ...] [--steps 50]
"""

from __future__ import annotations

import argparse
import time

import torch

from spindle.declare.workload import load_workload
from spindle.planner.pipeline import make_plan
from spindle.runtime.config import RunConfig
from spindle.runtime.executor import TrainingRun

DEFAULT = ("tiny-multitask-clip", "tiny-ofasys", "tiny-qwen-val", "small-ofasys")


def _run(workload: str, steps: int, **config: object) -> tuple[list[float], float]:
    w = load_workload(workload)
    plan = make_plan(w, "sequential", 1, 1, "cpu")
    run = TrainingRun(w, plan, 0, 1, torch.device("cpu"), RunConfig(seed=0, **config))
    t0 = time.perf_counter()
    losses = [sum(run.step(s).rank_iteration.task_losses.values()) for s in range(steps)]
    return losses, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="+", default=list(DEFAULT))
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    print(f"| workload | max loss diff bf16-mixed vs fp32 | final | fp32 {args.steps} steps (s)"
          f" | bf16-mixed (s) | step ms | step ms with --recompute |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.workloads:
        fp32, t32 = _run(name, args.steps, precision="fp32")
        bf16, t16 = _run(name, args.steps, precision="bf16-mixed")
        worst = max(abs(b - a) / abs(a) for a, b in zip(fp32, bf16, strict=True))
        final = abs(bf16[-1] - fp32[-1]) / abs(fp32[-1])
        _, plain = _run(name, 4)
        _, again = _run(name, 4, recompute=True)
        print(f"| {name} | {100 * worst:.2f}% | {100 * final:.2f}% | {t32:.1f} | {t16:.1f}"
              f" | {plain / 4 * 1e3:.0f} | {again / 4 * 1e3:.0f} |")


if __name__ == "__main__":
    main()
