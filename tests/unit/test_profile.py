"""Tests of ``spindle profile``: the measured blocks, the collective fit, the profile file."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from spindle.costs.graph import contract
from spindle.costs.profile import ProfileError, load_profile
from spindle.costs.scalability import make_estimator, signature
from spindle.declare.workload import load_workload
from spindle.layers import provider_for
from spindle.tools.machine import fit_collective, fit_optimizer, fit_p2p
from spindle.tools.measure import (
    default_threads,
    time_call,
    time_chain,
    time_metaop,
)
from spindle.tools.profile import (
    block_flops,
    run_profile_command,
)
from tests.fixtures import profile_args, valid_profile_dict


def test_every_block_kind_times_positive() -> None:
    ops = [m for name in ("tiny-ofasys", "tiny-qwen-val")
           for m in contract(load_workload(name)).metaops]
    kinds = {}
    for op in ops:
        kinds.setdefault(op.kind, op)
    assert set(kinds) == {"encoder", "decoder", "llm"}
    for op in kinds.values():
        assert 0 < time_metaop(op, 2, warmup=1, repeats=2) < 1.0








def test_time_chain_runs_the_runtime_operators_of_every_kind() -> None:

    seen = set()
    for name in ("tiny-multitask-clip", "tiny-ofasys", "tiny-qwen-val"):
        w = load_workload(name)
        for op in contract(w).metaops:
            if op.kind in seen:
                continue
            seen.add(op.kind)
            n = 1 if op.is_loss else 2
            assert 0 < time_chain(provider_for(w), op, n, warmup=1, repeats=2) < 1.0
    assert seen == {"encoder", "decoder", "llm", "contrastive"}


def test_estimator_uses_a_chain_entry_as_is_and_scales_a_block_entry(tmp_path: Path) -> None:
    op = next(o for o in contract(load_workload("tiny-multitask-clip")).metaops
              if signature(o) == ("encoder", 32, 4, 128, 9, 0, 8))
    assert op.cost.flops_per_layer > block_flops(op)  # light parts spread over the chain
    for measurement, version, flops, want in (
        ("chain", 3, op.cost.flops_per_layer, 1e-3),
        ("block", 2, block_flops(op), 1e-3 * op.cost.flops_per_layer / block_flops(op)),
    ):
        data = valid_profile_dict()
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
    data = valid_profile_dict()
    data["schema_version"] = 2
    data["entries"][0]["measurement"] = "chain"
    p = tmp_path / "v2chain.json"
    p.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="schema_version 3"):
        load_profile(p)


def test_default_threads_follow_torchrun() -> None:

    assert default_threads(2, {}) == 1
    assert default_threads(4, {"OMP_NUM_THREADS": "3"}) == 3
    assert default_threads(1, {}) >= 1




def test_guard_refuses_full_size_workloads(
    capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    t0 = time.perf_counter()
    rc = run_profile_command(
        profile_args("multitask-clip-10", "--devices", "8", "--out", str(tmp_path / "p.json"),
              "--max-seconds", "30", "--no-progress")
    )
    assert rc == 2
    assert time.perf_counter() - t0 < 5  # refused before measuring anything
    err = capsys.readouterr().err.strip()
    assert "--max-seconds" in err and "\n" not in err
    assert not (tmp_path / "p.json").exists()


def test_bad_workload_is_reported(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    args = profile_args("no-such-workload", "--out", str(tmp_path / "p.json"))
    assert run_profile_command(args) == 2
    assert "no-such-workload" in capsys.readouterr().err


def test_fit_collective_recovers_latency_and_bandwidth() -> None:
    lat, bw = 2e-4, 1.5e9
    samples = [(b, lat + b / bw) for b in (4096, 65536, 1 << 20, 1 << 22)]  # 2 processes: factor 1
    fit = fit_collective(samples, processes=2)
    assert fit.latency_s == pytest.approx(lat, rel=1e-3)
    assert fit.bandwidth == pytest.approx(bw, rel=1e-3)
    assert fit.allreduce_time(1e6, 1) == 0.0
    assert fit.allreduce_time(1e6, 4) == pytest.approx(lat + 1.5 * 1e6 / bw)


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda d: d.update(schema_version=99), "schema_version"),
        (lambda d: d["entries"][0]["points"][0].update(compute_s=-1.0),
         "entries.0.points.0.compute_s"),
        (lambda d: d["entries"][0]["points"][1].update(n=1), "duplicate n"),
        (lambda d: d.pop("collective"), "collective"),
        (lambda d: d["entries"][0]["signature"].update(hidden="big"), "signature.hidden"),
        (lambda d: d.update(extra=1), "extra"),
    ],
)
def test_load_profile_errors_are_one_line(tmp_path: Path, mutate: Any, needle: str) -> None:
    data = valid_profile_dict()
    mutate(data)
    p = tmp_path / "prof.json"
    p.write_text(json.dumps(data))
    with pytest.raises(ProfileError) as e:
        load_profile(p)
    msg = str(e.value)
    assert "\n" not in msg and needle in msg and "prof.json" in msg, msg


def test_load_profile_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="missing.json: no such file"):
        load_profile(tmp_path / "missing.json")
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(ProfileError, match="malformed JSON"):
        load_profile(p)
    p.write_text(json.dumps(valid_profile_dict()))
    prof = load_profile(p)
    assert len(prof.entries) == 1 and issubclass(ProfileError, ValueError)




def test_version_1_profile_still_loads_without_the_new_measurements(tmp_path: Path) -> None:
    data = valid_profile_dict()
    data["schema_version"] = 1
    p = tmp_path / "v1.json"
    p.write_text(json.dumps(data))
    prof = load_profile(p)
    assert prof.p2p is None and prof.optimizer is None and prof.schema_version == 1


def test_version_2_profile_round_trips_the_new_measurements(tmp_path: Path) -> None:
    data = valid_profile_dict()
    data["p2p"] = {"backend": "gloo", "latency_s": 2e-4, "bandwidth_Bps": 2e9,
                   "samples": [{"bytes": 4096, "seconds": 2e-4},
                               {"bytes": 1 << 20, "seconds": 7e-4}]}
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

    opt = fit_optimizer([(n, 1e-3 + 3e-8 * n) for n in (10_000, 20_000, 40_000, 80_000)])
    assert opt.fixed_s == pytest.approx(1e-3, rel=1e-3)
    assert opt.per_param_s == pytest.approx(3e-8, rel=1e-3)
    p2p = fit_p2p([(b, 1.5e-4 + b / 2e9) for b in (4096, 65536, 1 << 20)])
    assert p2p.latency_s == pytest.approx(1.5e-4, rel=1e-3)
    assert p2p.bandwidth == pytest.approx(2e9, rel=1e-3)




def test_runtime_calibration_round_trips_and_is_validated(tmp_path: Path) -> None:
    from spindle.costs.profile import write_profile

    data = valid_profile_dict()
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

    seen: list[float] = []
    runs = iter([0.0, 0.0, 0.0])  # warmup calls are not combined

    def combine(dt: float) -> float:
        seen.append(dt)
        return 10.0 + len(seen)  # stands for the other ranks' times

    assert time_call(lambda: next(runs, None), 1, 3, combine) == 12.0
    assert len(seen) == 3 and all(dt >= 0 for dt in seen)
