"""Relaxed optimum and lower bounds (what schedules are judged against)."""

from __future__ import annotations

import random

import pytest

from spindle.costs.estimator import TableEstimator
from spindle.costs.graph import contract
from spindle.declare.workload import load_workload
from spindle.plan.contract import Slice, Wave, schedule_length
from spindle.planner.allocator import allocate_level
from spindle.planner.bounds import (
    global_lower_bound,
    global_lower_bound_parts,
    level_lower_bound,
    level_optima,
    relaxed_optimum,
)
from spindle.planner.registry import PLANNERS, check_waves
from tests.fixtures import alpha_beta_estimator, synthetic_graph


def test_relaxed_optimum_is_the_sum_of_level_c_star():
    g = synthetic_graph([4, 6, 2, 3], [(), (), (0, 1), (2,)])
    tab = {1: 2.0, 2: 1.1, 4: 0.7}
    est = TableEstimator({i: tab for i in range(4)})
    per_level = [allocate_level(lv, est, 4).c_star for lv in g.levels]
    assert level_optima(g, est, 4) == pytest.approx(per_level)
    assert relaxed_optimum(g, est, 4) == pytest.approx(sum(per_level))
    # levels {0, 1}, {2}, {3}: the last two run alone on their fastest count
    assert per_level[1] == pytest.approx(2 * 0.7)
    assert per_level[2] == pytest.approx(3 * 0.7)


def test_global_lower_bound_parts():
    # chain 0 -> 1 and an independent MetaOp 2
    g = synthetic_graph([4, 2, 10], [(), (0,), ()])
    est = TableEstimator({
        0: {1: 1.0, 2: 0.6},          # fastest 0.6, least work 1.0 (n=1)
        1: {1: 2.0, 2: 0.9, 4: 0.5},  # fastest 0.5, least work 1.8 (n=2: superlinear)
        2: {1: 0.3},
    })
    parts = global_lower_bound_parts(g, est, 4)
    assert parts.critical_path_s == pytest.approx(max(4 * 0.6 + 2 * 0.5, 10 * 0.3))
    assert parts.area_s == pytest.approx((4 * 1.0 + 2 * 1.8 + 10 * 0.3) / 4)
    assert global_lower_bound(g, est, 4) == pytest.approx(parts.value)
    # on 2 devices, MetaOp 1 cannot use 4
    assert global_lower_bound_parts(g, est, 2).critical_path_s == pytest.approx(4 * 0.6 + 2 * 0.9)


@pytest.mark.parametrize("name", ["multitask-clip-4", "ofasys-4", "qwen-val-3"])
@pytest.mark.parametrize("num_devices", [1, 8, 32])
def test_every_planner_respects_the_global_lower_bound(name: str, num_devices: int):
    g = contract(load_workload(name))
    est = alpha_beta_estimator(g, num_devices)
    lb = global_lower_bound(g, est, num_devices)
    assert lb > 0
    for planner, fn in PLANNERS.items():
        waves = fn(g, est, num_devices)
        check_waves(waves, g, est, num_devices, source=planner)
        assert schedule_length(waves) >= lb * (1 - 1e-9), planner


def test_level_lower_bound_is_below_c_star():
    rng = random.Random(11)
    for _ in range(60):
        m = rng.randint(1, 5)
        tables = {}
        for i in range(m):
            t = rng.uniform(0.5, 4.0)
            tab = {}
            for n in sorted(rng.sample([1, 2, 3, 4, 6, 8], rng.randint(1, 4))):
                tab[n] = t
                t *= rng.uniform(0.3, 1.0)
            tables[i] = tab
        g = synthetic_graph([rng.randint(1, 10) for _ in range(m)])
        est = TableEstimator(tables)
        N = rng.randint(max(min(t) for t in tables.values()), 10)
        lb = level_lower_bound(g.metaops, est, N)
        c = allocate_level(g.metaops, est, N).c_star
        assert 0 < lb <= c * (1 + 1e-9)


def test_relaxed_optimum_is_not_a_lower_bound_but_level_bound_is():
    """Linear interpolation of T charges more device-time than mixing the two counts, so a
    bi-point schedule can beat C*; the convex-hull level bound still holds."""
    g = synthetic_graph([5, 3], batches=[4, 4])
    est = TableEstimator({0: {1: 1.0, 4: 0.3}, 1: {1: 1.0, 4: 0.25}})
    waves = [
        Wave((Slice(0, 0, 4, count=4, time_s=4 * 0.3), Slice(1, 0, 1, count=1, time_s=1.0)), 0),
        Wave((Slice(0, 4, 5, count=1, time_s=1.0), Slice(1, 1, 3, count=4, time_s=2 * 0.25)), 0),
    ]
    check_waves(waves, g, est, 5)
    length = schedule_length(waves)
    assert length == pytest.approx(2.2)
    assert length < relaxed_optimum(g, est, 5)
    assert level_lower_bound(g.metaops, est, 5) <= length
