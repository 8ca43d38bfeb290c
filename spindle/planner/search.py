"""Sync-aware plan search: Spindle's plan is the candidate with the shortest *whole* simulated
iteration, not the shortest wave schedule.

The wavefront scheduler minimises the wave schedule (sum of wave lengths under the estimator).
The iteration the runtime runs also pays what the schedule leaves out or only approximates: the
transfers between waves, the parameter sync of each device group with the part of it that hides
under the remaining backward, and the optimizer.  A schedule that is a little longer can have
far less exposed sync (an LLM's gradients all-reduced while smaller encoders still run backward)
or fewer, cheaper transfers.  So Spindle plans several candidate schedules:

* the wavefront scheduler's variants (:func:`spindle.planner.scheduler.schedule_variants`), and
* the schedules of the baselines' rules (sequential, one task per device share, ...): they are
  valid wave schedules too, and Spindle runs them with its own placement;

places each with every placement candidate (:func:`spindle.planner.placement.place_candidates`,
memory checked), simulates every placed plan (:func:`spindle.planner.simulator.simulate`) and
keeps the fastest; ties go to the earlier candidate (the wavefront first).  The same placement
and simulation decide the baselines' own rows, so the plan returned is never slower in the
simulator than any baseline's.  A candidate whose compute alone already exceeds the best
iteration found is not placed (compute is a lower bound of the iteration): the search costs a
few placements, not one per candidate.

What was chosen is recorded in the plan (:attr:`spindle.plan.contract.Plan.choice`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from spindle.costs.cluster import Cluster
from spindle.costs.estimator import Estimator
from spindle.costs.graph import MetaGraph
from spindle.costs.memory import MemoryModel, MemoryReport, format_gb, memory_report
from spindle.plan.contract import Wave
from spindle.plan.layout import ParameterIndex
from spindle.planner.baselines import place_naive
from spindle.planner.placement import (
    PlacementError,
    place_candidates,
    placed_plan,
)
from spindle.planner.registry import check_waves
from spindle.planner.simulator import (
    Communication,
    Links,
    SimulationResult,
    simulate,
    wave_compute_times,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchResult:
    """The chosen placed waves, their simulation, and what was searched."""

    waves: list[Wave]
    simulation: SimulationResult
    schedule: str  # the label of the chosen candidate schedule
    placement: str  # the name of its placement candidate
    considered: int  # candidate schedules
    placed: int  # candidate schedules that were placed (the rest were pruned or did not fit)
    model: MemoryModel | None = None  # the memory strategy it was simulated with


@dataclass(frozen=True)
class Candidate:
    """A schedule to place and simulate: ``label``, its unplaced ``waves``, and whether every
    placement candidate is tried (``exhaustive``) or only the one that won for the first
    exhaustive schedule (the scheduler's own variants: it keeps the search's placements few)."""

    label: str
    waves: list[Wave]
    exhaustive: bool = True


def search(
    schedules: Sequence[Candidate],
    graph: MetaGraph,
    estimator: Estimator,
    cluster: Cluster,
    links: Links,
    memory_model: MemoryModel,
    capacity_bytes: float,
    index: ParameterIndex,
    naive_placement: bool = False,
    alternatives: Sequence[MemoryModel] = (),
) -> SearchResult:
    """The candidate of ``schedules`` (label, unplaced waves) whose placed plan simulates
    fastest (module docstring).  ``naive_placement`` places every candidate with the
    sequential placement instead of Spindle's; every candidate runs ``memory_model``'s memory
    strategy (recomputed MetaOps: their extra forward is simulated; ZeRO's collectives).
    ``alternatives``: other memory strategies every placed plan is also simulated with, where
    it fits (ZeRO can make another schedule the fastest: a smaller optimizer step).  Raises the
    first candidate's :class:`PlacementError` when none fits ``capacity_bytes``."""
    recompute, _ = memory_model.strategy(graph.metaops)
    best: SearchResult | None = None
    first_error: PlacementError | None = None
    placed_count = 0
    seen: set[tuple[Wave, ...]] = set()
    winner: str | None = None  # the placement of the first exhaustively placed schedule
    for cand in schedules:
        label, waves = cand.label, cand.waves
        if tuple(waves) in seen:
            continue  # the same waves as an earlier candidate (baselines often coincide)
        seen.add(tuple(waves))
        check_waves(waves, graph, estimator, cluster.num_devices, source=f"schedule '{label}'")
        compute = wave_compute_times(waves, graph, estimator, links, recompute)
        if best is not None and sum(compute) >= best.simulation.makespan_s:
            continue  # compute alone is a lower bound of the iteration
        only = None if cand.exhaustive or winner is None else winner
        try:
            try:
                placements = _placements(waves, graph, cluster, memory_model, capacity_bytes,
                                         index, compute, links, naive_placement, label, only)
            except PlacementError:
                if only is None:
                    raise
                only = None  # the first schedule's winning placement does not fit this one
                placements = _placements(waves, graph, cluster, memory_model, capacity_bytes,
                                         index, compute, links, naive_placement, label)
        except PlacementError as err:
            first_error = first_error or err
            log.info("search: schedule %s does not fit: %s", label, err)
            continue
        placed_count += 1
        mine: SearchResult | None = None
        for name, placed, comm in placements:
            for k, model in enumerate((memory_model, *alternatives)):
                plan = placed_plan(graph, cluster, label, placed, model)
                if k and not math.isinf(capacity_bytes) and not memory_report(
                        plan, graph, model, capacity_bytes, index).fits():
                    continue
                sim = simulate(plan, graph, estimator, links, index, None if k else comm)
                if mine is None or sim.makespan_s < mine.simulation.makespan_s * (1.0 - 1e-12):
                    mine = SearchResult(placed, sim, label, name, len(schedules), 0, model)
        assert mine is not None
        if winner is None and only is None:
            winner = mine.placement
        if best is None or mine.simulation.makespan_s < best.simulation.makespan_s * (1 - 1e-12):
            best = mine
    if best is None:
        assert first_error is not None
        raise first_error
    log.info("search: %s schedule with %s placement (%.4g s simulated), %d of %d candidate"
             " schedules placed", best.schedule, best.placement, best.simulation.makespan_s,
             placed_count, len(schedules))
    return SearchResult(best.waves, best.simulation, best.schedule, best.placement,
                        len(schedules), placed_count, best.model)


def _placements(
    waves: list[Wave], graph: MetaGraph, cluster: Cluster, model: MemoryModel, capacity: float,
    index: ParameterIndex, compute: Sequence[float], links: Links, naive: bool, label: str,
    only: str | None = None,
) -> list[tuple[str, list[Wave], Communication | None]]:
    """The placements to simulate for ``waves`` with their communication on ``links`` when
    known: Spindle's candidates (``only``: that one), or the sequential one."""
    if not naive:
        return [(c.name, c.waves, c.communication)
                for c in place_candidates(graph, waves, cluster, model, capacity, index, compute,
                                          links, only)]
    return [("sequential", naive_placement(waves, graph, cluster, model, capacity, index,
                                           f"schedule '{label}'"), None)]


def naive_placement(waves: list[Wave], graph: MetaGraph, cluster: Cluster, model: MemoryModel,
                    capacity: float, index: ParameterIndex, what: str) -> list[Wave]:
    """``waves`` with the sequential (naive) placement, refused in one line (naming ``what``)
    when a device does not fit ``capacity``."""
    placed = place_naive(waves, cluster.num_devices)
    if not math.isinf(capacity):
        report = memory_report(placed_plan(graph, cluster, "sequential", placed, model), graph,
                               model, capacity, index)
        if not report.fits():
            raise memory_error(graph, report, f"{what} with naive placement")
    return placed


def memory_error(graph: MetaGraph, report: MemoryReport, what: str) -> PlacementError:
    """The one-line refusal of a placed plan whose fullest device overflows ``report``'s
    capacity: the device, what it needs, the GB short and the MetaOps it runs."""
    worst = max(report.devices, key=lambda d: d.total_bytes)
    capacity = float(report.capacity_bytes or 0.0)
    names = ", ".join(graph.metaops[i].name for i in worst.metaops)
    return PlacementError(
        f"out of memory: {what}: device {worst.device} needs {format_gb(worst.total_bytes)} of"
        f" {format_gb(capacity)} (short by {format_gb(worst.total_bytes - capacity)}); it runs"
        f" {names}"
    )


__all__ = ["Candidate", "SearchResult", "search", "memory_error", "naive_placement"]
