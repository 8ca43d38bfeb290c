"""Resource allocator of one MetaLevel: relaxed C*, n*_m and bi-point ASL tuples (docs/method.md
section 5)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from spindle.costs.estimator import TableEstimator
from spindle.planner.allocator import (
    AllocationError,
    ScalingCurve,
    allocate_level,
    bipoint,
    relaxed_optimum,
)
from tests.fixtures import synthetic_graph


def _curve(table: dict[int, float]) -> ScalingCurve:
    g = synthetic_graph([1])
    return ScalingCurve.of(g.metaops[0], TableEstimator({0: table}), max(table))


def test_curve_keeps_only_counts_that_are_faster():
    cv = _curve({1: 4.0, 2: 2.0, 3: 2.5, 4: 1.0, 6: 1.0})
    assert cv.counts == (1, 2, 4)
    assert cv.times == (4.0, 2.0, 1.0)


def test_curve_rejects_bad_times_and_missing_counts():
    g = synthetic_graph([2])
    with pytest.raises(AllocationError, match="time on 2 devices"):
        ScalingCurve.of(g.metaops[0], TableEstimator({0: {1: 1.0, 2: 0.0}}), 4)
    with pytest.raises(AllocationError, match="no valid device count within 2"):
        ScalingCurve.of(g.metaops[0], TableEstimator({0: {4: 1.0}}), 2)


def test_interpolation_and_inverse_agree():
    cv = _curve({1: 4.0, 2: 2.0, 4: 1.0})
    assert cv.time(3.0) == pytest.approx(1.5)
    assert cv.devices_for(1.5) == pytest.approx(3.0)
    # below the smallest count: time sharing keeps n * T constant
    assert cv.devices_for(8.0) == pytest.approx(0.5)
    assert cv.time(0.5) == pytest.approx(8.0)
    assert math.isinf(cv.devices_for(0.9))
    for n in np.linspace(0.3, 4.0, 40):
        assert cv.devices_for(cv.time(float(n))) == pytest.approx(float(n), rel=1e-9)


def _level(tables: list[dict[int, float]], layers: list[int]):
    g = synthetic_graph(layers)
    return g.metaops, TableEstimator({i: t for i, t in enumerate(tables)})


def test_single_device_is_the_sequential_time():
    ops, est = _level([{1: 3.0}, {1: 2.0}, {1: 0.5}], [2, 3, 4])
    a = allocate_level(ops, est, 1)
    assert a.c_star == pytest.approx(2 * 3.0 + 3 * 2.0 + 4 * 0.5)
    assert sum(a.n_star.values()) == pytest.approx(1.0)
    # each runs on its one device, all layers in one tuple
    assert all(t == (t[0],) and t[0].n == 1 for t in a.tuples.values())


def test_two_equal_metaops_split_the_devices_evenly():
    tab = {1: 8.0, 2: 4.0, 4: 2.0, 8: 1.0}
    ops, est = _level([tab, tab], [4, 4])
    a = allocate_level(ops, est, 8)
    assert a.n_star[0] == pytest.approx(4.0)
    assert a.n_star[1] == pytest.approx(4.0)
    assert a.c_star == pytest.approx(4 * 2.0)
    assert a.tuples[0] == (a.tuples[0][0],) and a.tuples[0][0].n == 4  # n* exactly valid


def test_metaop_that_cannot_use_more_devices_sets_c_star():
    # MetaOp 0 can use at most 2 devices and is long; the others get the rest and more
    ops, est = _level([{1: 10.0, 2: 5.0}, {1: 1.0, 2: 0.5, 4: 0.25}], [10, 10])
    a = allocate_level(ops, est, 16)
    assert a.c_star == pytest.approx(50.0)
    assert a.n_star[0] == pytest.approx(2.0)
    assert a.devices_used < 16
    # MetaOp 1 only needs C*/L = 5 s per layer: time sharing, a fifth of one device
    assert a.n_star[1] == pytest.approx(0.2)


def test_fewer_devices_than_metaops_time_shares():
    tab = {1: 1.0}
    ops, est = _level([tab] * 5, [3] * 5)
    a = allocate_level(ops, est, 2)
    assert a.c_star == pytest.approx(15 * 1.0 / 2)
    assert all(n == pytest.approx(0.4) for n in a.n_star.values())
    # the dummy n = 0 tuple is dropped: every MetaOp runs all layers on one device
    assert all(t[0].n == 1 and t[0].layers == 3 and len(t) == 1 for t in a.tuples.values())


def test_smallest_valid_count_above_one():
    # tensor-parallel-like MetaOp: valid only at 2 and 4
    ops, est = _level([{2: 2.0, 4: 1.0}, {1: 1.0, 2: 0.5}], [4, 4])
    a = allocate_level(ops, est, 3)  # only n = 2 is valid for MetaOp 0 within 3 devices
    assert a.c_star == pytest.approx(8.0)
    assert a.n_star[0] == pytest.approx(2.0)
    assert a.n_star[1] == pytest.approx(0.5)  # needs only 2 s per layer: half a device
    a = allocate_level(ops, est, 5)
    assert a.n_star[0] + a.n_star[1] == pytest.approx(5.0)
    assert a.n_star[0] == pytest.approx(4.0) and a.c_star == pytest.approx(4.0)
    assert {t.n for t in a.tuples[0]} <= {2, 4}


def test_no_valid_count_is_an_error():
    ops, est = _level([{4: 1.0}], [2])
    with pytest.raises(AllocationError, match="no valid device count within 2 devices"):
        allocate_level(ops, est, 2)
    with pytest.raises(AllocationError, match="below 1"):
        allocate_level(ops, est, 0)


def test_bipoint_splits_layers_between_neighbouring_counts():
    cv = _curve({1: 1.0, 2: 0.5})
    # n* = 1.5 -> T = 0.75, C* = 9 for 12 layers: 6 layers on each count
    tup = bipoint(cv, 1.5, 12)
    assert [(t.n, t.layers) for t in tup] == [(2, 6), (1, 6)]
    assert tup[1].start_s == pytest.approx(6 * 0.5)
    assert sum(t.layers * cv.times[cv.counts.index(t.n)] for t in tup) == pytest.approx(9.0)


def test_bipoint_edge_cases():
    cv = _curve({1: 1.0, 2: 0.5, 4: 0.25})
    assert [(t.n, t.layers) for t in bipoint(cv, 2.0, 5)] == [(2, 5)]  # exactly valid
    assert [(t.n, t.layers) for t in bipoint(cv, 0.3, 5)] == [(1, 5)]  # time shared
    assert [(t.n, t.layers) for t in bipoint(cv, 4.0, 5)] == [(4, 5)]  # at the top
    # rounding drops a tuple of 0 layers: n* just above 2 on one layer
    tup = bipoint(cv, 2.01, 1)
    assert len(tup) == 1 and tup[0].layers == 1
    assert bipoint(cv, 3.0, 0) == ()
    single = _curve({4: 2.0})
    assert [(t.n, t.layers) for t in bipoint(single, 4.0, 3)] == [(4, 3)]


def test_bipoint_tuples_finish_near_c_star():
    rng = random.Random(3)
    for _ in range(200):
        counts = sorted(rng.sample(range(1, 17), rng.randint(1, 6)))
        times = sorted((rng.uniform(0.1, 10.0) for _ in counts), reverse=True)
        cv = _curve(dict(zip(counts, times, strict=True)))
        L = rng.randint(1, 40)
        n_star = rng.uniform(cv.n_min, cv.n_max)
        c = L * cv.time(n_star)
        tup = bipoint(cv, n_star, L)
        assert sum(t.layers for t in tup) == L
        assert all(t.layers > 0 for t in tup)
        ns = [t.n for t in tup]
        assert all(n in cv.counts for n in ns)
        lo = max(n for n in cv.counts if n <= n_star * (1 + 1e-9))
        hi = min(n for n in cv.counts if n >= n_star * (1 - 1e-9))
        assert set(ns) <= {lo, hi}
        total = sum(t.layers * cv.times[cv.counts.index(t.n)] for t in tup)
        # rounding moves at most half a layer between the two counts
        slack = 0.5 * (cv.times[0] - cv.times[-1]) + 1e-9
        assert abs(total - c) <= slack


# --- brute force: the allocator's C* is the optimum of the continuous relaxation -------------


def _interp_time(counts: list[int], times: list[float], n: np.ndarray) -> np.ndarray:
    """Independent forward model: linear between valid counts, n*T constant below the first."""
    c = np.asarray(counts, float)
    t = np.asarray(times, float)
    out = np.interp(n, c, t)
    below = n < c[0]
    out[below] = t[0] * c[0] / np.maximum(n[below], 1e-12)
    return out


def _brute_force(tables: list[dict[int, float]], layers: list[int], N: int) -> float:
    """min over real n_m >= 0 with sum n_m <= N of max_m L_m T_m(n_m): a (log-spaced) grid over
    all MetaOps but the last, which gets every device left (more devices never hurt)."""
    pruned = []
    for tab in tables:
        cs, ts = [], []
        for n in sorted(tab):
            if not ts or tab[n] < ts[-1]:
                cs.append(n)
                ts.append(tab[n])
        pruned.append((cs, ts))
    m = len(tables)
    if m == 1:
        cs, ts = pruned[0]
        return float(layers[0] * _interp_time(cs, ts, np.array([float(min(N, cs[-1]))]))[0])
    points = 2001 if m == 2 else 701
    grids = [np.geomspace(1e-3, min(N, pruned[k][0][-1]), points) for k in range(m - 1)]
    mesh = np.meshgrid(*grids, indexing="ij")
    rest = N - sum(mesh)
    last = np.minimum(np.maximum(rest, 1e-12), pruned[-1][0][-1])
    span = layers[-1] * _interp_time(*pruned[-1], last.ravel()).reshape(last.shape)
    for k in range(m - 1):
        part = layers[k] * _interp_time(*pruned[k], mesh[k].ravel()).reshape(last.shape)
        span = np.maximum(span, part)
    return float(span[rest > 1e-9].min())


@pytest.mark.parametrize("seed", range(24))
def test_c_star_matches_brute_force(seed: int):
    rng = random.Random(seed)
    m = rng.choice((1, 2, 2, 3))
    N = rng.randint(1, 6)
    tables = []
    for _ in range(m):
        counts = sorted(rng.sample(range(1, 7), rng.randint(1, 4)))
        if counts[0] > N:
            counts = [1] + counts
        t = rng.uniform(1.0, 5.0)
        tab = {}
        for n in counts:
            tab[n] = t
            t *= rng.uniform(0.35, 0.95)
        tables.append(tab)
    layers = [rng.randint(1, 8) for _ in range(m)]
    curves = [_curve({n: t for n, t in tab.items() if n <= N} or tab) for tab in tables]
    c_star, n_star = relaxed_optimum(curves, layers, N)
    brute = _brute_force([{n: t for n, t in tab.items() if n <= N} for tab in tables], layers, N)
    # the grid can only find a C at or above the optimum, and gets close to it
    assert c_star <= brute * (1 + 1e-9)
    assert brute <= c_star * 1.015
    assert sum(n_star) <= N * (1 + 1e-9)
    for cv, nl, n in zip(curves, layers, n_star, strict=True):
        assert nl * cv.time(n) <= c_star * (1 + 1e-9)


def test_large_level_is_fast():
    rng = random.Random(0)
    tables, layers = [], []
    for _ in range(300):
        w = rng.uniform(0.01, 1.0)
        tables.append({n: 1e-3 + w / n + (2e-3 if n > 1 else 0.0)
                       for n in (1, 2, 4, 8, 16, 32, 64, 128, 256)})
        layers.append(rng.randint(1, 48))
    ops, est = _level(tables, layers)
    a = allocate_level(ops, est, 1024)
    assert sum(a.n_star.values()) == pytest.approx(1024, rel=1e-6)
    spans = [layers[i] * ScalingCurve.of(ops[i], est, 1024).time(a.n_star[i]) for i in range(300)]
    assert max(spans) == pytest.approx(a.c_star, rel=1e-6)
    assert min(spans) == pytest.approx(a.c_star, rel=1e-6)
