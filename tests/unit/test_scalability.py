"""Tests of the hardware model and the piecewise alpha-beta scalability estimator."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import yaml

from spindle.costs.estimator import Estimator, data_parallel_counts
from spindle.costs.graph import contract
from spindle.costs.hardware import (
    HARDWARE_FILE,
    HardwareError,
    HardwareModel,
    load_hardware,
)
from spindle.costs.profile import ring_factor
from spindle.costs.scalability import (
    FittedEstimator,
    HardwarePoints,
    PiecewiseAlphaBeta,
    default_uppers,
    make_estimator,
    sample_counts,
)
from spindle.declare.workload import load_workload, workload_from_dict
from spindle.plan.contract import MetaOp


@pytest.fixture(scope="module")
def clip10() -> list[MetaOp]:
    return contract(load_workload("multitask-clip-10")).metaops


def _op(ops: list[MetaOp], name: str) -> MetaOp:
    return next(o for o in ops if o.name == name)


# --- PiecewiseAlphaBeta ------------------------------------------------------------------------

W, SB = 4.0e12, 8.0e7  # FLOPs, gradient bytes
TRUE = {  # range upper -> (a, b, b')
    1: (2e-4, 0.0, 1 / 150e12),
    2: (3e-4, 1 / 180e9, 1 / 150e12),
    4: (3e-4, 1 / 180e9, 1 / 140e12),
    8: (4e-4, 1 / 160e9, 1 / 120e12),
    16: (5e-4, 1 / 45e9, 1 / 100e12),
    32: (6e-4, 1 / 40e9, 1 / 80e12),
}


def _true_t(n: int) -> float:
    up = min(u for u in TRUE if u >= n)
    a, b, bw = TRUE[up]
    return a + b * ring_factor(n) * SB + bw * W / n


def test_fit_reproduces_synthetic_alpha_beta_exactly() -> None:
    pts = [(n, _true_t(n)) for n in range(1, 33)]
    m = PiecewiseAlphaBeta.fit(pts, W, SB, uppers=(1, 2, 4, 8, 16, 32))
    assert m.max_relative_error() < 1e-6
    for n in range(1, 33):
        assert m(n) == pytest.approx(_true_t(n), rel=1e-6)
    # c(n) = 2 (n-1)/n * SB is affine in 1/n, so inside a range only the effective constant
    # a + 2 b SB and the effective 1/n coefficient b' W - 2 b SB are identified: check those
    for k, up in enumerate(m.uppers):
        a, b, bw = m.coeffs[k]
        ta, tb, tbw = TRUE[up]
        if up >= 4:  # ranges with >= 2 points of their own
            assert a + 2 * b * SB == pytest.approx(ta + 2 * tb * SB, rel=1e-5)
            assert bw * W - 2 * b * SB == pytest.approx(tbw * W - 2 * tb * SB, rel=1e-5)
        assert min(a, b, bw) >= 0
    assert all(m.fitted)


def test_fit_with_noise_stays_within_a_few_percent() -> None:
    pts = [(n, _true_t(n) * (1 + 0.01 * ((-1) ** n))) for n in (1, 2, 4, 8, 16, 32, 3, 6, 12, 24)]
    m = PiecewiseAlphaBeta.fit(pts, W, SB)
    assert m.max_relative_error() < 0.03


def test_piecewise_ranges_and_boundaries() -> None:
    assert default_uppers(32) == (1, 2, 4, 8, 16, 32)
    assert default_uppers(20, devices_per_node=6) == (1, 2, 4, 6, 8, 16, 32)
    m = PiecewiseAlphaBeta(W, SB, (1, 2, 4, 8), ((0, 0, 0),) * 4)
    assert [m.range_index(n) for n in (1, 2, 3, 4, 5, 8, 9, 100)] == [0, 1, 2, 2, 3, 3, 3, 3]
    # a step between ranges is kept, not smoothed: two ranges, different overheads
    pts = ([(n, 1e-3 + W / n / 1e14) for n in (1, 2, 3, 4)]
           + [(n, 5e-3 + W / n / 1e14) for n in (5, 6, 7, 8)])
    m = PiecewiseAlphaBeta.fit(pts, W, 0.0, uppers=(4, 8))
    assert m(4) == pytest.approx(pts[3][1], rel=1e-6)
    assert m(5) == pytest.approx(pts[4][1], rel=1e-6)


def test_unprofiled_ranges_extrapolate_from_the_nearest_fitted_range() -> None:
    pts = [(n, _true_t(n)) for n in (1, 2, 3, 4)]
    m = PiecewiseAlphaBeta.fit(pts, W, SB, uppers=(1, 2, 4, 8, 16))
    assert m.fitted == (True, True, True, False, False)
    assert m.coeffs[3] == m.coeffs[2] == m.coeffs[4]
    assert m(16) < m(4)  # compute-dominated: more devices still help
    assert m(1) == pytest.approx(_true_t(1), rel=1e-6)


def test_fit_rejects_bad_points() -> None:
    with pytest.raises(ValueError):
        PiecewiseAlphaBeta.fit([], W, SB)
    with pytest.raises(ValueError):
        PiecewiseAlphaBeta.fit([(1, 0.0)], W, SB)
    with pytest.raises(ValueError):
        PiecewiseAlphaBeta.fit([(0, 1.0)], W, SB)


class _RisingSource:
    """A source whose raw times rise past n = 4 (an inter-node all-reduce worse than the
    compute it saves)."""

    def points(self, op: MetaOp, max_n: int):  # type: ignore[no-untyped-def]
        from spindle.costs.profile import ProfilePoint
        from spindle.costs.scalability import SourcePoints

        pts = []
        for n in sample_counts(op.batch, max_n):
            sync = 0.0 if n == 1 else (1e-4 if n <= 4 else 4e-3) * ring_factor(n)
            pts.append(ProfilePoint(n, 1e-4 + 1e-2 / n, sync))
        return SourcePoints(tuple(pts), 4, "test")


def test_estimator_is_positive_and_non_increasing(clip10: list[MetaOp]) -> None:
    est = FittedEstimator(_RisingSource(), devices_per_node=4)
    op = _op(clip10, "vision-text/vision")
    counts = est.valid_counts(op, 256)
    times = [est.time(op, n) for n in counts]
    assert all(t > 0 for t in times)
    assert all(a >= b for a, b in zip(times, times[1:]))
    raw = est.table(op).model
    assert raw(8) > raw(4)  # the raw fit does rise ...
    assert est.time(op, 8) == est.time(op, 4)  # ... and the table takes the running minimum
    for n in counts:
        assert 0 <= est.compute_time(op, n) <= est.time(op, n)
    assert est.compute_time(op, 8) < est.compute_time(op, 4)  # compute itself still shrinks


# --- hardware model ------------------------------------------------------------------------------


def test_presets_have_a_source_for_every_constant() -> None:
    data = yaml.safe_load(HARDWARE_FILE.read_text())
    assert {"a800", "h100", "h200", "cpu"} <= set(data)
    for name, preset in data.items():
        hw = load_hardware(name)
        for fld, val in preset.items():
            if fld != "description":
                assert val["source"].strip(), (name, fld)
        assert set(hw.sources) == {k for k in preset if k != "description"}
    a800 = load_hardware("a800")
    assert (a800.peak_flops, a800.memory_bytes, a800.devices_per_node) == (312e12, 80 * 2**30, 8)
    assert a800.inter_node_bandwidth == 50e9
    assert load_hardware("h100").peak_flops == 790e12
    h200 = load_hardware("h200")  # the H100's chip, more and faster memory
    assert h200.memory_bytes == 143771 * 2**20 and h200.memory_bandwidth > 3.35e12
    assert "MEASURED" in h200.sources["peak_flops"]
    assert all("PLACEHOLDER" in s or "machine" in s or "fp32" in s or "MEASURED" in s
               for s in load_hardware("cpu").sources.values())


def test_hardware_time_falls_for_big_ops_and_flattens_for_tiny_ones(clip10: list[MetaOp]) -> None:
    hw = load_hardware("a800")
    src = HardwarePoints(hw)
    big = _op(clip10, "vision-text/vision")
    t = [src.compute(big, n) + src.sync(big, n) for n in (1, 2, 4, 8)]
    assert all(a > b for a, b in zip(t, t[1:]))
    assert t[0] / t[3] > 5  # near-linear scaling of a ViT-H layer inside a node
    tiny = contract(load_workload("tiny-multitask-clip")).metaops[0]
    tt = [src.compute(tiny, n) for n in (1, 2, 4, 8)]
    assert tt[0] / tt[3] < 1.01  # overhead and efficiency drop: no speed-up left
    assert hw.efficiency(1e6) < 0.01 * hw.max_efficiency < hw.efficiency(1e13)
    assert src.sync(big, 1) == 0.0 and src.sync(big, 2) > 0.0
    assert src.sync(big, 16) > src.sync(big, 8)  # inter-node ring is slower


def test_vit_h_layer_on_one_a800_is_tens_of_ms(clip10: list[MetaOp]) -> None:
    est = make_estimator("a800")
    vit = _op(clip10, "vision-text/vision")  # batch 256, 257 tokens, hidden 1280
    assert 0.02 < est.time(vit, 1) < 0.1
    assert est.sync_time(vit, 1) == 0.0
    for n in (2, 4, 8):  # not clipped by the running minimum: time = compute + sync
        assert est.time(vit, n) == pytest.approx(est.compute_time(vit, n) + est.sync_time(vit, n))
    assert est.table(vit).model.max_relative_error() < 1e-4


def test_loss_runs_on_one_device_only(clip10: list[MetaOp]) -> None:
    est = make_estimator("a800")
    loss = next(o for o in clip10 if o.is_loss)
    assert est.valid_counts(loss, 64) == [1]
    assert est.time(loss, 8) == est.time(loss, 1) > 0
    enc = _op(clip10, "imu-text/imu")
    assert est.valid_counts(enc, 24) == data_parallel_counts(enc.batch, 24)
    assert isinstance(est, Estimator)


def test_devices_per_node_changes_where_the_ring_goes_inter_node(clip10: list[MetaOp]) -> None:
    vit = _op(clip10, "vision-text/vision")
    narrow = make_estimator("a800", devices_per_node=8)
    wide = make_estimator("a800", devices_per_node=16)
    assert wide.sync_time(vit, 16) < narrow.sync_time(vit, 16)
    assert wide.sync_time(vit, 8) == pytest.approx(narrow.sync_time(vit, 8))


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "hw.yaml"
    p.write_text(text)
    return p


def test_hardware_loader_errors_are_one_line(tmp_path: Path) -> None:
    good = yaml.safe_load(HARDWARE_FILE.read_text())["a800"]
    cases = []
    bad = dict(good, peak_flops={"value": -1, "source": "x"})
    cases.append((yaml.safe_dump({"mine": bad}), "peak_flops"))
    bad = dict(good, max_efficiency={"value": 1.5, "source": "x"})
    cases.append((yaml.safe_dump({"mine": bad}), "max_efficiency"))
    bad = dict(good, devices_per_node={"value": 8})
    cases.append((yaml.safe_dump({"mine": bad}), "devices_per_node.source"))
    bad = {k: v for k, v in good.items() if k != "grad_bytes"}
    cases.append((yaml.safe_dump({"mine": bad}), "grad_bytes"))
    bad = dict(good, turbo={"value": 2, "source": "x"})
    cases.append((yaml.safe_dump({"mine": bad}), "turbo"))
    cases.append(("a: [1,\n", "malformed"))
    for text, needle in cases:
        with pytest.raises(HardwareError) as e:
            load_hardware(_write(tmp_path, text))
        msg = str(e.value)
        assert "\n" not in msg and needle in msg and "hw.yaml" in msg, msg
    with pytest.raises(HardwareError, match="shipped: a800, cpu, h100"):
        load_hardware("a900")
    assert issubclass(HardwareError, ValueError)


def test_custom_hardware_file_loads(tmp_path: Path) -> None:
    data = yaml.safe_load(HARDWARE_FILE.read_text())
    p = _write(tmp_path, yaml.safe_dump({"a800": data["a800"], "h100": data["h100"]}))
    assert load_hardware(f"{p}:h100").peak_flops == 790e12
    with pytest.raises(HardwareError, match="PATH:NAME"):
        load_hardware(p)
    single = _write(tmp_path, yaml.safe_dump(data["a800"]))
    hw = load_hardware(single)
    assert isinstance(hw, HardwareModel) and hw.name == "hw" and hw.peak_flops == 312e12


# --- speed ---------------------------------------------------------------------------------------


def _fifty_task_workload() -> list[MetaOp]:
    base = load_workload("multitask-clip-10").to_dict()
    comps = list(base["components"])
    toks = {"vision": 257, "text": 77, "audio": 229, "depth": 197, "thermal": 197, "imu": 251}
    batches = [64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048]
    tasks = []
    for i in range(50):
        a, b = comps[i % 6], comps[(i // 6 + i + 1) % 6]
        if a == b:
            b = comps[(comps.index(a) + 1) % 6]
        tasks.append({
            "name": f"t{i}", "batch_size": batches[i % len(batches)],
            "stages": [{"name": a, "component": a, "tokens": toks[a] - i % 3},
                       {"name": b, "component": b, "tokens": toks[b]}],
            "loss": {"type": "contrastive", "inputs": [a, b]},
        })
    base["tasks"] = tasks
    return contract(workload_from_dict(base)).metaops


def test_fifty_tasks_on_1024_devices_estimate_fast() -> None:
    ops = _fifty_task_workload()
    t0 = time.perf_counter()
    est = make_estimator("a800")
    total = 0
    for op in ops:
        counts = est.valid_counts(op, 1024)
        for n in counts:
            total += 1
            assert est.time(op, n) > 0
    fit_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(20):  # after the fit, lookups are O(1)
        for op in ops:
            for n in (1, 7, 64, 1000):
                est.time(op, n)
                est.compute_time(op, n)
    lookup_s = time.perf_counter() - t1
    assert total > 500
    assert fit_s < 3.0, fit_s
    assert lookup_s < 0.5, lookup_s


def test_hardware_points_sample_powers_of_two_and_divisors() -> None:
    assert sample_counts(96, 1024) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96]
    assert sample_counts(8, 2) == [1, 2]


def test_fallback_warning_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    # a profile with no entries: every MetaOp falls back to the hardware model, logged once
    from spindle.costs.profile import CollectiveFit, Profile
    from spindle.costs.scalability import ProfilePoints

    prof = Profile("w", "", 2, 1, 1, "float32", 4, "x", {}, CollectiveFit("gloo", 2, 1e-4, 1e9), {})
    est = FittedEstimator(ProfilePoints(prof, load_hardware("a800")))
    op = contract(load_workload("tiny-multitask-clip")).metaops[0]
    with caplog.at_level(logging.INFO, logger="spindle.costs.scalability"):
        est.time(op, 1)
        est.time(op, 2)
    assert sum("using hardware model 'a800'" in r.message for r in caplog.records) == 1
    assert est.table(op).origin == "hardware:a800"
