"""Baseline planners: the ways MT MM training is planned without wavefront scheduling.

Each returns unplaced waves (:class:`spindle.plan.contract.Wave`) exactly like Spindle's scheduler,
so every planner goes through the same placement, validation and simulation:

* :func:`sequential` (Megatron-LM / DeepSpeed): every MetaOp in turn, in topological order, alone
  on the largest valid n within N; one wave per MetaOp.
* :func:`optimus` (Spindle-Optimus): task-level allocation, greedy by marginal gain
  ``(T(s) - T(s')) / (s' - s)`` of a task's time over its device share s; tasks run side by side,
  each its MetaOps in order on its share.
* :func:`distmm_mt` (DistMM-MT): tasks one after another on all N devices; inside a task, the
  MetaOps of one level (its encoders) split the devices in proportion to their work.
* :func:`uniform`: devices split evenly over tasks, each task its MetaOps in order on its share.

A MetaOp runs on the largest valid n within its share.  Every task is given at least the
smallest count all its MetaOps can run on; when the tasks' minimum shares exceed N, tasks run in
*rounds* (as many tasks side by side as fit, the next round after).  Side-by-side tasks become
waves the way a synchronous runtime runs them: a wave starts wherever some task moves to its next
MetaOp, and each layer belongs to the wave in which it would start on its task's own timeline.

:func:`place_naive` is the placement Spindle's is compared with (the *sequential placement*):
within a wave, slices take consecutive device ids in order, except that a slice whose MetaOp ran
in the previous wave on a group of the same size keeps those devices when they are free.
"""

from __future__ import annotations

import bisect
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from spindle.costs.estimator import Estimator
from spindle.costs.graph import MetaGraph
from spindle.plan.contract import MetaOp, Slice, Wave

log = logging.getLogger(__name__)


class BaselineError(ValueError):
    """A workload a baseline cannot plan (a MetaOp with no valid n within N); one line."""


@dataclass(frozen=True)
class _Step:
    """One MetaOp of a task's lane: all its layers on ``n`` devices."""

    metaop: int
    n: int
    per_layer_s: float
    layers: int


def _valid(op: MetaOp, estimator: Estimator, limit: int) -> list[int]:
    return estimator.valid_counts(op, limit) if limit >= 1 else []


def _largest_valid(op: MetaOp, estimator: Estimator, limit: int) -> int | None:
    counts = _valid(op, estimator, limit)
    return counts[-1] if counts else None


def _min_count(op: MetaOp, estimator: Estimator, num_devices: int) -> int:
    counts = _valid(op, estimator, num_devices)
    if not counts:
        raise BaselineError(
            f"MetaOp {op.id} ('{op.name}') has no valid device count within {num_devices} devices"
        )
    return counts[0]


def _tasks(graph: MetaGraph) -> list[list[MetaOp]]:
    """MetaOps grouped by task (tasks in order of their first MetaOp, MetaOps in topological
    order)."""
    by_task: dict[str, list[MetaOp]] = defaultdict(list)
    for m in graph.metaops:
        by_task[m.task].append(m)
    return list(by_task.values())


def sequential(graph: MetaGraph, estimator: Estimator, num_devices: int) -> list[Wave]:
    """Every MetaOp alone on the largest valid n within N, in topological order."""
    waves = []
    for m in graph.metaops:
        _min_count(m, estimator, num_devices)
        n = _largest_valid(m, estimator, num_devices)
        assert n is not None
        t = estimator.time(m, n)
        waves.append(Wave((Slice(m.id, 0, m.num_layers, count=n, time_s=m.num_layers * t),),
                          m.level))
    return waves


def _rounds(tasks: list[list[MetaOp]], mins: list[int], num_devices: int) -> list[list[int]]:
    """Task indices per round: consecutive tasks while their minimum shares fit in N."""
    rounds: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for k in range(len(tasks)):
        if cur and used + mins[k] > num_devices:
            rounds.append(cur)
            cur, used = [], 0
        cur.append(k)
        used += mins[k]
    if cur:
        rounds.append(cur)
    return rounds


def _lane(task: list[MetaOp], estimator: Estimator, share: int) -> list[_Step]:
    steps = []
    for m in task:
        n = _largest_valid(m, estimator, share)
        assert n is not None, "a task's share is at least its MetaOps' smallest valid count"
        steps.append(_Step(m.id, n, estimator.time(m, n), m.num_layers))
    return steps


