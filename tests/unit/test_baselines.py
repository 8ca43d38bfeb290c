"""Baseline planners and the planner registry."""

from __future__ import annotations

import pytest

from spindle.costs.estimator import TableEstimator
from spindle.costs.graph import MetaGraph, contract
from spindle.declare.workload import load_workload
from spindle.plan.contract import Wave, schedule_length
from spindle.planner.baselines import distmm_mt, optimus, sequential, uniform
from spindle.planner.registry import PLANNERS, PlanningError, check_waves, plan_waves
from tests.fixtures import alpha_beta_estimator, synthetic_graph
from tests.plans import validate_placed


def _slices(waves: list[Wave]) -> list[list[tuple[int, int, int]]]:
    return [[(s.metaop, s.n, s.num_layers) for s in w.slices] for w in waves]


def test_registry_names():
    assert set(PLANNERS) == {"spindle", "sequential", "optimus", "distmm-mt", "uniform"}


@pytest.mark.parametrize("name", ["multitask-clip-4", "ofasys-7", "qwen-val-3"])
@pytest.mark.parametrize("num_devices", [1, 3, 8, 64])
@pytest.mark.parametrize("planner", sorted(PLANNERS))
def test_every_planner_gives_valid_plans(name: str, num_devices: int, planner: str):
    g = contract(load_workload(name))
    est = alpha_beta_estimator(g, num_devices)
    waves = plan_waves(planner, g, est, num_devices)
    check_waves(waves, g, est, num_devices)
    validate_placed(waves, g, num_devices)


def test_sequential_runs_each_metaop_alone_on_its_largest_valid_count():
    g = synthetic_graph([3, 2, 4], [(), (0,), ()], batches=[8, 6, 8])
    est = TableEstimator({0: {1: 1.0, 2: 0.6, 4: 0.4, 8: 0.5}, 1: {1: 1.0, 2: 0.5, 3: 0.4, 6: 0.3},
                          2: {1: 1.0, 4: 0.3}})
    waves = sequential(g, est, 5)
    assert _slices(waves) == [[(0, 4, 3)], [(1, 3, 2)], [(2, 4, 4)]]
    assert schedule_length(waves) == pytest.approx(3 * 0.4 + 2 * 0.4 + 4 * 0.3)


def _two_tasks() -> tuple[MetaGraph, TableEstimator]:
    # task a: MetaOps 0 -> 1, scales perfectly; task b: MetaOp 2, does not scale past 1 device
    g = synthetic_graph([4, 4, 1], [(), (0,), ()], batches=[24, 24, 24], tasks=["a", "a", "b"])
    perfect = {n: 6.0 / n for n in (1, 2, 3, 4, 6, 8, 12, 24)}
    flat = {n: 6.0 for n in (1, 2, 3, 4, 6, 8, 12, 24)}
    return g, TableEstimator({0: perfect, 1: perfect, 2: flat})


def test_uniform_splits_devices_evenly_over_tasks():
    g, est = _two_tasks()
    waves = uniform(g, est, 8)
    check_waves(waves, g, est, 8)
    ns = {s.metaop: s.n for w in waves for s in w.slices}
    assert ns == {0: 4, 1: 4, 2: 4}
    # tasks side by side: MetaOp 0 and 2 start together, 1 starts when 0 ends
    assert _slices(waves) == [[(0, 4, 4), (2, 4, 1)], [(1, 4, 4)]]


def test_optimus_gives_devices_where_they_help():
    g, est = _two_tasks()
    waves = optimus(g, est, 8)
    check_waves(waves, g, est, 8)
    ns = {s.metaop: s.n for w in waves for s in w.slices}
    assert ns[2] == 1  # task b gains nothing from more devices
    assert ns[0] == ns[1] == 6  # largest valid count within task a's share of 7
    # waves are synchronous: MetaOp 2's 6 s layer holds the first wave open past MetaOp 0's 4 s
    assert schedule_length(waves) == pytest.approx(6.0 + 4.0)
    assert schedule_length(uniform(g, est, 8)) == pytest.approx(6.0 + 6.0)


def test_distmm_splits_a_tasks_encoders_by_work_and_runs_tasks_in_turn():
    # task a: encoders 0 (3x the work of 1) then head 2; task b: MetaOp 3
    g = synthetic_graph([6, 2, 1, 4], [(), (), (0, 1), ()], batches=[24] * 4,
                        tasks=["a", "a", "a", "b"])
    perfect = {n: 6.0 / n for n in (1, 2, 3, 4, 6, 8, 12, 24)}
    est = TableEstimator({0: perfect, 1: perfect, 2: perfect, 3: perfect})
    waves = distmm_mt(g, est, 8)
    check_waves(waves, g, est, 8)
    assert _slices(waves) == [[(0, 6, 6), (1, 2, 2)], [(2, 8, 1)], [(3, 8, 4)]]


def test_rounds_when_tasks_need_more_than_n_devices():
    # three tasks whose MetaOps need at least 2 devices, on 5 devices: two rounds
    g = synthetic_graph([2, 2, 2], batches=[4, 4, 4])
    tab = {2: 1.0, 4: 0.6}
    est = TableEstimator({0: tab, 1: tab, 2: tab})
    for fn in (uniform, optimus, distmm_mt):
        waves = fn(g, est, 5)
        check_waves(waves, g, est, 5)
        validate_placed(waves, g, 5)
        assert all(w.devices_used <= 5 for w in waves)
    ns = {s.metaop: s.n for w in uniform(g, est, 5) for s in w.slices}
    assert sorted(ns.values()) == [2, 2, 4]  # round 1: shares 3 and 2 -> n 2, 2; round 2: 4


def test_spindle_is_never_slower_than_the_baselines_on_shipped_workloads():
    for name in ("multitask-clip-7", "ofasys-7", "qwen-val-3"):
        g = contract(load_workload(name))
        for n in (8, 32):
            est = alpha_beta_estimator(g, n)
            ours = schedule_length(plan_waves("spindle", g, est, n))
            for base in ("sequential", "optimus", "distmm-mt", "uniform"):
                theirs = schedule_length(plan_waves(base, g, est, n))
                assert ours <= theirs * (1 + 1e-9), f"{name}/{n}: {base}"


def test_plan_waves_errors_are_one_line():
    g, est = _two_tasks()
    with pytest.raises(PlanningError, match="unknown planner 'magic'") as err:
        plan_waves("magic", g, est, 8)
    assert "spindle, sequential, optimus, distmm-mt, uniform" in str(err.value)
    with pytest.raises(PlanningError, match="at least 1"):
        plan_waves("spindle", g, est, 0)
    impossible = TableEstimator({0: {4: 1.0}, 1: {4: 1.0}, 2: {1: 1.0}})
    for name in PLANNERS:
        with pytest.raises(PlanningError, match="MetaOp 0 .* no valid device count within 2") as e:
            plan_waves(name, g, impossible, 2)
        assert "\n" not in str(e.value)


def test_check_waves_catches_broken_schedules():
    g, est = _two_tasks()
    good = sequential(g, est, 4)
    check_waves(good, g, est, 4)
    with pytest.raises(PlanningError, match="starts before producer"):
        check_waves([good[1], good[0], good[2]], g, est, 4)
    with pytest.raises(PlanningError, match="more than 2"):
        check_waves(good, g, est, 2)
    with pytest.raises(PlanningError, match="only 0 of 1 layers"):
        check_waves(good[:2], g, est, 4)
