"""The planning pipeline: workload -> MetaGraph -> estimator -> planner -> placement -> Plan.

This is the one function the CLI, the launcher and the benchmarks call; it times the planning
and keeps the pieces (graph, estimator, links) a caller needs to simulate or inspect the plan.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from spindle import bounds
from spindle.estimator import Estimator
from spindle.graph import MetaGraph, contract
from spindle.hardware import HardwareModel, load_hardware
from spindle.placement import place_naive
from spindle.plan import Plan, plan_metaops, validate_plan
from spindle.planners import PLANNERS, PlanningError, plan_waves
from spindle.scalability import make_estimator
from spindle.simulator import Links, SimulationResult, simulate
from spindle.workload import Workload, load_workload

BASELINES = ("sequential", "optimus", "distmm-mt", "uniform")


@dataclass
class PlanningContext:
    """Everything fixed before a planner runs: the graph, the cost model and the cluster."""

    workload: Workload
    graph: MetaGraph
    estimator: Estimator
    hardware: HardwareModel
    links: Links
    num_devices: int
    devices_per_node: int


@dataclass
class PlanResult:
    plan: Plan
    simulation: SimulationResult
    relaxed_optimum_s: float
    lower_bound_s: float
    compute_lower_bound_s: float
    planning_time_s: float


def links_for(hw: HardwareModel, devices_per_node: int) -> Links:
    return Links(
        devices_per_node=devices_per_node,
        intra_node_bw=hw.intra_node_bandwidth,
        inter_node_bw=hw.inter_node_bandwidth,
        latency_s=hw.collective_latency_s,
        activation_bytes=hw.activation_bytes,
        grad_bytes=hw.grad_bytes,
    )


def make_context(
    workload: Workload | str | Path,
    num_devices: int,
    devices_per_node: int | None = None,
    hardware: str | Path | HardwareModel = "a800",
    profile: str | Path | None = None,
) -> PlanningContext:
    if num_devices < 1:
        raise PlanningError(f"--devices {num_devices}: the device count must be at least 1")
    w = workload if isinstance(workload, Workload) else load_workload(workload)
    hw = hardware if isinstance(hardware, HardwareModel) else load_hardware(hardware)
    dpn = devices_per_node if devices_per_node is not None else min(hw.devices_per_node, num_devices)
    if dpn < 1:
        raise PlanningError(f"--devices-per-node {dpn}: must be at least 1")
    graph = contract(w)
    est = make_estimator(hw, Path(profile) if profile else None, dpn)
    return PlanningContext(w, graph, est, hw, links_for(hw, dpn), num_devices, dpn)


def build_plan(ctx: PlanningContext, planner: str = "spindle") -> tuple[Plan, float]:
    """Run ``planner`` and place its waves; returns the validated plan and the planning time."""
    t0 = time.perf_counter()
    waves = plan_waves(planner, ctx.graph, ctx.estimator, ctx.num_devices)
    placed = place_naive(waves, ctx.num_devices)
    elapsed = time.perf_counter() - t0
    plan = Plan(
        planner=planner, workload=ctx.workload.name,
        workload_fingerprint=ctx.workload.fingerprint(), num_devices=ctx.num_devices,
        devices_per_node=ctx.devices_per_node, hardware=ctx.hardware.name,
        metaops=plan_metaops(ctx.graph), waves=tuple(placed),
    )
    validate_plan(plan, ctx.graph, source=f"{planner} plan")
    return plan, elapsed


def evaluate(ctx: PlanningContext, planner: str = "spindle") -> PlanResult:
    plan, elapsed = build_plan(ctx, planner)
    sim = simulate(plan, ctx.graph, ctx.estimator, ctx.links)
    c_star = bounds.relaxed_optimum(ctx.graph, ctx.estimator, ctx.num_devices)
    lb = bounds.lower_bound(ctx.graph, ctx.estimator, ctx.num_devices)
    lb_compute = bounds.lower_bound(ctx.graph, _ComputeOnly(ctx.estimator), ctx.num_devices)
    plan.estimates.update(
        schedule_s=sim.schedule_s, makespan_s=sim.makespan_s, relaxed_optimum_s=c_star,
        lower_bound_s=lb, planning_time_s=elapsed,
    )
    return PlanResult(plan, sim, c_star, lb, lb_compute, elapsed)


def make_plan(
    workload: Workload | str | Path,
    planner: str = "spindle",
    num_devices: int = 1,
    devices_per_node: int | None = None,
    hardware: str | Path | HardwareModel = "a800",
    profile: str | Path | None = None,
) -> Plan:
    """Plan ``workload`` on ``num_devices`` with ``planner``; the plan carries its estimates."""
    ctx = make_context(workload, num_devices, devices_per_node, hardware, profile)
    return evaluate(ctx, planner).plan


@dataclass
class _ComputeOnly:
    """An estimator view whose time is the compute time (for the makespan's lower bound)."""

    inner: Estimator

    def time(self, op, n):  # type: ignore[no-untyped-def]
        return self.inner.compute_time(op, n)

    def compute_time(self, op, n):  # type: ignore[no-untyped-def]
        return self.inner.compute_time(op, n)

    def valid_counts(self, op, num_devices):  # type: ignore[no-untyped-def]
        return self.inner.valid_counts(op, num_devices)


__all__ = ["PLANNERS", "BASELINES", "PlanningContext", "PlanResult", "make_context", "build_plan",
           "evaluate", "make_plan"]
