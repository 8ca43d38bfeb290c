"""What a new user could break: hand-edited plans, outputs onto links and devices, sizes without
a bound, late or unchecked arguments, unreadable files.  Each ends in one line, before any
process starts, and destroys nothing."""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
import threading
import time
from pathlib import Path

import pytest
import torch

from spindle.costs.estimator import data_parallel_counts
from spindle.declare.workload import MAX_OPERATORS, WorkloadError, load_workload
from spindle.io import OutputError, discard_pending, write_all, write_atomic
from spindle.plan.contract import PlanError
from spindle.planner.pipeline import make_plan
from spindle.runtime.config import ConfigError
from spindle.runtime.metrics import MetricsWriter
from spindle.tools.cli import main
from spindle.tools.launcher import add_train_arguments, run_train_command
from spindle.tools.train import save_parameters


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("spindle: error: "), err
    return lines[0]


# --- plans checked against the workload before anything starts -----------------------------------


def _edited(tmp_path: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    plan = make_plan(load_workload("tiny-ofasys"), "spindle", 2, 2, "cpu", check_memory=False)
    d = plan.to_dict()
    edit(d)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(d))
    return path


def _drop_a_vit_layer(d: dict) -> None:  # type: ignore[type-arg]
    m = next(m for m in d["metaops"] if m["component"] == "vit")
    m["layers"] = m["layers"][:-1]
    for w in d["waves"]:
        for s in w["slices"]:
            if s["metaop"] == m["id"]:
                s["layer_end"] = min(s["layer_end"], len(m["layers"]))
    d["waves"] = [w for w in d["waves"] if all(s["layer_start"] < s["layer_end"]
                                               for s in w["slices"])]


def _set(field: str, value: object):  # type: ignore[no-untyped-def]
    def edit(d: dict) -> None:  # type: ignore[type-arg]
        d["metaops"][2][field] = value
    return edit


@pytest.mark.parametrize("edit, needle", [
    (_drop_a_vit_layer, "MetaOp 0 ('caption/vit') does not match the workload: 1 layers in the"
                        " plan, 2 in the workload"),
    (_set("batch", 4), "batch 4 in the plan, 8 in the workload"),
    (_set("component", "vit"), "component 'vit' in the plan"),
    (_set("deps", []), "deps () in the plan, (1,) in the workload"),
])
def test_a_hand_edited_plan_is_refused_naming_the_first_difference(
    tmp_path: Path, edit, needle: str,  # type: ignore[no-untyped-def]
) -> None:
    path = _edited(tmp_path, edit)
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(["tiny-ofasys", "--nproc", "2", "--plan", str(path), "--save",
                              str(tmp_path / "out")])
    start = time.monotonic()
    with pytest.raises(PlanError) as info:
        run_train_command(args)
    assert time.monotonic() - start < 10  # before any process starts
    assert str(info.value).startswith(f"{path}:") and needle in str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out" / "params.pt").exists()


# --- outputs never destroy what they replace --------------------------------------------------


def test_a_replaced_file_keeps_its_mode_and_a_new_one_follows_the_umask(tmp_path: Path) -> None:
    old = tmp_path / "plan.json"
    old.write_text("old")
    old.chmod(0o640)
    write_atomic(old, "new")
    assert old.read_text() == "new" and stat.S_IMODE(old.stat().st_mode) == 0o640
    mask = os.umask(0o022)
    try:
        write_atomic(tmp_path / "fresh.json", "x")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "fresh.json").stat().st_mode) == 0o644
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_symbolic_link_is_followed_and_stays(tmp_path: Path) -> None:
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_atomic(link, "new")
    assert link.is_symlink() and target.read_text() == "new"


def test_a_device_is_written_in_place_and_not_replaced() -> None:
    before = os.stat("/dev/null")
    write_atomic(Path("/dev/null"), "x" * 100)
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_ino == before.st_ino


