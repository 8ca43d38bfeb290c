"""The ``spindle`` command line: workloads, profile, plan, show, train, export, demo.

Every user error (bad workload file, unknown name, impossible device count, bad plan) ends in one
line ``spindle: error: ...`` on stderr and exit status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from spindle.costs.graph import contract
from spindle.declare.workload import load_workload, shipped_workloads
from spindle.io import write_all
from spindle.layers import provider_for
from spindle.plan.checks import load_plan
from spindle.planner.pipeline import (
    BASELINES,
    PlanningContext,
    PlanResult,
    evaluate,
    make_context,
)
from spindle.planner.placement import PlacementError
from spindle.planner.registry import PLANNERS
from spindle.tools.demo import run_demo
from spindle.tools.export import add_export_arguments, run_export_command
from spindle.tools.launcher import add_train_arguments, run_train_command
from spindle.tools.profile import add_profile_arguments, run_profile_command
from spindle.tools.report import gantt, gantt_format, render_gantt, summary_text

log = logging.getLogger("spindle")


def _cmd_workloads(args: argparse.Namespace) -> int:
    print(f"{'name':<22} {'params':>9} {'tasks':>5} {'MetaOps':>7}  description")
    for name in shipped_workloads():
        w = load_workload(name)
        g = contract(w)
        params = provider_for(w).num_parameters()
        shown = f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e3:.0f}K"
        print(f"{name:<22} {shown:>9} {len(w.tasks):>5} {len(g.metaops):>7}  {w.description}")
    return 0


def _add_planning_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("workload", help="a shipped workload name (see `spindle workloads`) or a file")
    p.add_argument("--devices", "-n", type=int, required=True, help="number of devices N")
    p.add_argument("--devices-per-node", type=int, default=None,
                   help="devices per node (default: the hardware preset's, capped at N)")
    p.add_argument("--hardware", default="a800", help="hardware preset name or YAML file")
    p.add_argument("--profile", default=None, help="measured profile (from `spindle profile`)")
    p.add_argument("--cluster", default=None,
                   help="cluster preset (a800, h100, h200, cpu) or cluster YAML"
                        " (default: --hardware)")
    p.add_argument("--nodes", type=int, default=None, help="number of nodes (with --cluster)")
    p.add_argument("--device-memory-gib", type=float, default=None,
                   help="override the device memory (GiB)")
    p.add_argument("--placement", default="spindle", choices=["spindle", "naive"],
                   help="device placement: topology/memory aware, or naive sequential")
    p.add_argument("--no-memory-check", action="store_true",
                   help="plan even when a device's modelled memory exceeds its capacity")
    p.add_argument("--zero", type=int, choices=(0, 1, 2), default=None, metavar="STAGE",
                   help="ZeRO stage for every MetaOp (0 none, 1 AdamW state sharded over each"
                        " parameter's device group, 2 gradients too; default: the planner"
                        " chooses the memory strategy)")
    p.add_argument("--recompute", action="store_true",
                   help="recompute every activation in backward (default: the planner"
                        " chooses)")
    p.add_argument("--reduce-dtype", default="param", choices=["param", "bf16"],
                   help="gradient all-reduce in the hardware's gradient dtype, or bf16 (half"
                        " the bytes; spindle train --reduce-dtype bf16)")


def _context(args: argparse.Namespace) -> PlanningContext:
    return make_context(
        args.workload, args.devices, args.devices_per_node, args.hardware, args.profile,
        cluster=args.cluster, nodes=args.nodes, device_memory_gib=args.device_memory_gib,
        placement=args.placement, check_memory=not args.no_memory_check,
        zero=args.zero, recompute=args.recompute,
        reduce_bytes=2 if args.reduce_dtype == "bf16" else None,
    )


def _baselines(ctx: PlanningContext, skip: str) -> dict[str, PlanResult | str]:
    """Every baseline planner's result; one that cannot be placed in memory is reported as such
    instead of aborting the comparison."""

    out: dict[str, PlanResult | str] = {}
    for b in BASELINES:
        if b == skip:
            continue
        try:
            out[b] = evaluate(ctx, b)
        except PlacementError as err:
            out[b] = str(err)
    return out


def _cmd_plan(args: argparse.Namespace) -> int:
    fmt = gantt_format(args.gantt) if args.gantt else None  # a bad name fails before planning
    ctx = _context(args)
    res = evaluate(ctx, args.planner)
    baselines = {} if args.no_baselines else _baselines(ctx, args.planner)
    outputs: list[tuple[str, str | bytes]] = []
    if args.out:
        outputs.append((args.out, res.plan.to_json()))
    if args.gantt and fmt:
        outputs.append((args.gantt, render_gantt(res.plan, fmt)))
    write_all(outputs)  # the plan and its chart, or neither
    if args.json:
        sim = res.simulation
        out = {
            "workload": ctx.workload.name,
            "planner": args.planner,
            "devices": args.devices,
            "devices_per_node": ctx.devices_per_node,
            "hardware": ctx.hardware.name,
            "schedule_s": sim.schedule_s,
            "makespan_s": sim.makespan_s,
            "compute_s": sim.compute_s,
            "param_sync_s": sim.sync_s,
            "relaxed_optimum_s": res.relaxed_optimum_s,
            "lower_bound_s": res.lower_bound_s,
            "makespan_lower_bound_s": res.compute_lower_bound_s,
            "waves": len(res.plan.waves),
            "planning_time_s": res.planning_time_s,
            "send_recv_bytes": res.send_recv_bytes,
            "send_recv_time_s": res.send_recv_time_s,
            "peak_memory_gb": res.peak_memory_gb,
            "memory_imbalance": res.memory_imbalance,
            "memory_fits": res.memory_fits,
            "communication_hidden": sim.hidden_share,
            "choice": res.plan.choice,
            "baselines": {
                name: ({"error": b} if isinstance(b, str) else
                       {"schedule_s": b.simulation.schedule_s,
                        "makespan_s": b.simulation.makespan_s,
                        "send_recv_bytes": b.send_recv_bytes,
                        "peak_memory_gb": b.peak_memory_gb,
                        "waves": len(b.plan.waves)})
                for name, b in baselines.items()
            },
        }
        print(json.dumps(out, indent=1))
    else:
        print(summary_text(res, baselines))
        if args.out:
            print(f"plan written to {args.out}")
        if args.gantt:
            print(f"Gantt chart written to {args.gantt}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    plan = load_plan(args.plan)
    print(f"plan v{plan.version}: {plan.workload} ({plan.workload_fingerprint}), planner"
          f" {plan.planner}, {plan.num_devices} devices, {len(plan.waves)} waves,"
          f" schedule {plan.schedule_s * 1e3:.2f} ms")
    for k, v in sorted(plan.estimates.items()):
        print(f"  {k:<20} {v:.6g}")
    for k, c in sorted(plan.choice.items()):
        print(f"  chosen {k:<13} {c}")
    names = {m.id: m.name for m in plan.metaops}
    for i, w in enumerate(plan.waves):
        parts = ", ".join(f"{names[s.metaop]}[{s.layer_start}:{s.layer_end}]@{list(s.devices)}"
                          for s in w.slices)
        print(f"  wave {i:3d} {w.duration_s * 1e3:8.2f} ms  {parts}")
    if args.gantt:
        gantt(plan, args.gantt)
        print(f"Gantt chart written to {args.gantt}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spindle", description="Plan and run multi-task multi-modal training as waves.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("workloads", help="list the shipped workloads")
    p.set_defaults(func=_cmd_workloads)

    p = sub.add_parser("plan", help="plan a workload and compare with the baselines")
    _add_planning_arguments(p)
    p.add_argument("--planner", default="spindle", choices=sorted(PLANNERS))
    p.add_argument("--out", "-o", default=None, help="write the plan as JSON here")
    p.add_argument("--gantt", default=None, help="write a Gantt chart (.png .pdf .svg .jpg)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-baselines", action="store_true", help="skip the baseline planners")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("show", help="summarise a plan file (and draw it)")
    p.add_argument("plan")
    p.add_argument("--gantt", default=None, help="write a Gantt chart (.png .pdf .svg .jpg)")
    p.set_defaults(func=_cmd_show)


    p = sub.add_parser("profile", help="time real layers on this machine")
    add_profile_arguments(p)
    p.set_defaults(func=run_profile_command)

    p = sub.add_parser("train", help="plan and train with torchrun on local processes")
    add_train_arguments(p)
    p.set_defaults(func=run_train_command)

    p = sub.add_parser("export", help="write one state dict (by logical name) from a checkpoint")
    add_export_arguments(p)
    p.set_defaults(func=run_export_command)

    p = sub.add_parser("demo", help="plan and train the default tiny workload on 2 processes")
    p.add_argument("--workload", default="tiny-multitask-clip")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("spindle: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:  # every user-facing error type derives from these
        if args.debug:
            raise
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"spindle: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
