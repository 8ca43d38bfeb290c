"""Checkpoints: a run saved and resumed on another plan and world size trains exactly like one
run straight through; a changed task set carries what remains; a killed rank is recovered.

* resume: for every tiny workload, 3 steps on one world size and planner, then ``--resume`` to
  step 6 on another (1 -> 3, 4 -> 2, 2 -> 1 ranks); parameters and AdamW state equal the
  single-process reference trained 6 steps (float64, 1e-9);
* task set: tasks {A, B} for 3 steps, then {B, C} resumed for 3 more; the parameters of the
  components that remain continue exactly like a plain loop that carries them (and their AdamW
  state) over, the new task's component starts fresh at data position 0, and the removed
  component stays in the checkpoint;
* recovery: ``spindle train --max-restarts 1`` with one rank killed (SIGKILL) from outside in the
  middle of the run, and a rank that kills itself in the middle of writing a checkpoint; each
  job finishes with the parameters of an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from spindle.declare.workload import load_workload
from spindle.planner.pipeline import make_plan
from spindle.runtime.checkpoint_files import OPTIM, find_latest, read_tensors
from spindle.runtime.reference import ReferenceModel, train_reference
from tests.plans import REPO, SEED, assert_matches, demanding_mixed_plan, run_train

TOTAL = 6
COMMON = ["--seed", str(SEED), "--dtype", "float64", "--no-progress", "--timeout", "60"]


def _optimizer_state(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in read_tensors(folder, OPTIM).items():
        state, _, name = key.partition("/")
        out.setdefault(name, {})[state] = value
    return out


def _train(tmp_path: Path, workload: str, nproc: int, plan_label: str, steps: int,
           ckpt: Path, extra: list[str]) -> subprocess.CompletedProcess[str]:
    w = load_workload(workload)
    plan = (demanding_mixed_plan(w, nproc) if plan_label == "mixed"
            else make_plan(w, plan_label, nproc, nproc))
    path = tmp_path / f"{plan_label}-{nproc}.json"
    plan.save(path)
    proc = run_train(nproc, workload, ["--plan", str(path), "--steps", str(steps),
                                       "--checkpoint-dir", str(ckpt), *COMMON, *extra])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("workload, first, second, zero", [
    ("tiny-multitask-clip", (1, "spindle"), (3, "optimus"), ("0", "0")),
    ("tiny-ofasys", (4, "sequential"), (2, "spindle"), ("2", "0")),
    ("tiny-qwen-val", (2, "spindle"), (1, "mixed"), ("0", "0")),
    ("tiny-qwen-val", (2, "mixed"), (4, "spindle"), ("1", "2")),
])
def test_resume_on_another_plan_and_world_size_equals_one_run(
    tmp_path: Path, workload: str, first: tuple[int, str], second: tuple[int, str],
    zero: tuple[str, str],
) -> None:
    """ZeRO's sharded AdamW state is saved whole, by name: it resumes on any stage too."""
    ckpt = tmp_path / "ckpt"
    _train(tmp_path, workload, *first, 3, ckpt, ["--checkpoint-every", "2", "--zero", zero[0]])
    proc = _train(tmp_path, workload, *second, TOTAL, ckpt, ["--resume", "--save",
                                                             str(tmp_path / "out"),
                                                             "--zero", zero[1]])
    assert "resumed from" in proc.stderr and "at step 3" in proc.stderr, proc.stderr[-2000:]
    want_state: dict[str, dict[str, torch.Tensor]] = {}
    want = train_reference(load_workload(workload), SEED, TOTAL, dtype=torch.float64,
                           optimizer_state=want_state)
    label = f"{workload} {first} -> {second}, ZeRO {zero}"
    assert_matches(torch.load(tmp_path / "out" / "params.pt"), want, 1e-9, 1e-9, label)
    folder, manifest, _ = find_latest(ckpt)
    assert manifest.step == TOTAL and folder.name == "step-00000006"
    got_state = _optimizer_state(folder)
    assert sorted(got_state) == sorted(want_state), label
    for name, state in want_state.items():
        for key, value in state.items():
            assert torch.allclose(got_state[name][key].to(value.dtype), value, atol=1e-9,
                                  rtol=1e-9), f"{label}: {key} of {name}"
    # the parameters read back from the checkpoint are the saved ones
    assert_matches(read_tensors(folder, "model/"), want, 1e-9, 1e-9, label + " (checkpoint)")


# --- a task set that changes ---------------------------------------------------------------------


def _task_subset(tmp_path: Path, tasks: list[str], label: str) -> str:
    """tiny-multitask-clip with only ``tasks`` (and the components they use), same name."""
    src = yaml.safe_load((REPO / "spindle/declare/workloads/tiny-multitask-clip.yaml").read_text())
    src["tasks"] = [t for t in src["tasks"] if t["name"] in tasks]
    used = {st["component"] for t in src["tasks"] for st in t["stages"]}
    src["components"] = {k: v for k, v in src["components"].items() if k in used}
    path = tmp_path / f"{label}.yaml"
    path.write_text(yaml.safe_dump(src))
    return str(path)