def test_a_fifo_is_written_directly(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    write_atomic(fifo, "through the pipe")
    reader.join(timeout=10)
    assert got == [b"through the pipe"] and stat.S_ISFIFO(fifo.stat().st_mode)


def test_write_errors_name_the_users_path_not_a_temporary_file(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match=r"^/proc/spindle/out\.json: cannot write"):
        write_atomic(Path("/proc/spindle/out.json"), "x")
    with pytest.raises(OutputError, match="is a folder"):
        write_atomic(tmp_path, "x")


def test_writing_several_outputs_is_all_or_nothing(tmp_path: Path) -> None:
    kept = tmp_path / "kept.json"
    kept.write_text("before")
    new = tmp_path / "new.json"
    with pytest.raises(OutputError):
        write_all([(kept, "after"), (new, "n"), (tmp_path, "a folder cannot be written")])
    assert kept.read_text() == "before" and not new.exists()


def test_a_stopped_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    import spindle.io as io

    class Stop(BaseException):
        pass

    real = os.fsync

    def fsync_then_stop(fd: int) -> None:  # the process is stopped in the middle of the write
        real(fd)
        assert io._PENDING  # the write in progress is known
        discard_pending()
        raise Stop

    os.fsync = fsync_then_stop  # type: ignore[assignment]
    try:
        with pytest.raises(Stop):
            write_atomic(tmp_path / "params.pt", b"x" * 1000)
    finally:
        os.fsync = real
    assert list(tmp_path.iterdir()) == []


def test_the_gantt_chart_is_written_in_the_format_its_name_says(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for ext, magic in (("pdf", b"%PDF"), ("svg", b"<?xml"), ("png", b"\x89PNG")):
        out = tmp_path / f"chart.{ext}"
        code, _ = _cli(capsys, "plan", "tiny-ofasys", "--devices", "2", "--hardware", "cpu",
                       "--no-baselines", "--gantt", str(out))
        assert code == 0 and out.read_bytes().startswith(magic)
    code, err = _cli(capsys, "plan", "tiny-ofasys", "--devices", "2", "--hardware", "cpu",
                     "--no-baselines", "--out", str(tmp_path / "p.json"), "--gantt",
                     str(tmp_path / "chart.bmp"))
    assert code == 2 and "--gantt" in _one_error_line(err)
    assert not (tmp_path / "p.json").exists()  # refused before anything was written


def test_a_failing_gantt_chart_leaves_no_plan_behind(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "chart.png").mkdir()  # a folder cannot be written as the chart
    code, err = _cli(capsys, "plan", "tiny-ofasys", "--devices", "2", "--hardware", "cpu",
                     "--no-baselines", "--out", str(tmp_path / "p.json"), "--gantt",
                     str(tmp_path / "chart.png"))
    assert code == 2 and "chart.png" in _one_error_line(err)
    assert not (tmp_path / "p.json").exists()


# --- sizes without a bound -------------------------------------------------------------------


def test_valid_device_counts_are_the_divisors_and_cost_nothing_for_huge_sizes() -> None:
    for batch in (1, 2, 7, 12, 36, 97, 360, 1024):
        for n in (1, 3, 10, 50, 2000):
            assert data_parallel_counts(batch, n) == [k for k in range(1, n + 1) if batch % k == 0]
    start = time.monotonic()
    assert data_parallel_counts(10**12, 10**9)[:4] == [1, 2, 4, 5]
    assert data_parallel_counts(10**18, 8) == [1, 2, 4, 5, 8]
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("field, value, needle", [
    ("devices", "1000000000", "--devices 1000000000: the device count must be 1 to 65536"),
])
def test_a_huge_device_count_is_refused_at_once(
    capsys: pytest.CaptureFixture[str], field: str, value: str, needle: str
) -> None:
    start = time.monotonic()
    code, err = _cli(capsys, "plan", "tiny-ofasys", f"--{field}", value)
    assert code == 2 and needle in _one_error_line(err) and time.monotonic() - start < 10


@pytest.mark.parametrize("path, value, needle", [
    (("tasks", 0, "batch_size"), 10**12, "batch_size: Input should be less than or equal to"),
    (("components", "vit", "layers"), 10**9, "layers: Input should be less than or equal to"),
    (("components", "vit", "layers"), True, "layers: Input should be a valid integer"),
    (("components", "vit", "layers"), 2.0, "layers: Input should be a valid integer"),
])
def test_workload_sizes_and_types_are_strict(
    tmp_path: Path, path: tuple, value: object, needle: str,  # type: ignore[type-arg]
) -> None:
    import yaml

    d = load_workload("tiny-ofasys").to_dict()
    node = d
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    f = tmp_path / "w.yaml"
    f.write_text(yaml.safe_dump(d))
    with pytest.raises(WorkloadError, match=needle):
        load_workload(f)


def test_too_many_operators_are_refused_with_the_limit(tmp_path: Path) -> None:
    import yaml

    d = load_workload("tiny-ofasys").to_dict()
    d["components"]["vit"]["layers"] = 100_000  # within the per-component limit
    for k in range(10):  # but 12 tasks run vit: 1,200,000 operators
        extra = dict(d["tasks"][0], name=f"copy{k}")
        d["tasks"].append(extra)
    f = tmp_path / "w.yaml"
    f.write_text(yaml.safe_dump(d))
    with pytest.raises(WorkloadError, match=f"at most {MAX_OPERATORS} are planned"):
        load_workload(f)


# --- arguments checked before launching -----------------------------------------------------


@pytest.mark.parametrize("option, value, needle", [
    ("--save", "/proc/spindle-out", "--save /proc/spindle-out: cannot write there"),
    ("--metrics", "/proc/spindle/m.jsonl", "--metrics /proc/spindle/m.jsonl: cannot write there"),
])
def test_unwritable_outputs_are_refused_before_training(option: str, value: str,
                                                        needle: str) -> None:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    with pytest.raises(ConfigError, match=needle):
        run_train_command(parser.parse_args(["tiny-ofasys", "--nproc", "2", option, value]))


def test_save_onto_an_existing_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file")
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        run_train_command(parser.parse_args(["tiny-ofasys", "--save", str(tmp_path / "taken")]))


def test_parameters_that_cannot_be_saved_at_the_end_are_kept_elsewhere(tmp_path: Path) -> None:
    params = {"a.weight": torch.ones(3)}
    said = save_parameters(Path("/proc/spindle-out/params.pt"), params)
    assert said is not None and "the trained parameters are in " in said
    rescue = Path(said.rsplit("the trained parameters are in ", 1)[1])
    try:
        assert torch.equal(torch.load(rescue)["a.weight"], params["a.weight"])
    finally:
        rescue.unlink()
    assert save_parameters(tmp_path / "params.pt", params) is None


def test_metrics_are_appended(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"earlier": 1}\n')
    MetricsWriter(path).write({"step": 0})
    assert path.read_text().splitlines() == ['{"earlier": 1}', '{"step": 0}']


# --- files the user gives ---------------------------------------------------------------------


def test_files_that_are_not_text_or_repeat_a_key_are_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    garbage = tmp_path / "w.yaml"
    garbage.write_bytes(b"name: \xff\xfe\n")
    code, err = _cli(capsys, "plan", str(garbage), "--devices", "2")
    assert code == 2 and f"{garbage}: not a UTF-8 text file" in _one_error_line(err)
    profile = tmp_path / "p.json"
    profile.write_bytes(b"\xff")
    code, err = _cli(capsys, "plan", "tiny-ofasys", "--devices", "2", "--profile", str(profile))
    assert code == 2 and f"{profile}: not a UTF-8 text file" in _one_error_line(err)
    twice = tmp_path / "twice.yaml"
    twice.write_text("name: a\nname: b\n")
    code, err = _cli(capsys, "plan", str(twice), "--devices", "2")
    assert code == 2 and "duplicate key 'name' (line 2)" in _one_error_line(err)
    plan = tmp_path / "plan.json"
    plan.write_text('{"version": 2, "version": 2}')
    code, err = _cli(capsys, "show", str(plan))
    assert code == 2 and "duplicate key 'version'" in _one_error_line(err)


def test_a_profile_of_another_workload_is_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from spindle.costs.profile import load_profile, profile_from_dict, write_profile
    from spindle.planner.pipeline import make_context
    from tests.fixtures import valid_profile_dict

    data = valid_profile_dict()
    data["workload_fingerprint"] = "0123456789abcdef"
    path = tmp_path / "other.json"
    write_profile(profile_from_dict(data), path)
    assert load_profile(path).workload == "w"
    with caplog.at_level(logging.INFO):
        ctx = make_context("tiny-qwen-val", 2, 2, "cpu", profile=path)
        for m in ctx.graph.metaops:  # every MetaOp falls back to the hardware model
            ctx.estimator.time(m, 1)
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno >= logging.WARNING and r.name == "spindle.costs.scalability"]
    assert len(warnings) == 1 and "measured on workload 'w', not this one" in warnings[0]


def test_the_plan_summary_names_every_term_of_the_iteration(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["plan", "tiny-ofasys", "--devices", "2", "--hardware", "cpu", "--no-baselines"])
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "simulated iteration" in ln)
    total, terms = line.split("=", 1)
    values = [float(t.split()[-1]) for t in terms.replace("ms", "").split("+")]
    assert code == 0 and "optimizer" in terms
    assert abs(float(total.split()[-2]) - sum(values)) < 0.02
