"""The planning pipeline: workload -> MetaGraph -> estimator -> planner -> placement -> Plan.

This is the one function the CLI, the launcher and the benchmarks call; it times the planning
and keeps the pieces (graph, estimator, cluster, links) a caller needs to simulate or inspect
the plan.

Placement is Spindle's topology- and memory-aware :func:`spindle.planner.placement.place` by
default; ``placement="naive"`` keeps :func:`spindle.planner.baselines.place_naive` (the sequential
placement) for comparison.  With ``check_memory`` (default) a plan whose devices do not fit their
memory is refused with one :class:`spindle.planner.placement.PlacementError` line; without it the
plan is kept and :attr:`PlanResult.memory` says which devices overflow.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Sequence

from spindle.costs.cluster import MAX_DEVICES, Cluster, load_cluster
from spindle.costs.estimator import Estimator
from spindle.costs.graph import MetaGraph, contract
from spindle.costs.hardware import HardwareModel
from spindle.costs.memory import (
    MemoryModel,
    MemoryReport,
    memory_report,
)
from spindle.costs.profile import load_profile
from spindle.costs.scalability import make_estimator
from spindle.declare.workload import Workload, load_workload
from spindle.plan.checks import validate_plan
from spindle.plan.contract import MetaOp, Plan, Wave
from spindle.plan.layout import ParameterIndex
from spindle.planner import bounds
from spindle.planner.placement import PlacementError, place, placed_plan
from spindle.planner.registry import PLANNERS, PlanningError, plan_waves
from spindle.planner.scheduler import schedule_variants
from spindle.planner.search import Candidate, memory_error, naive_placement, search
from spindle.planner.simulator import (
    Links,
    SimulationResult,
    links_for_cluster,
    simulate,
    wave_compute_times,
)
from spindle.planner.strategy import (
    Chosen,
    Strategy,
    choose,
    ladder,
    ladder_error,
    uniform_model,
)

log = logging.getLogger(__name__)

BASELINES = ("sequential", "optimus", "distmm-mt", "uniform")
ALTERNATIVES_LIMIT = 1 << 16  # MetaOps x devices up to which the search also simulates ZeRO-1
PLACEMENTS = ("spindle", "naive")
Placement = Literal["spindle", "naive"]


@dataclass
class PlanningContext:
    """Everything fixed before a planner runs: the graph, the cost model and the cluster."""

    workload: Workload
    graph: MetaGraph
    estimator: Estimator
    cluster: Cluster
    links: Links
    memory_model: MemoryModel
    placement: Placement = "spindle"
    check_memory: bool = True
    parameter_index: ParameterIndex | None = None
    # Spindle's plan by the whole simulated iteration (spindle.planner.search); False: the
    # wavefront schedule alone (the A/B of the search)
    sync_aware: bool = True
    zero: int | None = None  # the user's ZeRO stage for every MetaOp (None: chosen)

    @property
    def hardware(self) -> HardwareModel:
        return self.cluster.hardware

    @functools.cached_property
    def bounds(self) -> tuple[float, float, float]:
        """(relaxed optimum C*, lower bound of any schedule, compute-only lower bound of any
        simulated iteration): properties of the workload and cluster, the same for every
        planner, so computed once."""
        n = self.num_devices
        return (
            bounds.relaxed_optimum(self.graph, self.estimator, n),
            bounds.global_lower_bound(self.graph, self.estimator, n),
            bounds.global_lower_bound(self.graph, _ComputeOnly(self.estimator), n),
        )

    @property
    def num_devices(self) -> int:
        return self.cluster.num_devices

    @property
    def devices_per_node(self) -> int:
        return self.cluster.devices_per_node


@dataclass
class PlanResult:
    plan: Plan
    simulation: SimulationResult
    memory: MemoryReport
    relaxed_optimum_s: float
    lower_bound_s: float
    compute_lower_bound_s: float
    planning_time_s: float

    @property
    def send_recv_bytes(self) -> float:
        """Inter-wave bytes per iteration (forward + backward, between different devices)."""
        return self.simulation.send_recv_bytes

    @property
    def send_recv_time_s(self) -> float:
        return self.simulation.send_recv_s

    @property
    def peak_memory_gb(self) -> float:
        """The largest device's modelled peak (GB = 1e9 bytes)."""
        return self.memory.peak_gb

    @property
    def memory_imbalance(self) -> float:
        """Peak over mean device memory (1.0 = balanced)."""
        return self.memory.imbalance

    @property
    def memory_fits(self) -> bool:
        return self.memory.fits()