def _reference_two_phases(ab: str, bc: str) -> dict[str, torch.Tensor]:
    """A plain loop: {A, B} for 3 steps, then {B, C} for 3 more with the shared parameters and
    their AdamW state carried over by name; C's data starts at position 0."""
    first = ReferenceModel(load_workload(ab), SEED, torch.float64)
    p1 = first.named_logical_parameters()
    opt1 = torch.optim.AdamW(list(p1.values()), lr=1e-3, weight_decay=0.01)
    second = ReferenceModel(load_workload(bc), SEED, torch.float64)
    p2 = second.named_logical_parameters()
    opt2 = torch.optim.AdamW(list(p2.values()), lr=1e-3, weight_decay=0.01)
    start = {t.name: 0 for t in first.workload.tasks}
    for model, opt, params, steps in ((first, opt1, p1, range(3)), (second, opt2, p2,
                                                                     range(3, 6))):
        if model is second:
            for name, p in p2.items():
                if name in p1:
                    with torch.no_grad():
                        p.copy_(p1[name])
                    opt2.state[p] = {k: v.clone() for k, v in opt1.state[p1[name]].items()}
        for step in steps:
            opt.zero_grad()
            losses = [model.task_loss(t.name, step - (0 if t.name in start else 3))
                      for t in model.workload.tasks]
            torch.stack(losses).sum().backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
            opt.step()
    return {n: p.detach().clone() for n, p in p2.items()}


def test_task_set_change_carries_what_remains(tmp_path: Path) -> None:
    ab = _task_subset(tmp_path, ["vision-text", "audio-text"], "ab")
    bc = _task_subset(tmp_path, ["audio-text", "imu-text"], "bc")
    ckpt = tmp_path / "ckpt"
    _train(tmp_path, ab, 2, "spindle", 3, ckpt, [])
    before = read_tensors(find_latest(ckpt)[0], "model/")
    proc = _train(tmp_path, bc, 3, "optimus", TOTAL, ckpt, ["--resume", "--save",
                                                            str(tmp_path / "out")])
    line = next(ln for ln in proc.stderr.splitlines() if "resumed from" in ln)
    assert "carried audio, loss.audio-text, text (" in line, line
    assert "added imu, loss.imu-text (" in line, line
    assert "set aside loss.vision-text, vision (" in line, line
    want = _reference_two_phases(ab, bc)
    assert_matches(torch.load(tmp_path / "out" / "params.pt"), want, 1e-9, 1e-9, "{A,B}->{B,C}")
    # the removed component is still in the newest checkpoint, as it was trained
    after = read_tensors(find_latest(ckpt)[0], "model/")
    vision = [n for n in before if n.startswith("vision.")]
    assert vision and all(torch.equal(after[n], before[n]) for n in vision)
    # and so is its optimizer state
    assert any(k.endswith("/" + vision[0]) for k in read_tensors(find_latest(ckpt)[0], OPTIM))


# --- recovery from a dead rank --------------------------------------------------------------


def _rank_pids(tag: str) -> dict[int, int]:
    """pid of every training rank whose environment carries ``tag``, by LOCAL_RANK."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if f"SPINDLE_TEST_TAG={tag}".encode() in env and b"spindle.train" in cmd \
                and b"torch.distributed.run" not in cmd:
            for item in env:
                if item.startswith(b"LOCAL_RANK="):
                    found[int(item.split(b"=")[1])] = int(entry.name)
    return found


def test_max_restarts_recovers_from_a_killed_rank(tmp_path: Path) -> None:
    ckpt, out, tag = tmp_path / "ckpt", tmp_path / "out", f"kill-{os.getpid()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "spindle", "train", "tiny-ofasys", "--nproc", "2", "--steps",
         "40", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "5", "--max-restarts", "1",
         "--save", str(out), *COMMON],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "SPINDLE_TEST_TAG": tag},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (ckpt / "step-00000010").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    pids = _rank_pids(tag)
    assert 1 in pids, pids
    os.kill(pids[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "restart 1: resuming" in err, err[-2000:]
    want = train_reference(load_workload("tiny-ofasys"), SEED, 40, dtype=torch.float64)
    assert_matches(torch.load(out / "params.pt"), want, 1e-9, 1e-9, "killed at step >= 10")


def test_a_rank_killed_while_writing_a_checkpoint_is_recovered(tmp_path: Path) -> None:
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    plan = tmp_path / "plan.json"
    make_plan(load_workload("tiny-qwen-val"), "spindle", 2, 2).save(plan)
    proc = run_train(2, "tiny-qwen-val", [
        "--plan", str(plan), "--steps", "6", "--checkpoint-dir", str(ckpt),
        "--checkpoint-every", "2", "--save", str(out), *COMMON],
        entry="tests.faulty_train", env={"KILL_IN_SAVE_STEP": "4", "KILL_RANK": "1"},
        extra=["--max-restarts=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "restart 1: resuming" in proc.stderr
    assert "at step 2" in proc.stderr, proc.stderr[-2000:]  # step 4's checkpoint never finished
    want = train_reference(load_workload("tiny-qwen-val"), SEED, 6, dtype=torch.float64)
    assert_matches(torch.load(out / "params.pt"), want, 1e-9, 1e-9, "killed while saving")
    assert not list(ckpt.glob(".partial-*"))