def _task_time(task: list[MetaOp], estimator: Estimator, share: int) -> float:
    return sum(s.layers * s.per_layer_s for s in _lane(task, estimator, share))


def _side_by_side(lanes: list[list[_Step]]) -> list[Wave]:
    """Waves of lanes running side by side: a wave starts wherever a lane changes MetaOp, and a
    layer joins the wave in which it starts on its lane's own timeline."""
    starts: list[list[float]] = []
    bounds: set[float] = set()
    for lane in lanes:
        t = 0.0
        st = []
        for step in lane:
            st.append(t)
            bounds.add(t)
            t = t + step.layers * step.per_layer_s
        starts.append(st)
    edges = sorted(bounds)
    per_wave: list[dict[int, list[int]]] = [defaultdict(list) for _ in edges]
    info: dict[int, _Step] = {}
    for lane, st in zip(lanes, starts, strict=True):
        for step, s in zip(lane, st, strict=True):
            info[step.metaop] = step
            for k in range(step.layers):
                w = bisect.bisect_right(edges, s + k * step.per_layer_s) - 1
                per_wave[w][step.metaop].append(k)
    waves = []
    for slots in per_wave:
        slices = []
        for mid, layers in sorted(slots.items()):
            step = info[mid]
            lo, hi = layers[0], layers[-1] + 1
            slices.append(Slice(mid, lo, hi, count=step.n, time_s=(hi - lo) * step.per_layer_s))
        if slices:
            waves.append(Wave(tuple(slices), None))
    return waves


def _run_rounds(
    graph: MetaGraph,
    estimator: Estimator,
    num_devices: int,
    shares_for: Callable[[list[list[MetaOp]], list[int]], list[int]],
) -> list[Wave]:
    """Tasks in rounds; ``shares_for(tasks of a round, their minimum shares)`` splits N."""
    tasks = _tasks(graph)
    mins = [max(_min_count(m, estimator, num_devices) for m in t) for t in tasks]
    waves: list[Wave] = []
    for rnd in _rounds(tasks, mins, num_devices):
        ts = [tasks[k] for k in rnd]
        shares = shares_for(ts, [mins[k] for k in rnd])
        assert sum(shares) <= num_devices
        lanes = [_lane(t, estimator, s) for t, s in zip(ts, shares, strict=True)]
        waves.extend(_side_by_side(lanes))
    return waves


def uniform(graph: MetaGraph, estimator: Estimator, num_devices: int) -> list[Wave]:
    """Devices split evenly over the tasks of a round, each task its MetaOps in order."""

    def shares(ts: list[list[MetaOp]], mins: list[int]) -> list[int]:
        out = list(mins)
        left = num_devices - sum(out)
        while left > 0:
            k = min(range(len(out)), key=lambda j: (out[j], j))
            out[k] += 1
            left -= 1
        return out

    return _run_rounds(graph, estimator, num_devices, shares)


def optimus(graph: MetaGraph, estimator: Estimator, num_devices: int) -> list[Wave]:
    """Task shares by greedy marginal gain; tasks side by side, each its MetaOps in order."""

    def shares(ts: list[list[MetaOp]], mins: list[int]) -> list[int]:
        out = list(mins)
        left = num_devices - sum(out)
        times = [_task_time(t, estimator, s) for t, s in zip(ts, out, strict=True)]
        steps = [sorted({c for m in t for c in _valid(m, estimator, num_devices)}) for t in ts]
        memo: dict[tuple[int, int], float] = {}  # (task, share) -> its time

        def task_time(k: int, share: int) -> float:
            got = memo.get((k, share))
            if got is None:
                got = memo[(k, share)] = _task_time(ts[k], estimator, share)
            return got

        while left > 0:
            best: tuple[float, int, int, float] | None = None  # gain, task, new share, new time
            for k in range(len(ts)):
                # the next share at which this task gets faster (its time changes only where
                # one of its MetaOps gains a valid count)
                for s2 in steps[k][bisect.bisect_right(steps[k], out[k]):]:
                    if s2 - out[k] > left:
                        break
                    t2 = task_time(k, s2)
                    if t2 < times[k]:
                        gain = (times[k] - t2) / (s2 - out[k])
                        if best is None or gain > best[0]:
                            best = (gain, k, s2, t2)
                        break
            if best is None:
                break
            _, k, s2, t2 = best
            left -= s2 - out[k]
            out[k], times[k] = s2, t2
        return out

    return _run_rounds(graph, estimator, num_devices, shares)


def distmm_mt(graph: MetaGraph, estimator: Estimator, num_devices: int) -> list[Wave]:
    """Tasks one after another on all N devices; the MetaOps of one level inside a task split the
    devices in proportion to their work (largest valid n within the proportional share)."""
    waves: list[Wave] = []
    for task in _tasks(graph):
        by_level: dict[int, list[MetaOp]] = defaultdict(list)
        for m in task:
            by_level[m.level].append(m)
        for lv in sorted(by_level):
            pending = list(by_level[lv])
            while pending:  # more MetaOps than fit side by side: several waves
                group: list[MetaOp] = []
                used = 0
                for m in sorted(pending, key=lambda op: -_work(op, estimator, num_devices)):
                    need = _min_count(m, estimator, num_devices)
                    if used + need <= num_devices:
                        group.append(m)
                        used += need
                pending = [m for m in pending if m not in group]
                waves.append(_proportional_wave(group, estimator, num_devices, lv))
    return waves


def _work(op: MetaOp, estimator: Estimator, num_devices: int) -> float:
    n = _min_count(op, estimator, num_devices)
    return op.num_layers * n * estimator.time(op, n)


def _proportional_wave(
    group: list[MetaOp], estimator: Estimator, num_devices: int, level: int
) -> Wave:
    work = {m.id: _work(m, estimator, num_devices) for m in group}
    total = sum(work.values())
    n: dict[int, int] = {}
    for m in group:
        n[m.id] = _min_count(m, estimator, num_devices)
    free = num_devices - sum(n.values())
    # grow each MetaOp towards its proportional share, largest work first
    for m in sorted(group, key=lambda op: -work[op.id]):
        target = int(num_devices * work[m.id] / total)
        best = _largest_valid(m, estimator, min(target, n[m.id] + free))
        if best is not None and best > n[m.id]:
            free -= best - n[m.id]
            n[m.id] = best
    # devices the rounding left over: the slowest MetaOp takes its next valid count that fits
    while free > 0:
        grow: tuple[float, MetaOp, int] | None = None
        for m in group:
            now = estimator.time(m, n[m.id])
            nxt = [c for c in _valid(m, estimator, n[m.id] + free)
                   if c > n[m.id] and estimator.time(m, c) < now]
            if nxt:
                t = m.num_layers * now
                if grow is None or t > grow[0]:
                    grow = (t, m, nxt[0])
        if grow is None:
            break
        _, m, c = grow
        free -= c - n[m.id]
        n[m.id] = c
    slices = tuple(
        Slice(m.id, 0, m.num_layers, count=n[m.id],
              time_s=m.num_layers * estimator.time(m, n[m.id]))
        for m in group
    )
    return Wave(slices, level)


# --- the sequential placement -------------------------------------------------------------------


def place_naive(waves: list[Wave], num_devices: int) -> list[Wave]:
    """The sequential placement (see the module docstring); it does not look at memory."""
    placed: list[Wave] = []
    last_devices: dict[int, tuple[int, ...]] = {}
    for spec in waves:
        if spec.devices_used > num_devices:
            raise BaselineError(
                f"wave uses {spec.devices_used} devices, only {num_devices} exist")
        free = list(range(num_devices))
        chosen: dict[int, tuple[int, ...]] = {}
        # first, slices that can stay where their MetaOp already is
        for i, s in enumerate(spec.slices):
            prev = last_devices.get(s.metaop)
            if prev is not None and len(prev) == s.n and all(d in free for d in prev):
                chosen[i] = prev
                for d in prev:
                    free.remove(d)
        for i, s in enumerate(spec.slices):
            if i not in chosen:
                chosen[i] = tuple(free[: s.n])
                del free[: s.n]
        slices = tuple(s.placed_on(chosen[i]) for i, s in enumerate(spec.slices))
        for s in slices:
            last_devices[s.metaop] = s.devices
        placed.append(Wave(slices=slices, level=spec.level))
    return placed