def make_context(
    workload: Workload | str | Path,
    num_devices: int | None = None,
    devices_per_node: int | None = None,
    hardware: str | Path | HardwareModel = "a800",
    profile: str | Path | None = None,
    *,
    cluster: str | Path | Cluster | None = None,
    nodes: int | None = None,
    device_memory_gib: float | None = None,
    placement: Placement = "spindle",
    check_memory: bool = True,
    zero: int | None = None,
    recompute: bool = False,
    sync_aware: bool = True,
    reduce_bytes: int | None = None,
) -> PlanningContext:
    """The fixed inputs of planning.  The cluster is ``cluster`` (a :class:`Cluster`, a cluster
    YAML file, a hardware file or preset name) or else ``hardware``, sized by ``num_devices`` or
    ``nodes`` (command-line sizes win over a cluster file's).  ``zero`` (a ZeRO stage for every
    MetaOp) and ``recompute`` (every activation recomputed) fix the memory strategy the
    planner otherwise chooses (:mod:`spindle.planner.strategy`).  ``sync_aware`` False plans
    Spindle
    by the wave schedule alone (no search over candidates, :mod:`spindle.planner.search`).
    ``reduce_bytes``: bytes per gradient element in the all-reduce (2: the runtime's
    ``--reduce-dtype bf16``; default: the hardware's ``grad_bytes``)."""
    if num_devices is not None and not 1 <= num_devices <= MAX_DEVICES:
        raise PlanningError(f"--devices {num_devices}: the device count must be 1 to"
                            f" {MAX_DEVICES}")
    if devices_per_node is not None and devices_per_node < 1:
        raise PlanningError(f"--devices-per-node {devices_per_node}: must be at least 1")
    if placement not in PLACEMENTS:
        raise PlanningError(f"placement '{placement}': expected one of {', '.join(PLACEMENTS)}")
    w = workload if isinstance(workload, Workload) else load_workload(workload)
    if isinstance(cluster, Cluster):
        cl = cluster
    else:
        cl = load_cluster(cluster if cluster is not None else hardware, num_devices, nodes,
                          devices_per_node, device_memory_gib=device_memory_gib)
    graph = contract(w)
    measured = None
    if profile:
        measured = load_profile(profile)
    est = make_estimator(cl.hardware, measured, cl.devices_per_node, w.fingerprint())
    links = links_for_cluster(cl, profile=measured)
    if reduce_bytes is not None:
        links = replace(links, grad_bytes=reduce_bytes)
    return PlanningContext(
        w, graph, est, cl, links,
        replace(cl.memory_model(), recompute=recompute), placement,
        check_memory, graph.parameter_index, sync_aware, zero,
    )


