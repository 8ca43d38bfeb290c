"""Reference makespans for judging a schedule: the relaxed optimum and true lower bounds.

* :func:`relaxed_optimum` is the paper's yardstick (docs/method.md sections 5 and 9): the sum over
  MetaLevels of each level's C*.  It is *not* a lower bound.  Between two valid device counts the
  relaxation interpolates T linearly, which for a convex T (the usual ``a + w/n`` shape) charges
  more device-time than running some layers on each of the two counts, so a bi-point schedule of
  one level can finish slightly before its C*; and a scheduler that lets a MetaOp start before its
  level (as ours does) is not bound by the per-level sum at all.
* :func:`level_lower_bound` is a true lower bound for any schedule of one set of independent
  MetaOps: every MetaOp needs at least ``L_m T_m(n_max)``, and the device-time it needs to finish
  within C is at least ``L_m`` times the lower convex hull of ``(T_m(n), n T_m(n))`` at ``C/L_m``.
* :func:`global_lower_bound` is a true lower bound for any valid plan of the whole MetaGraph: the
  longest dependency path with every MetaOp at its fastest valid n, and the least total
  device-time ``sum_m L_m min_n n T_m(n)`` spread over N devices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from spindle.costs.estimator import Estimator
from spindle.costs.graph import MetaGraph
from spindle.plan.contract import MetaOp
from spindle.planner.allocator import ScalingCurve, allocate_level, scaling_curves


@dataclass(frozen=True)
class LowerBound:
    """The global lower bound and its two parts."""

    critical_path_s: float
    area_s: float

    @property
    def value(self) -> float:
        return max(self.critical_path_s, self.area_s)


def level_optima(graph: MetaGraph, estimator: Estimator, num_devices: int) -> list[float]:
    """C* of every MetaLevel, in level order."""
    return [allocate_level(lv, estimator, num_devices).c_star for lv in graph.levels if lv]


def relaxed_optimum(graph: MetaGraph, estimator: Estimator, num_devices: int) -> float:
    """Sum of per-level C* (the paper's relaxed optimum; see the module docstring)."""
    return sum(level_optima(graph, estimator, num_devices))


def global_lower_bound_parts(
    graph: MetaGraph, estimator: Estimator, num_devices: int
) -> LowerBound:
    curves = scaling_curves(graph.metaops, estimator, num_devices)
    finish: dict[int, float] = {}
    for m in graph.metaops:  # ids are topologically ordered
        fastest = m.num_layers * curves[m.id].times[-1]
        finish[m.id] = fastest + max((finish[d] for d in m.deps), default=0.0)
    critical = max(finish.values(), default=0.0)
    area = sum(m.num_layers * _min_work(curves[m.id]) for m in graph.metaops) / num_devices
    return LowerBound(critical, area)


def global_lower_bound(graph: MetaGraph, estimator: Estimator, num_devices: int) -> float:
    """max(critical path at the fastest n, least total device-time / N): valid for any plan."""
    return global_lower_bound_parts(graph, estimator, num_devices).value


def _min_work(curve: ScalingCurve) -> float:
    return min(n * t for n, t in zip(curve.counts, curve.times, strict=True))


def _hull_work(curve: ScalingCurve, per_layer_s: float) -> float:
    """Least device-time per layer when a layer may take ``per_layer_s`` on average, mixing
    valid counts (the lower convex hull of ``(T(n), n T(n))``, non-increasing in time)."""
    # (time, work) points by time ascending
    pts = sorted((t, n * t) for n, t in zip(curve.counts, curve.times, strict=True))
    if per_layer_s < pts[0][0] * (1.0 - 1e-12):
        return math.inf
    best = min(w for t, w in pts if t <= per_layer_s * (1.0 + 1e-12))
    for i, (ti, wi) in enumerate(pts):
        for tj, wj in pts[i + 1:]:
            if ti <= per_layer_s <= tj and tj > ti:
                f = (per_layer_s - ti) / (tj - ti)
                best = min(best, wi + f * (wj - wi))
    return best


def level_lower_bound(metaops: list[MetaOp], estimator: Estimator, num_devices: int) -> float:
    """A lower bound on the makespan of any schedule of the independent ``metaops`` on
    ``num_devices`` devices (see the module docstring)."""
    if not metaops:
        return 0.0
    curves = scaling_curves(metaops, estimator, num_devices)
    lo = max(m.num_layers * curves[m.id].times[-1] for m in metaops)

    def fits(c: float) -> bool:
        work = sum(m.num_layers * _hull_work(curves[m.id], c / m.num_layers) for m in metaops)
        return work <= num_devices * c * (1.0 + 1e-12)

    if fits(lo):
        return lo
    hi = lo * 2.0
    while not fits(hi):
        hi *= 2.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if fits(mid):
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-12 * hi:
            break
    return lo
