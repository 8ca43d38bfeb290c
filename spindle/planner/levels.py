"""MetaLevels beyond BFS depth: a MetaOp may sit on any level between its producers' and its
consumers'; :func:`rebalance_levels` moves MetaOps within that slack while the sum of per-level
relaxed optima C* drops (the scheduler's level rebalancing, docs/method.md section 6).
"""

from __future__ import annotations

from spindle.costs.graph import MetaGraph
from spindle.planner.allocator import ScalingCurve, relaxed_optimum


def rebalance_levels(
    graph: MetaGraph, curves: dict[int, ScalingCurve], num_devices: int, max_passes: int = 8
) -> dict[int, int]:
    """A levelling (MetaOp id -> level) with every MetaOp strictly after its producers, found by
    moving MetaOps within their slack while the sum of per-level C* drops (starts from BFS)."""
    ops = graph.metaops
    level = {m.id: m.level for m in ops}
    if not ops:
        return level
    consumers: dict[int, list[int]] = {m.id: [] for m in ops}
    for m in ops:
        for d in m.deps:
            consumers[d].append(m.id)
    n_levels = 1 + max(level.values())
    members: list[list[int]] = [[] for _ in range(n_levels)]
    for m in ops:
        members[m.level].append(m.id)

    def cstar(ids: list[int]) -> float:
        if not ids:
            return 0.0
        return relaxed_optimum([curves[i] for i in ids], [ops[i].num_layers for i in ids],
                               num_devices)[0]

    value = [cstar(ms) for ms in members]
    for _ in range(max_passes):
        moved = False
        for m in ops:
            lo = max((level[d] + 1 for d in m.deps), default=0)
            hi = min((level[c] - 1 for c in consumers[m.id]), default=n_levels - 1)
            cur = level[m.id]
            if lo == hi == cur:
                continue
            without = cstar([j for j in members[cur] if j != m.id])
            best: tuple[float, int, float] | None = None
            for lv in range(lo, hi + 1):
                if lv == cur:
                    continue
                with_m = cstar(members[lv] + [m.id])
                delta = (without + with_m) - (value[cur] + value[lv])
                if delta < -1e-9 * max(value[cur], 1e-30) and (best is None or delta < best[0]):
                    best = (delta, lv, with_m)
            if best is not None:
                _, lv, with_m = best
                members[cur].remove(m.id)
                members[lv].append(m.id)
                value[cur], value[lv] = without, with_m
                level[m.id] = lv
                moved = True
        if not moved:
            break
    # drop levels left empty, keeping the order
    used = sorted(set(level.values()))
    renumber = {lv: k for k, lv in enumerate(used)}
    return {i: renumber[lv] for i, lv in level.items()}