def build_plan(ctx: PlanningContext, planner: str = "spindle",
               schedule: list[Wave] | None = None) -> tuple[Plan, float]:
    """Run ``planner`` and place its waves; returns the validated plan and the planning time
    (planner + placement, and for Spindle the sync-aware search over its candidates).
    ``schedule``: a baseline's waves when already planned (they are planned once either way).

    The memory strategy is part of the plan, chosen the same way for every planner, baselines
    included (:mod:`spindle.planner.strategy`): the waves are placed under ``none``, then
    ZeRO-1, ZeRO-2, recomputation, ... until they fit (and, when that was not ``none``, under
    the most memory-saving one too), then the fitting strategy with the shortest simulated
    iteration is kept and refined per MetaOp.  The plan
    lists what recomputes (:attr:`Plan.recompute`) and shards (:attr:`Plan.zero`); the
    simulator charges it and the runtime executes it.  ``--zero`` / ``--recompute`` fix it."""
    t0 = time.perf_counter()
    strategies = ladder(ctx.zero, ctx.memory_model.recompute)
    base = replace(ctx.memory_model, recompute=False)
    capacity = ctx.cluster.memory_bytes if ctx.check_memory else math.inf
    index = ctx.parameter_index or ctx.graph.parameter_index
    last: PlacementError | None = None
    candidates = spindle_candidates(ctx) if planner == "spindle" and ctx.sync_aware else None
    if candidates is None and schedule is None:
        schedule = plan_waves(planner, ctx.graph, ctx.estimator, ctx.num_devices)
    for fitted in strategies:
        # Spindle's search also simulates each placement with ZeRO-1, which can make another
        # schedule the fastest
        faster = Strategy(fitted.recompute, 1)
        # (each placement simulated twice: up to ALTERNATIVES_LIMIT MetaOps x devices, every
        # paper workload, not hundreds of MetaOps on thousands of devices)
        alternatives = [uniform_model(base, faster)] if (
            candidates is not None and fitted.zero == 0 and faster in strategies
            and len(ctx.graph.metaops) * ctx.num_devices <= ALTERNATIVES_LIMIT) else []
        try:
            placed, choice, won = _placed(ctx, planner, uniform_model(base, fitted), candidates,
                                          alternatives, schedule)
            forced = fitted != strategies[0]
            if alternatives and won == alternatives[0]:
                fitted = faster
            break
        except PlacementError as err:
            last = err
            log.info("%s with %s: %s", planner, fitted.label, err)
    else:
        assert last is not None
        raise ladder_error(last, strategies) if len(strategies) > 1 else last

    def plan_of(waves: list[Wave], model: MemoryModel) -> Plan:
        return placed_plan(ctx.graph, ctx.cluster, planner, waves, model)

    simulated: dict[tuple[tuple[Wave, ...], tuple[int, ...], tuple[tuple[int, int], ...]],
                    float] = {}

    def time_of(plan: Plan) -> float:  # each placed strategy simulated once
        key = (plan.waves, plan.recompute, tuple(sorted(plan.zero.items())))
        if key not in simulated:
            simulated[key] = simulate(plan, ctx.graph, ctx.estimator, ctx.links,
                                      index).makespan_s
        return simulated[key]

    def settle(fitted: Strategy, placed: list[Wave], choice: dict[str, str]
               ) -> tuple[float, list[Wave], dict[str, str], Chosen]:
        chosen = choose(ctx.graph, placed, fitted, strategies, base, capacity, time_of, plan_of,
                        refine_zero=ctx.zero is None,
                        refine_recompute=not ctx.memory_model.recompute, forced=forced)
        t = time_of(plan_of(placed, chosen.model))
        if candidates is None and chosen.uniform is not None and chosen.uniform != fitted:
            # a baseline's waves placed again under the chosen strategy (the placement weighs
            # its sync; Spindle's search simulated every placement with it already)
            try:
                again, choice_again, _ = _placed(ctx, planner, chosen.model, None, (),
                                                 schedule)
                t_again = time_of(plan_of(again, chosen.model))
                if t_again < t:
                    placed, choice, t = again, choice_again, t_again
            except PlacementError as err:  # it fits the first placement only
                log.info("%s with %s placed again: %s", planner, chosen.label, err)
        return t, placed, choice, chosen

    options = [settle(fitted, placed, choice)]
    if fitted != strategies[0] and fitted != strategies[-1]:
        # memory-bound: the most memory-saving strategy may admit a much shorter schedule
        try:
            most = strategies[-1]
            waves, most_choice, _ = _placed(ctx, planner, uniform_model(base, most), candidates,
                                            (), schedule)
            options.append(settle(most, waves, most_choice))
        except PlacementError as err:
            log.info("%s with %s: %s", planner, strategies[-1].label, err)
    t_best, placed, choice, chosen = min(options, key=lambda o: o[0])
    recompute, zero = chosen.model.strategy(ctx.graph.metaops)
    choice["memory"] = chosen.label
    if candidates is not None:
        # the search picks the schedule before its strategy is refined per MetaOp and simulates
        # the ZeRO-1 alternative on placements made without it, so a baseline's own plan (its
        # ladder, its refinement, its placement again under the chosen strategy) can come out
        # faster: Spindle never returns a slower one
        for cand in candidates:
            name = cand.label
            if name not in BASELINES or sum(wave_compute_times(
                    cand.waves, ctx.graph, ctx.estimator, ctx.links)) >= t_best:
                continue  # its compute alone (no strategy adds less) cannot beat the plan
            try:
                other, _ = build_plan(ctx, name, list(cand.waves))
            except (PlacementError, PlanningError):
                continue
            if time_of(other) < t_best * (1 - 1e-12):
                t_best, placed, recompute, zero = (time_of(other), list(other.waves),
                                                   other.recompute, dict(other.zero))
                choice = {**other.choice, "schedule": f"{name}'s own plan", "searched":
                          choice["searched"], "placement": ctx.placement}
    elapsed = time.perf_counter() - t0
    plan = Plan(
        planner=planner, workload=ctx.workload.name,
        workload_fingerprint=ctx.workload.fingerprint(), num_devices=ctx.num_devices,
        devices_per_node=ctx.devices_per_node, hardware=ctx.hardware.name,
        metaops=tuple(ctx.graph.metaops), waves=tuple(placed), choice=choice,
        recompute=recompute, zero=zero,
    )
    validate_plan(plan, ctx.graph.metaops, source=f"{planner} plan")
    return plan, elapsed


