"""The `spindle` command line: plan output contract, files, and one-line errors."""

import json
import subprocess
import sys

import pytest

from spindle.tools.cli import main

KEYS = {"planner", "devices", "schedule_s", "makespan_s", "relaxed_optimum_s", "lower_bound_s",
        "waves", "planning_time_s", "baselines"}


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_json_contract(capsys, tmp_path):
    plan_file, png = tmp_path / "p.json", tmp_path / "p.png"
    code, out, err = run_cli(capsys, "plan", "multitask-clip-4", "--devices", "8", "--json",
                             "--out", str(plan_file), "--gantt", str(png))
    assert code == 0, err
    d = json.loads(out)
    assert KEYS <= set(d)
    assert set(d["baselines"]) == {"sequential", "optimus", "distmm-mt", "uniform"}
    for b in d["baselines"].values():
        assert b["schedule_s"] > 0 and b["makespan_s"] > 0
    assert d["schedule_s"] >= d["lower_bound_s"] * (1 - 1e-9)
    assert d["makespan_s"] >= d["makespan_lower_bound_s"] * (1 - 1e-9)
    assert d["relaxed_optimum_s"] >= d["lower_bound_s"] * (1 - 1e-9)
    assert plan_file.exists() and png.read_bytes()[:4] == b"\x89PNG"
    code, out, err = run_cli(capsys, "show", str(plan_file))
    assert code == 0 and "waves" in out


def test_plan_summary_readable(capsys):
    code, out, _ = run_cli(capsys, "plan", "tiny-ofasys", "--devices", "4", "--hardware", "cpu")
    assert code == 0
    assert "relaxed optimum" in out and "sequential" in out


def test_workloads_lists_all(capsys):
    code, out, _ = run_cli(capsys, "workloads")
    assert code == 0
    for n in ("multitask-clip-10", "ofasys-7", "qwen-val-3", "tiny-qwen-val"):
        assert n in out


@pytest.mark.parametrize("argv, needle", [
    (["plan", "no-such", "--devices", "8"], "no shipped workload"),
    (["plan", "tiny-ofasys", "--devices", "0"], "must be 1 to 65536"),
    (["plan", "tiny-ofasys", "--devices", "1000000000"], "must be 1 to 65536"),
    (["plan", "tiny-ofasys", "--devices", "4", "--hardware", "nope"], "nope"),
    (["show", "/nonexistent/plan.json"], "no such file"),
])
def test_errors_are_one_line(capsys, argv, needle):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("spindle: error:")


def test_bad_workload_file_writes_nothing(capsys, tmp_path):
    f = tmp_path / "w.yaml"
    f.write_text("name: x\ncomponents:\n  a: {layers: 2, hidden: 8, heads: 3}\ntasks: []\n")
    out_plan = tmp_path / "plan.json"
    code, _, err = run_cli(capsys, "plan", str(f), "--devices", "2", "--out", str(out_plan))
    assert code == 2 and str(f) in err and not out_plan.exists()
    assert list(tmp_path.iterdir()) == [f]


def test_unservable_workload(capsys, tmp_path):
    # a cyclic reference is caught at declaration; an empty-task list is a validation error;
    # and a console entry point exists
    r = subprocess.run([sys.executable, "-m", "spindle.tools.cli", "plan", "tiny-ofasys",
                        "--devices",
                        "-3"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr


