"""Property tests: random small problems give valid plans that respect the lower bounds."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spindle.costs.estimator import TableEstimator
from spindle.costs.graph import MetaGraph
from spindle.plan.contract import schedule_length
from spindle.planner.allocator import allocate_level, scaling_curves
from spindle.planner.bounds import global_lower_bound, level_lower_bound
from spindle.planner.registry import PLANNERS, check_waves
from spindle.planner.scheduler import SchedulerOptions, wavefront_schedule
from tests.fixtures import synthetic_graph
from tests.plans import validate_placed

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@dataclass
class Problem:
    graph: MetaGraph
    estimator: TableEstimator
    num_devices: int


@st.composite
def problems(draw: st.DrawFn) -> Problem:
    """1-6 MetaOps in 1-3 tasks (dependencies inside a task, as in real workloads), batches whose
    divisors are the valid counts, non-increasing random times, 1-12 devices."""
    count = draw(st.integers(1, 6))
    layers, deps, batches, tasks = [], [], [], []
    tables: dict[int, dict[int, float]] = {}
    for i in range(count):
        task = draw(st.sampled_from("abc"))
        same_task = [j for j in range(i) if tasks[j] == task]
        deps.append(tuple(sorted(draw(st.sets(st.sampled_from(same_task), max_size=2))))
                    if same_task else ())
        tasks.append(task)
        layers.append(draw(st.integers(1, 6)))
        batch = draw(st.sampled_from([1, 2, 4, 6, 8, 12]))
        batches.append(batch)
        divisors = [n for n in range(1, batch + 1) if batch % n == 0]
        counts = sorted(draw(st.lists(st.sampled_from(divisors), min_size=1, max_size=4,
                                      unique=True)))
        t = draw(st.floats(0.1, 5.0))
        table = {}
        for n in counts:
            table[n] = t
            t *= draw(st.floats(0.3, 1.0))  # non-increasing; 1.0 allows a flat step
        tables[i] = table
    floor = max(min(t) for t in tables.values())
    num_devices = draw(st.integers(floor, max(floor, 12)))
    return Problem(synthetic_graph(layers, deps, batches, tasks), TableEstimator(tables),
                   num_devices)


@SETTINGS
@given(problems())
def test_every_planner_is_valid_and_above_the_lower_bound(p: Problem):
    lb = global_lower_bound(p.graph, p.estimator, p.num_devices)
    for name, planner in PLANNERS.items():
        waves = planner(p.graph, p.estimator, p.num_devices)
        check_waves(waves, p.graph, p.estimator, p.num_devices, source=name)
        validate_placed(waves, p.graph, p.num_devices)
        assert schedule_length(waves) >= lb * (1 - 1e-9), name


@SETTINGS
@given(problems(), st.booleans(), st.sampled_from(["progress", "shortest"]),
       st.integers(0, 3))
def test_level_by_level_schedules_respect_each_levels_bound(
    p: Problem, rebalance: bool, alignment: str, rollouts: int
):
    """Without filling across levels, the waves of one level hold only that level's MetaOps
    (independent of each other), so each level's waves are at least its level lower bound."""
    opts = SchedulerOptions(rebalance_levels=rebalance, fill_across_levels=False,
                            alignment=alignment, portfolio=False, rollouts=rollouts)
    waves = wavefront_schedule(p.graph, p.estimator, p.num_devices, opts)
    check_waves(waves, p.graph, p.estimator, p.num_devices)
    ops_of: dict[int, set[int]] = defaultdict(set)
    length_of: dict[int, float] = defaultdict(float)
    for w in waves:
        assert w.level is not None
        ops_of[w.level] |= {s.metaop for s in w.slices}
        length_of[w.level] += w.duration_s
    assert set().union(*ops_of.values()) == {m.id for m in p.graph.metaops}
    for lv, ids in ops_of.items():
        ops = [p.graph.metaops[i] for i in sorted(ids)]
        assert not any(d in ids for m in ops for d in m.deps)  # one level: independent
        bound = level_lower_bound(ops, p.estimator, p.num_devices)
        assert length_of[lv] >= bound * (1 - 1e-9)
        # the relaxed C* of the level is at least the bound too (hull vs. interpolation)
        assert allocate_level(ops, p.estimator, p.num_devices).c_star >= bound * (1 - 1e-9)


@SETTINGS
@given(problems())
def test_relaxation_uses_at_most_n_devices_and_ends_together(p: Problem):
    for level in p.graph.levels:
        a = allocate_level(level, p.estimator, p.num_devices)
        curves = scaling_curves(level, p.estimator, p.num_devices)
        assert sum(a.n_star.values()) <= p.num_devices * (1 + 1e-9)
        spans = {m.id: m.num_layers * curves[m.id].time(a.n_star[m.id]) for m in level}
        assert max(spans.values()) <= a.c_star * (1 + 1e-9)
        if sum(a.n_star.values()) < p.num_devices * (1 - 1e-9):
            # devices left over: C* is set by a MetaOp already at its fastest count
            assert any(a.n_star[m.id] == curves[m.id].n_max
                       and spans[m.id] >= a.c_star * (1 - 1e-9) for m in level)
        for m in level:
            # all end together at C*, except MetaOps held at their fastest count
            assert (spans[m.id] >= a.c_star * (1 - 1e-6)
                    or a.n_star[m.id] >= curves[m.id].n_max * (1 - 1e-9))
            assert sum(t.layers for t in a.tuples[m.id]) == m.num_layers
            assert all(t.n in curves[m.id].counts for t in a.tuples[m.id])
