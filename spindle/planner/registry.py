"""The planner registry: one name -> one function from (MetaGraph, Estimator, N) to waves.

:func:`plan_waves` is the single entry point: it checks the request, runs the planner and checks
its waves (:func:`check_waves`) before anyone places them, so a planner bug surfaces here as a
:class:`PlanningError` and not as a bad plan on a cluster.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from spindle.costs.estimator import Estimator
from spindle.costs.graph import MetaGraph
from spindle.plan.contract import Wave
from spindle.planner import baselines
from spindle.planner.allocator import AllocationError
from spindle.planner.scheduler import wavefront_schedule

log = logging.getLogger(__name__)

Planner = Callable[[MetaGraph, Estimator, int], list[Wave]]

PLANNERS: dict[str, Planner] = {
    "spindle": wavefront_schedule,
    "sequential": baselines.sequential,
    "optimus": baselines.optimus,
    "distmm-mt": baselines.distmm_mt,
    "uniform": baselines.uniform,
}


class PlanningError(ValueError):
    """A planning request that cannot be served; the message is one line."""


def plan_waves(
    name: str, graph: MetaGraph, estimator: Estimator, num_devices: int
) -> list[Wave]:
    """Run planner ``name`` and return its checked waves."""
    if name not in PLANNERS:
        raise PlanningError(f"unknown planner '{name}' (known: {', '.join(PLANNERS)})")
    if num_devices < 1:
        raise PlanningError(f"num_devices {num_devices}: the device count must be at least 1")
    for m in graph.metaops:
        if not estimator.valid_counts(m, num_devices):
            raise PlanningError(
                f"MetaOp {m.id} ('{m.name}', batch {m.batch}) has no valid device count within"
                f" {num_devices} devices"
            )
    try:
        waves = PLANNERS[name](graph, estimator, num_devices)
    except (AllocationError, baselines.BaselineError) as err:
        raise PlanningError(f"planner '{name}': {err}") from None
    check_waves(waves, graph, estimator, num_devices, source=f"planner '{name}'")
    log.info("planner %s: %d waves for %d MetaOps on %d devices", name, len(waves),
             len(graph.metaops), num_devices)
    return waves


def check_waves(
    waves: list[Wave],
    graph: MetaGraph,
    estimator: Estimator,
    num_devices: int,
    source: str = "waves",
) -> None:
    """Raise :class:`PlanningError` unless ``waves`` is a valid unplaced schedule: at most N
    devices per wave, one slice per MetaOp per wave, every n valid for its MetaOp, every layer
    exactly once, a MetaOp's slices contiguous and in later waves than its previous slice and its
    producers' last slices, and ``time_s = layers x T_m(n)``."""
    ops = graph.metaops
    next_layer = {m.id: 0 for m in ops}
    last_wave: dict[int, int] = {}
    done_in: dict[int, int] = {}
    for wi, w in enumerate(waves):
        where = f"{source}: wave {wi}"
        if not w.slices:
            raise PlanningError(f"{where}: no slices")
        if w.devices_used > num_devices:
            raise PlanningError(f"{where}: uses {w.devices_used} devices, more than {num_devices}")
        seen: set[int] = set()
        for s in w.slices:
            tag = f"{where}, MetaOp {s.metaop}"
            if not 0 <= s.metaop < len(ops):
                raise PlanningError(f"{tag}: no such MetaOp")
            m = ops[s.metaop]
            if s.metaop in seen:
                raise PlanningError(f"{tag}: two slices in one wave")
            seen.add(s.metaop)
            if s.n not in estimator.valid_counts(m, num_devices):
                raise PlanningError(f"{tag}: n = {s.n} is not a valid device count")
            if s.layer_start != next_layer[m.id] or not s.layer_start < s.layer_end <= m.num_layers:
                raise PlanningError(
                    f"{tag}: layers [{s.layer_start}, {s.layer_end}) do not continue at layer"
                    f" {next_layer[m.id]} of {m.num_layers}"
                )
            if s.layer_start == 0:
                for d in m.deps:
                    if done_in.get(d, wi) >= wi:
                        raise PlanningError(f"{tag}: starts before producer MetaOp {d} finished")
            elif last_wave.get(m.id, wi) >= wi:
                raise PlanningError(f"{tag}: not after its previous slice")
            expect = s.num_layers * estimator.time(m, s.n)
            if not math.isclose(s.time_s, expect, rel_tol=1e-6, abs_tol=1e-12):
                raise PlanningError(f"{tag}: time {s.time_s} is not layers x T(n) = {expect}")
        for s in w.slices:
            next_layer[s.metaop] = s.layer_end
            last_wave[s.metaop] = wi
            if s.layer_end == ops[s.metaop].num_layers:
                done_in[s.metaop] = wi
    for m in ops:
        if next_layer[m.id] != m.num_layers:
            raise PlanningError(
                f"{source}: MetaOp {m.id} ('{m.name}') has only {next_layer[m.id]} of"
                f" {m.num_layers} layers scheduled"
            )
