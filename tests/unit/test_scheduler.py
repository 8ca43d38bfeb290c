"""Wavefront scheduler (docs/method.md section 6): invariants, quality against C*, planning time."""

from __future__ import annotations

import time

import pytest

from spindle.costs.estimator import TableEstimator
from spindle.costs.graph import MetaGraph, contract
from spindle.declare.workload import load_workload
from spindle.plan.checks import validate_plan
from spindle.plan.contract import Plan, Slice, Wave, schedule_length
from spindle.planner.allocator import relaxed_optimum as allocator_optimum
from spindle.planner.allocator import scaling_curves
from spindle.planner.bounds import global_lower_bound, level_optima, relaxed_optimum
from spindle.planner.levels import rebalance_levels
from spindle.planner.registry import check_waves, plan_waves
from spindle.planner.scheduler import (
    SchedulerOptions,
    merge_waves,
    wavefront_schedule,
)
from tests.fixtures import alpha_beta_estimator, random_workload, synthetic_graph

SHIPPED = ["multitask-clip-4", "multitask-clip-7", "multitask-clip-10", "ofasys-4", "ofasys-7",
           "qwen-val-3"]
PAPER = SchedulerOptions(rebalance_levels=False, fill_across_levels=False, alignment="shortest",
                         portfolio=False, rollouts=0)


def placed(waves: list[Wave], graph: MetaGraph, num_devices: int) -> Plan:
    """The waves on devices 0..n-1, n..., contiguous per wave, as a validated Plan."""
    out = []
    for w in waves:
        nxt = 0
        slices = []
        for s in w.slices:
            slices.append(Slice(s.metaop, s.layer_start, s.layer_end,
                                tuple(range(nxt, nxt + s.n)), s.time_s))
            nxt += s.n
        out.append(Wave(tuple(slices), w.level))
    plan = Plan("test", "test", "0", num_devices, min(8, num_devices), "", tuple(graph.metaops),
                tuple(out))
    validate_plan(plan, graph.metaops)
    return plan


@pytest.fixture(scope="module")
def shipped_graphs() -> dict[str, MetaGraph]:
    return {name: contract(load_workload(name)) for name in SHIPPED}


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("num_devices", [1, 8, 64])
def test_shipped_schedules_are_valid(shipped_graphs, name: str, num_devices: int):
    g = shipped_graphs[name]
    est = alpha_beta_estimator(g, num_devices)
    waves = wavefront_schedule(g, est, num_devices)
    check_waves(waves, g, est, num_devices)
    plan = placed(waves, g, num_devices)
    assert plan.schedule_s == pytest.approx(schedule_length(waves))
    assert all(w.level is not None for w in waves)
    assert schedule_length(waves) >= global_lower_bound(g, est, num_devices) * (1 - 1e-9)


@pytest.mark.parametrize("num_devices", [8, 16, 32, 64])
def test_shipped_schedules_are_close_to_the_relaxed_optimum(shipped_graphs, num_devices: int):
    for name, g in shipped_graphs.items():
        est = alpha_beta_estimator(g, num_devices)
        c_star = relaxed_optimum(g, est, num_devices)
        t0 = time.perf_counter()
        waves = wavefront_schedule(g, est, num_devices)
        elapsed = time.perf_counter() - t0
        ratio = schedule_length(waves) / c_star
        assert ratio <= 1.05, f"{name} on {num_devices}: {ratio:.3f} x C*"
        # a guard against a runaway, not a timing target (benchmarks/planner_bench.py times it)
        assert elapsed < 5.0, f"{name} on {num_devices}: planning took {elapsed:.2f} s"


def test_improvements_do_not_lose_to_the_paper_rules(shipped_graphs):
    worse = 0
    for g in shipped_graphs.values():
        for n in (8, 32):
            est = alpha_beta_estimator(g, n)
            ours = schedule_length(wavefront_schedule(g, est, n))
            paper = wavefront_schedule(g, est, n, PAPER)
            check_waves(paper, g, est, n)
            worse += ours > schedule_length(paper) * (1 + 1e-9)
    assert worse == 0


def test_single_device_runs_everything_back_to_back(shipped_graphs):
    g = shipped_graphs["ofasys-4"]
    est = alpha_beta_estimator(g, 1)
    waves = wavefront_schedule(g, est, 1)
    total = sum(m.num_layers * est.time(m, 1) for m in g.metaops)
    assert schedule_length(waves) == pytest.approx(total)
    assert all(w.devices_used == 1 for w in waves)


def test_one_metaop_uses_its_fastest_count():
    g = synthetic_graph([6])
    est = TableEstimator({0: {1: 4.0, 2: 2.0, 4: 1.5, 8: 1.6}})
    waves = wavefront_schedule(g, est, 8)
    assert [(s.n, s.num_layers) for w in waves for s in w.slices] == [(4, 6)]
    assert schedule_length(waves) == pytest.approx(9.0)


def test_level_boundary_is_respected_without_filling():
    # 0 -> 2, 1 independent and long: 2 may not start before 0 ends
    g = synthetic_graph([2, 8, 2], [(), (), (0,)])
    tab = {1: 1.0, 2: 0.5}
    est = TableEstimator({0: tab, 1: tab, 2: tab})
    opts = SchedulerOptions(fill_across_levels=False, portfolio=False)
    waves = wavefront_schedule(g, est, 2, opts)
    check_waves(waves, g, est, 2)
    first_of_2 = min(i for i, w in enumerate(waves) if any(s.metaop == 2 for s in w.slices))
    assert all(s.metaop != 1 for w in waves[first_of_2:] for s in w.slices)


def test_idle_devices_go_to_ready_metaops_of_the_next_level():
    # level 0: a short MetaOp 0 and a long MetaOp 1 that cannot use more than 1 device;
    # MetaOp 2 (level 1) needs only MetaOp 0, so it can run beside MetaOp 1
    g = synthetic_graph([1, 12, 6], [(), (), (0,)])
    est = TableEstimator({0: {1: 1.0, 2: 0.5}, 1: {1: 1.0}, 2: {1: 1.0, 2: 0.5}})
    with_fill = wavefront_schedule(g, est, 3)
    without = wavefront_schedule(g, est, 3, SchedulerOptions(fill_across_levels=False,
                                                             portfolio=False))
    for w in (with_fill, without):
        check_waves(w, g, est, 3)
        placed(w, g, 3)
    assert schedule_length(with_fill) == pytest.approx(12.0)  # MetaOp 1 is the critical path
    assert schedule_length(without) > 12.0
    per_level = sum(level_optima(g, est, 3))
    assert schedule_length(with_fill) < per_level


def test_rebalancing_moves_a_metaop_into_its_slack():
    # chain 0 -> 1 beside two independent MetaOps: BFS puts 0, 2, 3 on level 0 and 1 alone on
    # level 1; moving 2 or 3 next to 1 balances the levels
    g = synthetic_graph([8, 8, 8, 8], [(), (0,), (), ()])
    tab = {1: 1.0, 2: 0.55}
    est = TableEstimator({i: tab for i in range(4)})
    curves = scaling_curves(g.metaops, est, 2)
    levels = rebalance_levels(g, curves, 2)
    assert all(levels[d] < levels[m.id] for m in g.metaops for d in m.deps)
    assert levels != {m.id: m.level for m in g.metaops}

    def level_sum(assign: dict[int, int]) -> float:
        total = 0.0
        for lv in set(assign.values()):
            ids = [i for i, x in assign.items() if x == lv]
            total += allocator_optimum([curves[i] for i in ids], [8] * len(ids), 2)[0]
        return total

    assert level_sum({m.id: m.level for m in g.metaops}) == pytest.approx(12.0 + 4.4)
    assert level_sum(levels) == pytest.approx(16.0)
    waves = wavefront_schedule(g, est, 2)
    check_waves(waves, g, est, 2)
    assert schedule_length(waves) == pytest.approx(16.0)


def test_merge_joins_identical_waves_and_keeps_dependencies():
    g = synthetic_graph([4, 4, 2], [(), (), (0,)])
    a = Wave((Slice(0, 0, 2, count=2, time_s=2.0), Slice(1, 0, 2, count=2, time_s=2.0)), 0)
    b = Wave((Slice(0, 2, 4, count=2, time_s=2.0), Slice(1, 2, 4, count=2, time_s=2.0)), 0)
    c = Wave((Slice(2, 0, 2, count=4, time_s=1.0),), 1)
    merged = merge_waves([a, b, c], g, 4)
    assert len(merged) == 2
    assert merged[0].slices == (Slice(0, 0, 4, count=2, time_s=4.0),
                                Slice(1, 0, 4, count=2, time_s=4.0))
    assert merged[1] == c  # MetaOp 2 needs MetaOp 0, which ends in the wave before
    # different n: no merge
    d = Wave((Slice(0, 2, 4, count=1, time_s=4.0), Slice(1, 2, 4, count=2, time_s=2.0)), 0)
    assert len(merge_waves([a, d], g, 4)) == 2
    # a subset wave merges when the union fits
    e = Wave((Slice(0, 2, 4, count=2, time_s=2.0),), 0)
    assert len(merge_waves([a, e], g, 4)) == 1
    assert len(merge_waves([a, e], g, 3)) == 2 or merge_waves([a, e], g, 3)[0].devices_used <= 3


def test_random_workload_plans_quickly_on_1024_devices():
    w = random_workload(50, seed=1)
    assert len(w.tasks) == 50
    g = contract(w)
    est = alpha_beta_estimator(g, 1024)
    t0 = time.perf_counter()
    waves = plan_waves("spindle", g, est, 1024)
    elapsed = time.perf_counter() - t0
    assert elapsed < 10.0
    placed(waves, g, 1024)
    assert schedule_length(waves) <= relaxed_optimum(g, est, 1024) * 1.05


def test_random_workload_is_deterministic_and_multi_level():
    a, b = random_workload(12, seed=5), random_workload(12, seed=5)
    assert a == b
    assert random_workload(12, seed=6) != a
    levels = {m.level for m in contract(a).metaops}
    assert len(levels) >= 2
