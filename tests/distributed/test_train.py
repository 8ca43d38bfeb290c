"""``spindle.train`` under torchrun (gloo on CPU): bytes sent against the simulator, one-line
failures that stop every rank, the ``spindle train`` launcher, and the demo."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from spindle.declare.workload import load_workload
from spindle.layers import provider_for
from spindle.plan.checks import load_plan
from tests.plans import (
    REPO,
    STOPPED,
    assert_one_line_each,
    demanding_mixed_plan,
    rank_stderr,
    run_train,
    sequential_hand_plan,
)


def test_bytes_sent_equal_the_planners_prediction(tmp_path: Path) -> None:
    from spindle.plan.layout import predicted_send_bytes
    from spindle.planner.pipeline import make_plan

    w = load_workload("tiny-ofasys")
    plans = {"spindle": make_plan(w, "spindle", 4, 4), "mixed": demanding_mixed_plan(w, 4)}
    paths = []
    for label, plan in plans.items():
        plan.save(tmp_path / f"{label}.json")
        paths.append(str(tmp_path / f"{label}.json"))
    metrics = tmp_path / "m.jsonl"
    proc = run_train(4, w.name, ["--plan", *paths, "--steps", "2", "--metrics", str(metrics),
                                 "--no-progress"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [(r["plan"], r["step"]) for r in records] == [
        ("spindle", 0), ("spindle", 1), ("mixed", 0), ("mixed", 1)]
    for r in records:
        want = predicted_send_bytes(plans[r["plan"]], 4)
        assert r["bytes_sent"] == want
        assert want > 0 or r["plan"] == "spindle"  # placement may keep every flow on its device
        assert r["bytes_sent_forward"] == r["bytes_sent_backward"]
        assert r["time_s"] >= max(r["compute_s"], r["send_recv_s"], r["param_sync_s"])
        assert len(r["rank_time_s"]) == 4 and set(r["losses"]) == {t.name for t in w.tasks}
        assert r["param_sync_bytes"] > 0 and r["grad_norm"] > 0


def test_bf16_mixed_halves_the_bytes_and_follows_the_fp32_losses(tmp_path: Path) -> None:
    """``--precision bf16-mixed --reduce-dtype bf16`` on 2 ranks: activations and their
    gradients travel in bfloat16 (half the bytes of float32), the all-reduce too, and the losses
    of 8 steps stay within 2% of the float32 run's."""
    w = load_workload("tiny-ofasys")
    plan = tmp_path / "plan.json"
    demanding_mixed_plan(w, 2).save(plan)
    runs = {}
    for label, extra in (("fp32", []), ("bf16", ["--precision", "bf16-mixed",
                                                 "--reduce-dtype", "bf16"])):
        metrics = tmp_path / f"{label}.jsonl"
        proc = run_train(2, w.name, ["--plan", str(plan), "--steps", "8", "--metrics",
                                     str(metrics), "--no-progress", *extra])
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[label] = [json.loads(line) for line in metrics.read_text().splitlines()]
    for a, b in zip(runs["fp32"], runs["bf16"], strict=True):
        assert abs(b["loss"] - a["loss"]) <= 0.02 * abs(a["loss"]), (a["loss"], b["loss"])
        assert b["param_sync_bytes"] * 2 == a["param_sync_bytes"] > 0
        assert 0 < b["bytes_sent"] * 2 <= a["bytes_sent"] * 1.01