def _placed(ctx: PlanningContext, planner: str, model: MemoryModel,
            candidates: list[Candidate] | None, alternatives: Sequence[MemoryModel] = (),
            schedule: list[Wave] | None = None,
            ) -> tuple[list[Wave], dict[str, str], MemoryModel]:
    """``planner``'s placed waves under ``model``'s memory strategy (and what the search chose
    among ``candidates``, Spindle's, each also simulated under ``alternatives``; the strategy
    it chose); raises :class:`PlacementError` when they do not fit memory."""
    capacity = ctx.cluster.memory_bytes if ctx.check_memory else math.inf
    index = ctx.parameter_index or ctx.graph.parameter_index
    if candidates is not None:
        found = search(candidates, ctx.graph, ctx.estimator, ctx.cluster, ctx.links,
                       model, capacity, index, naive_placement=ctx.placement == "naive",
                       alternatives=alternatives)
        return found.waves, {
            "schedule": found.schedule, "placement": found.placement,
            "searched": f"{found.placed} of {found.considered} candidate schedules placed"
        }, found.model or model
    assert schedule is not None  # build_plan plans a baseline's waves once
    waves = schedule
    if ctx.placement != "naive":
        recompute, _ = model.strategy(ctx.graph.metaops)
        return place(ctx.graph, waves, ctx.cluster, model, capacity, index,
                     wave_compute_times(waves, ctx.graph, ctx.estimator, ctx.links, recompute),
                     ctx.links), {}, model
    return naive_placement(waves, ctx.graph, ctx.cluster, model, capacity, index,
                           f"{planner} plan"), {}, model


def spindle_candidates(ctx: PlanningContext) -> list[Candidate]:
    """The schedules Spindle's search chooses from: the wavefront scheduler's variants (the
    first with every placement, the others with the placement that won for it), then every
    baseline's schedule that it can build, with every placement (labelled by the baseline's
    name: the search then never returns a plan slower than that baseline's)."""
    out = [Candidate(label, waves, exhaustive=k == 0) for k, (label, waves) in
           enumerate(schedule_variants(ctx.graph, ctx.estimator, ctx.num_devices))]
    for name in BASELINES:
        try:
            out.append(Candidate(name, plan_waves(name, ctx.graph, ctx.estimator,
                                                  ctx.num_devices)))
        except PlanningError as err:
            log.info("search: no %s schedule: %s", name, err)
    return out


def plan_memory(ctx: PlanningContext, plan: Plan) -> MemoryReport:
    """The plan's per-device memory against the cluster's device memory."""
    return memory_report(plan, ctx.graph, ctx.memory_model, ctx.cluster.memory_bytes,
                         ctx.parameter_index)


def evaluate(ctx: PlanningContext, planner: str = "spindle") -> PlanResult:
    plan, elapsed = build_plan(ctx, planner)
    mem = plan_memory(ctx, plan)
    if ctx.check_memory and not mem.fits():
        # a safety net: both placements refuse a plan that does not fit before this
        raise memory_error(ctx.graph, mem, f"{planner} plan with {ctx.placement} placement")
    sim = simulate(plan, ctx.graph, ctx.estimator, ctx.links, ctx.parameter_index)
    c_star, lb, lb_compute = ctx.bounds
    plan.estimates.update(
        schedule_s=sim.schedule_s, makespan_s=sim.makespan_s, relaxed_optimum_s=c_star,
        lower_bound_s=lb, planning_time_s=elapsed, send_recv_bytes=sim.send_recv_bytes,
        send_recv_time_s=sim.send_recv_s, compute_s=sim.compute_s, param_sync_s=sim.sync_s,
        optimizer_s=sim.optimizer_s, peak_memory_gb=mem.peak_gb,
        memory_imbalance=mem.imbalance,
    )
    return PlanResult(plan, sim, mem, c_star, lb, lb_compute, elapsed)


def make_plan(
    workload: Workload | str | Path,
    planner: str = "spindle",
    num_devices: int | None = 1,
    devices_per_node: int | None = None,
    hardware: str | Path | HardwareModel = "a800",
    profile: str | Path | None = None,
    **context_options: object,
) -> Plan:
    """Plan ``workload`` on ``num_devices`` with ``planner``; the plan carries its estimates.
    ``context_options`` go to :func:`make_context` (cluster, nodes, placement, ...)."""
    ctx = make_context(workload, num_devices, devices_per_node, hardware, profile,
                       **context_options)  # type: ignore[arg-type]
    return evaluate(ctx, planner).plan


@dataclass
class _ComputeOnly:
    """An estimator view whose time is the compute time (for the makespan's lower bound)."""

    inner: Estimator

    def time(self, op: MetaOp, n: int) -> float:
        return self.inner.compute_time(op, n)

    def compute_time(self, op: MetaOp, n: int) -> float:
        return self.inner.compute_time(op, n)

    def valid_counts(self, op: MetaOp, num_devices: int) -> list[int]:
        return self.inner.valid_counts(op, num_devices)


__all__ = ["PLANNERS", "BASELINES", "PLACEMENTS", "PlanningContext", "PlanResult",
           "make_context", "build_plan", "plan_memory", "evaluate", "make_plan"]
