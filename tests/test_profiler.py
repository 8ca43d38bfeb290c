"""Tests of ``spindle profile``: the measured blocks, the collective fit, the profile file."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import pytest

from spindle.costs.graph import contract
from spindle.costs.profile import PROFILE_SCHEMA_VERSION, ProfileError, load_profile
from spindle.costs.scalability import layer_grad_params, make_estimator, signature
from spindle.declare.workload import load_workload
from spindle.tools.profile import (
    add_profile_arguments,
    block_flops,
    build_block,
    fit_collective,
    run_profile_command,
    time_metaop,
)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_profile_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def clip_profile(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("prof") / "profile.json"
    t0 = time.perf_counter()
    rc = run_profile_command(
        _args("tiny-multitask-clip", "--devices", "2", "--out", str(out), "--repeats", "3",
              "--no-progress")
    )
    assert rc == 0
    return out, time.perf_counter() - t0


def test_blocks_have_the_parameters_the_cost_model_counts() -> None:
    for name in ("tiny-multitask-clip", "tiny-ofasys", "tiny-qwen-val"):
        for op in contract(load_workload(name)).metaops:
            if op.is_loss:
                continue
            block = build_block(op.kind, op.cost.hidden, op.cost.heads, op.cost.ffn)
            assert sum(p.numel() for p in block.parameters()) == op.cost.params_per_layer, op.name


def test_every_block_kind_times_positive() -> None:
    ops = contract(load_workload("tiny-ofasys")).metaops + contract(load_workload("tiny-qwen-val")).metaops
    kinds = {}
    for op in ops:
        kinds.setdefault(op.kind, op)
    assert set(kinds) == {"encoder", "decoder", "llm"}
    for op in kinds.values():
        assert 0 < time_metaop(op, 2, warmup=1, repeats=2) < 1.0


def test_real_profile_of_tiny_clip(clip_profile: tuple[Path, float]) -> None:
    path, elapsed = clip_profile
    raw = json.loads(path.read_text())
    # the time itself is a benchmark figure on this shared machine (13-26 s seen); the profile
    # records the time it measured, within the run's own wall time
    assert 0 < raw["elapsed_s"] <= elapsed
    assert raw["schema_version"] == PROFILE_SCHEMA_VERSION and raw["torch_version"]
    assert raw["machine"]["cpu_count"] >= 1
    prof = load_profile(path)
    ops = contract(load_workload("tiny-multitask-clip")).metaops
    assert set(prof.entries) == {signature(o) for o in ops}
    for op in ops:
        e = prof.entry(signature(op))
        assert e is not None
        assert [p.n for p in e.points] == ([1] if op.is_loss else [1, 2])
        assert all(p.compute_s > 0 for p in e.points)
        assert e.points[0].sync_s == 0.0
        if not op.is_loss:
            assert e.points[1].sync_s > 0.0
    c = prof.collective
    assert c.backend == "gloo" and c.latency_s >= 0 and c.bandwidth > 0 and len(c.samples) >= 3


def test_estimator_uses_the_profile(clip_profile: tuple[Path, float]) -> None:
    path, _ = clip_profile
    prof = load_profile(path)
    est = make_estimator("a800", profile=path, devices_per_node=2)
    for op in contract(load_workload("tiny-multitask-clip")).metaops:
        e = prof.entry(signature(op))
        assert e is not None
        assert est.table(op).origin.startswith("profile:")
        # what the estimator should see: the chain's per-layer compute as measured (the light
        # parts are in it: no FLOP rescaling), plus the measured collective model on the
        # layer's full gradient volume
        assert e.measurement == "chain" and e.flops_per_layer == op.cost.flops_per_layer
        scale = 1.0
        nbytes = layer_grad_params(op) * prof.grad_bytes
        want = {p.n: p.compute_s * scale + prof.collective.allreduce_time(nbytes, p.n)
                for p in e.points}
        for n in want:
            # the fit reproduces the points (up to the running minimum over n)
            assert est.time(op, n) == pytest.approx(min(want[m] for m in want if m <= n), rel=0.02)
            measured = next(p.compute_s for p in e.points if p.n == n) * scale
            # compute_time is the fitted compute at n, capped by time(n)
            assert est.compute_time(op, n) == pytest.approx(min(measured, est.time(op, n)), rel=0.05)


def test_chain_profile_times_every_metaop_with_the_runtime(clip_profile: tuple[Path, float]) -> None:
    path, _ = clip_profile
    raw = json.loads(path.read_text())
    assert raw["threads_per_device"] == 1  # 2 devices: a torchrun rank gets OMP_NUM_THREADS=1
    prof = load_profile(path)
    ops = contract(load_workload("tiny-multitask-clip")).metaops
    for op in ops:
        e = prof.entry(signature(op))
        assert e is not None and e.measurement == "chain"
        assert all(p.compute_s > 0 for p in e.points)
        assert e.flops_per_layer == pytest.approx(op.cost.flops_per_layer)
        if not op.is_loss:  # the light parts are counted, not the bare block's FLOPs
            assert e.flops_per_layer > block_flops(op)


def test_time_chain_runs_the_runtime_operators_of_every_kind() -> None:
    from spindle.tools.profile import time_chain

    seen = set()
    for name in ("tiny-multitask-clip", "tiny-ofasys", "tiny-qwen-val"):
        w = load_workload(name)
        for op in contract(w).metaops:
            if op.kind in seen:
                continue
            seen.add(op.kind)
            assert 0 < time_chain(w, op, 1 if op.is_loss else 2, warmup=1, repeats=2) < 1.0
    assert seen == {"encoder", "decoder", "llm", "contrastive"}


def test_estimator_uses_a_chain_entry_as_is_and_scales_a_block_entry(tmp_path: Path) -> None:
    op = next(o for o in contract(load_workload("tiny-multitask-clip")).metaops
              if signature(o) == ("encoder", 32, 4, 128, 9, 0, 8))
    assert op.cost.flops_per_layer > block_flops(op)  # light parts spread over the chain
    for measurement, version, flops, want in (
        ("chain", 3, op.cost.flops_per_layer, 1e-3),
        ("block", 2, block_flops(op), 1e-3 * op.cost.flops_per_layer / block_flops(op)),
    ):
        data = _valid_profile()
        data["schema_version"] = version
        e = data["entries"][0]
        e["flops_per_layer"] = flops
        e["points"] = [{"n": 1, "compute_s": 1e-3, "sync_s": 0.0}]
        if measurement == "chain":
            e["measurement"] = "chain"
        p = tmp_path / f"{measurement}.json"
        p.write_text(json.dumps(data))
        est = make_estimator("a800", profile=p)
        assert est.compute_time(op, 1) == pytest.approx(want, rel=1e-6), measurement


def test_chain_entries_need_version_3(tmp_path: Path) -> None:
    data = _valid_profile()
    data["schema_version"] = 2
    data["entries"][0]["measurement"] = "chain"
    p = tmp_path / "v2chain.json"
    p.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="schema_version 3"):
        load_profile(p)


def test_default_threads_follow_torchrun() -> None:
    from spindle.tools.profile import default_threads

    assert default_threads(2, {}) == 1
    assert default_threads(4, {"OMP_NUM_THREADS": "3"}) == 3
    assert default_threads(1, {}) >= 1


def test_profile_falls_back_to_hardware_for_unknown_signatures(clip_profile: tuple[Path, float]) -> None:
    path, _ = clip_profile
    est = make_estimator("a800", profile=path)
    op = contract(load_workload("tiny-qwen-val")).metaops[0]
    assert est.time(op, 1) == pytest.approx(make_estimator("a800").time(op, 1))
    assert est.table(op).origin == "hardware:a800"


def test_guard_refuses_full_size_workloads(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    t0 = time.perf_counter()
    rc = run_profile_command(
        _args("multitask-clip-10", "--devices", "8", "--out", str(tmp_path / "p.json"),
              "--max-seconds", "30", "--no-progress")
    )
    assert rc == 2
    assert time.perf_counter() - t0 < 5  # refused before measuring anything
    err = capsys.readouterr().err.strip()
    assert "--max-seconds" in err and "\n" not in err
    assert not (tmp_path / "p.json").exists()


def test_bad_workload_is_reported(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run_profile_command(_args("no-such-workload", "--out", str(tmp_path / "p.json"))) == 2
    assert "no-such-workload" in capsys.readouterr().err


def test_fit_collective_recovers_latency_and_bandwidth() -> None:
    lat, bw = 2e-4, 1.5e9
    samples = [(b, lat + b / bw) for b in (4096, 65536, 1 << 20, 1 << 22)]  # 2 processes: factor 1
    fit = fit_collective(samples, processes=2)
    assert fit.latency_s == pytest.approx(lat, rel=1e-3)
    assert fit.bandwidth == pytest.approx(bw, rel=1e-3)
    assert fit.allreduce_time(1e6, 1) == 0.0
    assert fit.allreduce_time(1e6, 4) == pytest.approx(lat + 1.5 * 1e6 / bw)


def _valid_profile() -> dict[str, Any]:
    return {
        "schema_version": PROFILE_SCHEMA_VERSION, "kind": "spindle-profile", "workload": "w",
        "devices": 2, "repeats": 3, "threads_per_device": 1, "dtype": "float32", "grad_bytes": 4,
        "torch_version": "2.x", "machine": {"cpu": "x"},
        "collective": {"backend": "gloo", "processes": 2, "latency_s": 1e-4, "bandwidth_Bps": 1e9},
        "entries": [{
            "signature": {"kind": "encoder", "hidden": 32, "heads": 4, "ffn": 128, "tokens": 9,
                          "memory_tokens": 0, "batch": 8},
            "params_per_layer": 12704, "flops_per_layer": 1e6,
            "points": [{"n": 1, "compute_s": 1e-3, "sync_s": 0.0},
                       {"n": 2, "compute_s": 6e-4, "sync_s": 2e-4}],
        }],
    }


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda d: d.update(schema_version=99), "schema_version"),
        (lambda d: d["entries"][0]["points"][0].update(compute_s=-1.0), "entries.0.points.0.compute_s"),
        (lambda d: d["entries"][0]["points"][1].update(n=1), "duplicate n"),
        (lambda d: d.pop("collective"), "collective"),
        (lambda d: d["entries"][0]["signature"].update(hidden="big"), "signature.hidden"),
        (lambda d: d.update(extra=1), "extra"),
    ],
)
def test_load_profile_errors_are_one_line(tmp_path: Path, mutate: Any, needle: str) -> None:
    data = _valid_profile()
    mutate(data)
    p = tmp_path / "prof.json"
    p.write_text(json.dumps(data))
    with pytest.raises(ProfileError) as e:
        load_profile(p)
    msg = str(e.value)
    assert "\n" not in msg and needle in msg and "prof.json" in msg, msg


def test_load_profile_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="cannot read"):
        load_profile(tmp_path / "missing.json")
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(ProfileError, match="malformed JSON"):
        load_profile(p)
    p.write_text(json.dumps(_valid_profile()))
    prof = load_profile(p)
    assert len(prof.entries) == 1 and issubclass(ProfileError, ValueError)


def test_real_profile_measures_p2p_and_the_optimizer(clip_profile: tuple[Path, float]) -> None:
    raw = json.loads(clip_profile[0].read_text())
    assert raw["schema_version"] == PROFILE_SCHEMA_VERSION == 4
    prof = load_profile(clip_profile[0])
    assert prof.p2p is not None and prof.optimizer is not None
    assert prof.p2p.latency_s >= 0 and prof.p2p.bandwidth > 0 and len(prof.p2p.samples) >= 2
    # the optimizer sets are the runtime's own parameter tensors: 1/4, 1/2, all, twice
    params = [n for n, _ in prof.optimizer.samples]
    assert params == sorted(params) and params[-1] == 2 * params[-2]
    assert prof.optimizer.step_time(2e5) > prof.optimizer.step_time(1e4) > 0
    assert prof.optimizer.step_time(0) == 0.0


def test_version_1_profile_still_loads_without_the_new_measurements(tmp_path: Path) -> None:
    data = _valid_profile()
    data["schema_version"] = 1
    p = tmp_path / "v1.json"
    p.write_text(json.dumps(data))
    prof = load_profile(p)
    assert prof.p2p is None and prof.optimizer is None and prof.schema_version == 1


def test_version_2_profile_round_trips_the_new_measurements(tmp_path: Path) -> None:
    data = _valid_profile()
    data["p2p"] = {"backend": "gloo", "latency_s": 2e-4, "bandwidth_Bps": 2e9,
                   "samples": [{"bytes": 4096, "seconds": 2e-4}, {"bytes": 1 << 20, "seconds": 7e-4}]}
    data["optimizer"] = {"fixed_s": 1e-3, "per_param_s": 3e-8,
                         "samples": [{"params": 1000, "seconds": 1.03e-3}]}
    p = tmp_path / "v2.json"
    p.write_text(json.dumps(data))
    prof = load_profile(p)
    assert prof.optimizer is not None and prof.optimizer.step_time(1e5) == pytest.approx(4e-3)
    assert prof.p2p is not None
    # measured samples are interpolated, beyond the largest the fitted bandwidth applies
    assert prof.p2p.exchange_time(4096) == pytest.approx(2e-4)
    mid = (4096 + (1 << 20)) / 2
    assert prof.p2p.exchange_time(mid) == pytest.approx((2e-4 + 7e-4) / 2)
    assert prof.p2p.exchange_time(2 << 20) == pytest.approx(7e-4 + (1 << 20) / 2e9)
    again = tmp_path / "again.json"
    from spindle.costs.profile import write_profile

    write_profile(prof, again)
    back = load_profile(again)
    assert back.p2p == prof.p2p and back.optimizer == prof.optimizer
    data["optimizer"]["per_param_s"] = -1.0
    p.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="optimizer.per_param_s"):
        load_profile(p)


def test_fit_optimizer_and_p2p_recover_their_lines() -> None:
    from spindle.tools.profile import fit_optimizer, fit_p2p

    opt = fit_optimizer([(n, 1e-3 + 3e-8 * n) for n in (10_000, 20_000, 40_000, 80_000)])
    assert opt.fixed_s == pytest.approx(1e-3, rel=1e-3)
    assert opt.per_param_s == pytest.approx(3e-8, rel=1e-3)
    p2p = fit_p2p([(b, 1.5e-4 + b / 2e9) for b in (4096, 65536, 1 << 20)])
    assert p2p.latency_s == pytest.approx(1.5e-4, rel=1e-3)
    assert p2p.bandwidth == pytest.approx(2e9, rel=1e-3)


def test_real_profile_calibrates_the_runtime_per_wave(clip_profile: tuple[Path, float]) -> None:
    """The runtime ran the one-device sequential plan; its phases against the profile's chains
    of the same slices give the per-wave overhead, which the simulator adds to every wave."""
    from spindle.planner.pipeline import build_plan, make_context
    from spindle.planner.simulator import simulate
    from spindle.tools.profile import calibration_plan, runtime_calibration

    prof = load_profile(clip_profile[0])
    cal = prof.runtime
    assert cal is not None
    w = load_workload("tiny-multitask-clip")
    plan = calibration_plan(w)
    assert cal.waves == len(plan.waves) and plan.num_devices == 1
    assert cal.iteration_s > 0 and cal.chains_s > 0
    assert cal.wave_overhead_s == pytest.approx(max(0.0, (cal.iteration_s - cal.chains_s)
                                                    / cal.waves))
    # recomputed from the profile's own entries: the same chains sum
    again = runtime_calibration(contract(w).metaops, plan, prof.entries, cal.iteration_s)
    assert again.chains_s == pytest.approx(cal.chains_s)
    # a plan simulated with the calibration is longer by exactly one overhead per wave
    ctx = make_context(w, 2, 2, "cpu", clip_profile[0])
    assert ctx.links.wave_overhead_s == cal.wave_overhead_s
    two, _ = build_plan(ctx, "sequential")
    without = simulate(two, ctx.graph, ctx.estimator,
                       dataclasses.replace(ctx.links, wave_overhead_s=0.0))
    with_ = simulate(two, ctx.graph, ctx.estimator, ctx.links)
    assert with_.compute_s - without.compute_s == pytest.approx(
        len(two.waves) * cal.wave_overhead_s)


def test_runtime_calibration_round_trips_and_is_validated(tmp_path: Path) -> None:
    from spindle.costs.profile import write_profile

    data = _valid_profile()
    data["runtime"] = {"wave_overhead_s": 2e-4, "iteration_s": 0.03, "chains_s": 0.028,
                       "waves": 10}
    p = tmp_path / "v4.json"
    p.write_text(json.dumps(data))
    prof = load_profile(p)
    assert prof.runtime is not None and prof.runtime.wave_overhead_s == 2e-4
    again = tmp_path / "again.json"
    write_profile(prof, again)
    assert load_profile(again).runtime == prof.runtime
    data["runtime"]["waves"] = 0
    p.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="runtime.waves"):
        load_profile(p)
    del data["runtime"]
    data["schema_version"] = 3  # older profiles: no calibration, no overhead
    p.write_text(json.dumps(data))
    assert load_profile(p).runtime is None


def test_time_call_combines_every_run_before_the_median() -> None:
    """The chain workers combine each run over the ranks (slowest, or mean) before the median:
    the median of per-run maxima, not the maximum of per-rank medians."""
    from spindle.tools.profile import _time_call

    seen: list[float] = []
    runs = iter([0.0, 0.0, 0.0])  # warmup calls are not combined

    def combine(dt: float) -> float:
        seen.append(dt)
        return 10.0 + len(seen)  # stands for the other ranks' times

    assert _time_call(lambda: next(runs, None), 1, 3, combine) == 12.0
    assert len(seen) == 3 and all(dt >= 0 for dt in seen)
