"""Plan format: versioned JSON round trip, and validation catches every broken rule."""

import json
from dataclasses import replace

import pytest

from spindle.costs.graph import contract
from spindle.declare.workload import load_workload
from spindle.plan.checks import load_plan, validate_plan
from spindle.plan.contract import Plan, PlanError, Slice, Wave


def _sequential_plan(name="tiny-multitask-clip", n=2):
    w = load_workload(name)
    g = contract(w)
    waves = []
    for m in g.metaops:
        k = 1 if m.is_loss else n
        waves.append(Wave((Slice(m.id, 0, m.num_layers, tuple(range(k)), 0.1),)))
    return g, Plan("hand", w.name, w.fingerprint(), n, n, "cpu", tuple(g.metaops), tuple(waves))


def test_roundtrip(tmp_path):
    g, p = _sequential_plan()
    validate_plan(p, g.metaops)
    f = tmp_path / "p.json"
    p.save(f)
    q = load_plan(f)
    assert q == p
    assert not list(tmp_path.glob(".*tmp"))


def _broken(p, waves):
    return replace(p, waves=tuple(waves))


def test_validation_rules():
    g, p = _sequential_plan()
    w0 = p.waves
    # a layer never scheduled
    with pytest.raises(PlanError, match="never scheduled"):
        validate_plan(_broken(p, w0[:-1]), g.metaops)
    # a layer scheduled twice
    with pytest.raises(PlanError, match="scheduled twice|earlier wave"):
        validate_plan(_broken(p, w0 + (w0[0],)), g.metaops)
    # device outside N
    bad = Wave((replace(w0[0].slices[0], devices=(0, 5)),))
    with pytest.raises(PlanError, match="outside"):
        validate_plan(_broken(p, (bad,) + w0[1:]), g.metaops)
    # groups overlap inside a wave
    s0, s1 = w0[0].slices[0], w0[1].slices[0]
    with pytest.raises(PlanError, match="used twice"):
        validate_plan(_broken(p, (Wave((s0, replace(s1, devices=(1,)))),) + w0[2:]), g.metaops)
    # dependency: the loss before its encoders
    loss_wave = w0[2]
    with pytest.raises(PlanError, match="earlier wave"):
        validate_plan(_broken(p, (loss_wave, w0[0], w0[1]) + w0[3:]), g.metaops)
    # group size must divide the batch
    m = g.metaops[0]
    odd = Wave((replace(w0[0].slices[0], devices=(0, 1, 2)),))
    p3 = replace(p, num_devices=4)
    with pytest.raises(PlanError, match="divide"):
        validate_plan(_broken(p3, (odd,) + w0[1:]), g.metaops)
    assert m.batch % 3 != 0


def test_load_errors(tmp_path):
    with pytest.raises(PlanError, match="missing.json: no such file"):
        load_plan(tmp_path / "missing.json")
    f = tmp_path / "bad.json"
    f.write_text("{not json")
    with pytest.raises(PlanError, match="malformed JSON"):
        load_plan(f)
    g, p = _sequential_plan()
    d = p.to_dict()
    d["version"] = 99
    f.write_text(json.dumps(d))
    with pytest.raises(PlanError, match="version 99"):
        load_plan(f)
    d = p.to_dict()
    del d["waves"]
    f.write_text(json.dumps(d))
    with pytest.raises(PlanError, match="missing field"):
        load_plan(f)


def test_workload_mismatch():
    g, p = _sequential_plan("tiny-multitask-clip")
    other = contract(load_workload("tiny-ofasys"))
    with pytest.raises(PlanError):
        validate_plan(p, other.metaops)


def test_rows_are_resplit_between_layouts():
    from spindle.plan.layout import RowRange, pieces, slice_rows

    g, _ = _sequential_plan()
    m = next(x for x in g.metaops if not x.is_loss and x.batch % 4 == 0)
    got = [(p.src, p.dst, p.rows.start, p.rows.end)
           for p in pieces(slice_rows(m, (0, 1, 2, 3)), slice_rows(m, (4, 5)))]
    b = m.batch
    assert got == [(0, 4, 0, b // 4), (1, 4, b // 4, b // 2), (2, 5, b // 2, 3 * b // 4),
                   (3, 5, 3 * b // 4, b)]
    assert sum(p.rows.size for p in pieces(slice_rows(m, (0, 1)), slice_rows(m, (1, 0, 2, 3)))) == b
    loss = next(x for x in g.metaops if x.is_loss)
    assert slice_rows(loss, (3, 1)) == ((3, RowRange(0, loss.batch)),)


def test_version_1_plans_are_refused_in_one_line(tmp_path):
    g, p = _sequential_plan()
    d = p.to_dict()
    d["version"] = 1
    f = tmp_path / "old.json"
    f.write_text(json.dumps(d))
    with pytest.raises(PlanError, match="version 1 is not supported.*spindle plan"):
        load_plan(f)
