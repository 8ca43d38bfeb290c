"""Plan format: versioned JSON round trip, and validation catches every broken rule."""

import json
from dataclasses import replace

import pytest

from spindle.costs.graph import contract
from spindle.declare.workload import load_workload
from spindle.plan.contract import (
    Plan,
    PlanError,
    Slice,
    Wave,
    plan_metaops,
    transfer_rows,
    validate_plan,
)


def _sequential_plan(name="tiny-multitask-clip", n=2):
    w = load_workload(name)
    g = contract(w)
    waves = []
    for m in g.metaops:
        k = 1 if m.is_loss else n
        waves.append(Wave((Slice(m.id, 0, m.num_layers, tuple(range(k)), 0.1),)))
    return g, Plan("hand", w.name, w.fingerprint(), n, n, "cpu", plan_metaops(g), tuple(waves))


def test_roundtrip(tmp_path):
    g, p = _sequential_plan()
    validate_plan(p, g)
    f = tmp_path / "p.json"
    p.save(f)
    q = Plan.load(f)
    assert q == p
    assert not list(tmp_path.glob(".*tmp"))


def _broken(p, waves):
    return replace(p, waves=tuple(waves))


def test_validation_rules():
    g, p = _sequential_plan()
    w0 = p.waves
    # a layer never scheduled
    with pytest.raises(PlanError, match="never scheduled"):
        validate_plan(_broken(p, w0[:-1]), g)
    # a layer scheduled twice
    with pytest.raises(PlanError, match="scheduled twice|earlier wave"):
        validate_plan(_broken(p, w0 + (w0[0],)), g)
    # device outside N
    bad = Wave((replace(w0[0].slices[0], devices=(0, 5)),))
    with pytest.raises(PlanError, match="outside"):
        validate_plan(_broken(p, (bad,) + w0[1:]), g)
    # groups overlap inside a wave
    s0, s1 = w0[0].slices[0], w0[1].slices[0]
    with pytest.raises(PlanError, match="used twice"):
        validate_plan(_broken(p, (Wave((s0, replace(s1, devices=(1,)))),) + w0[2:]), g)
    # dependency: the loss before its encoders
    loss_wave = w0[2]
    with pytest.raises(PlanError, match="earlier wave"):
        validate_plan(_broken(p, (loss_wave, w0[0], w0[1]) + w0[3:]), g)
    # group size must divide the batch
    m = g.metaops[0]
    odd = Wave((replace(w0[0].slices[0], devices=(0, 1, 2)),))
    p3 = replace(p, num_devices=4)
    with pytest.raises(PlanError, match="divide"):
        validate_plan(_broken(p3, (odd,) + w0[1:]), g)
    assert m.batch % 3 != 0


def test_load_errors(tmp_path):
    with pytest.raises(PlanError, match="not found"):
        Plan.load(tmp_path / "missing.json")
    f = tmp_path / "bad.json"
    f.write_text("{not json")
    with pytest.raises(PlanError, match="malformed JSON"):
        Plan.load(f)
    g, p = _sequential_plan()
    d = p.to_dict()
    d["version"] = 99
    f.write_text(json.dumps(d))
    with pytest.raises(PlanError, match="version 99"):
        Plan.load(f)
    d = p.to_dict()
    del d["waves"]
    f.write_text(json.dumps(d))
    with pytest.raises(PlanError, match="missing field"):
        Plan.load(f)


def test_workload_mismatch():
    g, p = _sequential_plan("tiny-multitask-clip")
    other = contract(load_workload("tiny-ofasys"))
    with pytest.raises(PlanError):
        validate_plan(p, other)


def test_transfer_rows_resplit():
    moves = transfer_rows((0, 1, 2, 3), (4, 5), 8)
    assert moves == [(0, 4, 0, 2), (1, 4, 2, 4), (2, 5, 4, 6), (3, 5, 6, 8)]
    assert sum(b - a for _, _, a, b in transfer_rows((0, 1), (1, 0, 2, 3), 12)) == 12
