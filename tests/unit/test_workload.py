"""Workload declaration: the Python API and files are equal, and bad input is one clear line."""

from pathlib import Path

import pytest

from spindle.declare.workload import (
    Component,
    InputAdapter,
    Loss,
    Stage,
    Task,
    Workload,
    WorkloadError,
    load_workload,
    shipped_workloads,
    workload_from_dict,
)
from spindle.layers import provider_for

EXPECTED = {"multitask-clip-4", "multitask-clip-7", "multitask-clip-10", "ofasys-4", "ofasys-7",
            "qwen-val-3", "tiny-multitask-clip", "tiny-ofasys", "tiny-qwen-val",
            "small-multitask-clip", "small-ofasys", "small-qwen-val"}


def test_shipped_names():
    assert set(shipped_workloads()) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_load_and_roundtrip(name):
    w = load_workload(name)
    again = workload_from_dict(w.to_dict())
    assert again == w and again.fingerprint() == w.fingerprint()


def test_published_sizes():
    # ImageBind-Huge encoders ~1.2B, OFA-large-size LM + adaptors ~0.66B, QWen-VAL ~9-10B
    assert 1.1e9 < provider_for(load_workload("multitask-clip-10")).num_parameters() < 1.3e9
    assert 0.55e9 < provider_for(load_workload("ofasys-7")).num_parameters() < 0.75e9
    assert 9.0e9 < provider_for(load_workload("qwen-val-3")).num_parameters() < 10.5e9
    assert len(load_workload("multitask-clip-7").tasks) == 7
    assert len(load_workload("ofasys-4").tasks) == 4


def test_tiny_batches_divisible():
    for name in ("tiny-multitask-clip", "tiny-ofasys", "tiny-qwen-val"):
        for t in load_workload(name).tasks:
            assert t.batch_size % 4 == 0


def test_python_api_equals_file(tmp_path: Path):
    w = Workload(
        name="mine",
        components={
            "img": Component(layers=2, hidden=16, heads=2, output_dim=8,
                             input=InputAdapter(type="features", dim=4)),
            "txt": Component(layers=1, hidden=16, heads=2, output_dim=8,
                             input=InputAdapter(type="tokens", vocab=10)),
        },
        tasks=(Task(name="pair", batch_size=4,
                    stages=(Stage(name="i", component="img", tokens=3),
                            Stage(name="t", component="txt", tokens=5)),
                    loss=Loss(type="contrastive", inputs=("i", "t"))),),
    )
    import yaml
    f = tmp_path / "mine.yaml"
    f.write_text(yaml.safe_dump(w.to_dict()))
    assert load_workload(f) == w
    import tomllib  # noqa: F401  (TOML is read too)
    t = tmp_path / "mine.toml"
    t.write_text(_to_toml(w.to_dict()))
    assert load_workload(t) == w


def _to_toml(d):
    # tiny TOML writer sufficient for this test's nesting
    import json
    lines = [f'name = "{d["name"]}"']
    for cname, c in d["components"].items():
        lines.append(f"[components.{cname}]")
        for k, v in c.items():
            if isinstance(v, dict):
                inner = ", ".join(f"{a} = {json.dumps(b)}" for a, b in v.items())
                lines.append(f"{k} = {{ {inner} }}")
            else:
                lines.append(f"{k} = {json.dumps(v)}")
    for t in d["tasks"]:
        lines.append("[[tasks]]")
        lines.append(f'name = "{t["name"]}"')
        lines.append(f'batch_size = {t["batch_size"]}')
        inner = ", ".join(f"{a} = {json.dumps(b)}" for a, b in t["loss"].items())
        lines.append(f"loss = {{ {inner} }}")
        for s in t["stages"]:
            lines.append("[[tasks.stages]]")
            for k, v in s.items():
                lines.append(f"{k} = {json.dumps(v)}")
    return "\n".join(lines) + "\n"


def _base():
    return load_workload("tiny-multitask-clip").to_dict()


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d["tasks"][0]["stages"][0].update(component="nope"), "unknown component 'nope'"),
    (lambda d: d["components"]["vision"].update(layers=0), "components.vision.layers"),
    (lambda d: d["components"]["vision"].update(hidden=-3), "components.vision.hidden"),
    (lambda d: d["tasks"][0].update(batch_size=0), "tasks.0.batch_size"),
    (lambda d: d["tasks"][0]["loss"].update(inputs=["vision", "ghost"]), "'ghost'"),
    (lambda d: d["tasks"][0]["stages"][0].update(inputs=["text"]), "cycle or out-of-order"),
    (lambda d: d["tasks"][0]["stages"][0].update(inputs=["vision"]), "cycle"),
    (lambda d: d["tasks"][0].update(extra=1), "extra"),
    (lambda d: d["tasks"].append(dict(d["tasks"][0])), "duplicate task name"),
])
def test_bad_input_is_one_line(mutate, needle):
    d = _base()
    mutate(d)
    with pytest.raises(WorkloadError) as e:
        workload_from_dict(d, "w.yaml")
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and msg.startswith("w.yaml")


def test_malformed_and_missing_files(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("components: [unclosed\n")
    with pytest.raises(WorkloadError, match="malformed"):
        load_workload(bad)
    with pytest.raises(WorkloadError, match="no shipped workload"):
        load_workload("no-such-workload")
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- 1\n- 2\n")
    with pytest.raises(WorkloadError, match="mapping"):
        load_workload(notmap)