def test_plan_for_another_workload_or_missing_plan_is_one_line(tmp_path: Path) -> None:
    plan_path = tmp_path / "plan.json"
    sequential_hand_plan(load_workload("tiny-ofasys"), 1).save(plan_path)
    for args, want in [
        (["tiny-qwen-val", "--plan", str(plan_path)], "plan is for workload 'tiny-ofasys'"),
        (["tiny-qwen-val", "--plan", str(tmp_path / "nope.json")], "nope.json: no such file"),
        (["tiny-ofasys", "--plan", str(plan_path), "--min-bucket-bytes", "-1"],
         "--min-bucket-bytes -1: must be at least 0"),
    ]:
        proc = subprocess.run([sys.executable, "-m", "spindle.train", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1
        assert_one_line_each([proc.stderr], [want])


def test_plan_for_another_world_size_stops_every_rank(tmp_path: Path) -> None:
    plan_path = tmp_path / "plan.json"
    sequential_hand_plan(load_workload("tiny-ofasys"), 4).save(plan_path)
    proc = run_train(2, "tiny-ofasys", ["--plan", str(plan_path)], timeout=60,
                     log_dir=tmp_path / "logs")
    assert proc.returncode != 0
    # every rank refuses the plan before any collective; torchrun may stop a slower rank first
    reason = "plan is for 4 devices but 2 ranks were launched"
    logs = rank_stderr(tmp_path / "logs", 2)
    assert_one_line_each(logs, [(reason, STOPPED)] * 2)
    assert any(reason in text for text in logs)


def test_a_failing_rank_stops_every_rank_quickly(tmp_path: Path) -> None:
    w = load_workload("tiny-multitask-clip")
    plan_path = tmp_path / "plan.json"
    demanding_mixed_plan(w, 4).save(plan_path)
    start = time.monotonic()
    proc = run_train(4, w.name, ["--plan", str(plan_path), "--steps", "5", "--timeout", "60",
                                 "--no-progress"],
                     timeout=120, log_dir=tmp_path / "logs", env={"FAIL_RANK": "1"},
                     entry="tests.faulty_train")
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert elapsed < 50, f"took {elapsed:.0f} s: something waited for the collective timeout"
    logs = rank_stderr(tmp_path / "logs", 4)
    lost = ("lost contact with another rank", STOPPED)
    assert_one_line_each(logs, [lost, "injected failure at step 1", lost, lost])


def test_spindle_train_plans_launches_and_saves(tmp_path: Path) -> None:
    from spindle.tools.launcher import add_train_arguments, run_train_command

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(["tiny-qwen-val", "--nproc", "2", "--steps", "2", "--save",
                              str(tmp_path), "--save-plan", str(tmp_path / "plan.json"),
                              "--no-progress"])
    assert run_train_command(args) == 0
    params = torch.load(tmp_path / "params.pt")
    assert sorted(params) == provider_for(load_workload("tiny-qwen-val")).parameter_names()
    assert load_plan(tmp_path / "plan.json").planner == "spindle"

    wrong = parser.parse_args(["tiny-qwen-val", "--nproc", "4", "--plan",
                               str(tmp_path / "plan.json")])
    with pytest.raises(ValueError, match="plan is for 2 devices"):
        run_train_command(wrong)


def test_a_rank_that_stops_responding_times_out_on_every_rank(tmp_path: Path) -> None:
    plan_path = tmp_path / "plan.json"
    sequential_hand_plan(load_workload("tiny-ofasys"), 2).save(plan_path)
    start = time.monotonic()
    proc = run_train(2, "tiny-ofasys", ["--plan", str(plan_path), "--steps", "3", "--timeout",
                                        "5", "--no-progress"], timeout=120,
                     log_dir=tmp_path / "logs",
                     env={"FAIL_RANK": "1", "FAIL_MODE": "hang"}, entry="tests.faulty_train")
    assert proc.returncode != 0
    assert time.monotonic() - start < 60
    assert_one_line_each(rank_stderr(tmp_path / "logs", 2),
                         ["lost contact with another rank", STOPPED])


def test_demo_trains_both_plans_side_by_side():
    """The README's demo: plan, train Spindle's and sequential's plans on 2 processes, and end
    with both measured iteration times and the same final loss (the plans compute the same)."""
    r = subprocess.run([sys.executable, "-m", "spindle.tools.cli", "demo", "--steps", "6"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()
            if line.startswith(("spindle ", "sequential "))}
    assert set(rows) == {"spindle", "sequential"}
    assert float(rows["spindle"][2]) > 0 and float(rows["sequential"][2]) > 0
    assert rows["spindle"][3] == rows["sequential"][3]  # same final loss, printed to 4 places
    assert "measured speedup of Spindle over sequential" in r.stdout


