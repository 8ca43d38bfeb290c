"""Checkpoint folders: what makes one complete, what is refused in one line, and export.

A real checkpoint is written in this process (one gloo rank over an in-memory store): the
tiny-multitask-clip workload trained for 2 steps, checkpointed after each.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from spindle.declare.workload import load_workload
from spindle.planner.pipeline import make_plan
from spindle.runtime.checkpoint import Checkpointer, model_shapes
from spindle.runtime.checkpoint_files import (
    CheckpointError,
    find_latest,
    match_model,
    prune,
    read_tensors,
    step_folder,
)
from spindle.runtime.config import ConfigError, RunConfig
from spindle.runtime.executor import TrainingRun
from spindle.tools.cli import main
from spindle.tools.preflight import check_resume

WORKLOAD = "tiny-multitask-clip"


Saved = tuple[Path, dict[str, torch.Tensor], dict[str, tuple[int, ...]]]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    root = tmp_path_factory.mktemp("ckpt")
    w = load_workload(WORKLOAD)
    plan = make_plan(w, "spindle", 1, 1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        run = TrainingRun(w, plan, 0, 1, torch.device("cpu"), RunConfig(dtype="float64"))
        ckpt = Checkpointer(run, root, keep=0)
        for step in range(2):
            run.step(step)
            ckpt.save(step + 1)
        params = {n: p.detach().clone() for n, p in run.local.params.items()}
        shapes = model_shapes(run)
    finally:
        dist.destroy_process_group()
    return root, params, shapes


def _copy(root: Path, tmp_path: Path) -> Path:
    out = tmp_path / "ckpt"
    shutil.copytree(root, out)
    return out


def test_the_latest_complete_checkpoint_holds_the_trained_state(saved: Saved) -> None:
    root, params, _ = saved
    folder, manifest, skipped = find_latest(root)
    assert folder == step_folder(root, 2) and manifest.step == 2 and not skipped
    assert manifest.data_positions == {t.name: 2 for t in load_workload(WORKLOAD).tasks}
    got = read_tensors(folder, "model/")
    assert sorted(got) == sorted(params)
    assert all(torch.equal(got[n], params[n]) for n in params)
    assert any(k.startswith("exp_avg/") for k in read_tensors(folder, "optim/"))


@pytest.mark.parametrize("damage, reason", [
    ("truncate", "truncated"), ("flip", "corrupted"), ("manifest", "did not finish"),
])
def test_a_damaged_checkpoint_is_skipped_for_the_previous_one(
    saved: Saved, tmp_path: Path, damage: str, reason: str
) -> None:
    root = _copy(saved[0], tmp_path)
    newest = step_folder(root, 2)
    data = sorted(newest.glob("__*.distcp"))[0]
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[:-10])
    elif damage == "flip":
        blob = bytearray(data.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        data.write_bytes(bytes(blob))
    else:
        (newest / "spindle.json").unlink()
    folder, manifest, skipped = find_latest(root)
    assert folder == step_folder(root, 1) and manifest.step == 1
    assert len(skipped) == 1 and reason in skipped[0] and str(newest) in skipped[0]


def test_resume_refuses_empty_foreign_and_missing_folders(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="empty, nothing to resume"):
        find_latest(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not a Spindle checkpoint folder"):
        find_latest(tmp_path)
    with pytest.raises(CheckpointError, match="no such folder"):
        find_latest(tmp_path / "nope")
    (tmp_path / "step-00000004").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        find_latest(tmp_path)


def test_a_checkpoint_of_another_model_is_refused_naming_it(saved: Saved) -> None:
    root, _, shapes = saved
    folder, manifest, _ = find_latest(root)
    name = sorted(shapes)[0]
    wrong = {**shapes, name: (3, 3, 3)}
    with pytest.raises(CheckpointError, match=f"differ in shape.*{name} .*vs \\[3, 3, 3\\]"):
        match_model(folder, manifest, WORKLOAD, wrong)
    with pytest.raises(CheckpointError, match="none of its .* parameters"):
        match_model(folder, manifest, WORKLOAD, {"other.weight": (2,)})
    with pytest.raises(CheckpointError, match="of workload 'tiny-multitask-clip', not 'x'"):
        match_model(folder, manifest, "x", shapes)
    with pytest.raises(CheckpointError, match="of workload"):
        check_resume(root, load_workload("tiny-ofasys"))
    assert "carried" in check_resume(root, load_workload(WORKLOAD))


def test_prune_keeps_the_newest(saved: Saved, tmp_path: Path) -> None:
    root = _copy(saved[0], tmp_path)
    (root / ".partial-step-00000003").mkdir()
    prune(root, 1)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]


def test_export_writes_one_state_dict_by_logical_name(saved: Saved, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    root, params, _ = saved
    from safetensors.torch import load_file

    out = tmp_path / "model.safetensors"
    assert main(["export", str(root), "--out", str(out)]) == 0
    got = load_file(out)
    assert sorted(got) == sorted(params) and all(torch.equal(got[n], params[n]) for n in params)
    pt = tmp_path / "text.pt"
    assert main(["export", str(step_folder(root, 2)), "--out", str(pt), "--component",
                 "text"]) == 0
    text = torch.load(pt)
    assert text and all(torch.equal(v, params["text." + k]) for k, v in text.items())
    assert main(["export", str(root), "--out", str(pt), "--component", "nope"]) == 2
    assert main(["export", str(tmp_path / "none"), "--out", str(pt)]) == 2
    err = capsys.readouterr().err
    assert "--component nope: not in" in err and "no such folder" in err


def test_checkpoint_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="--resume: needs --checkpoint-dir"):
        RunConfig(resume=True).check()
    with pytest.raises(ConfigError, match="--keep -1"):
        RunConfig(keep=-1).check()
    with pytest.raises(ConfigError, match="--checkpoint-every -2"):
        RunConfig(checkpoint_every=-2).check()
    assert RunConfig(resume=True, checkpoint_dir="d").to_argv() == ["--checkpoint-dir", "d",
                                                                    "--resume"]


def test_an_export_loads_into_the_users_own_modules(tmp_path: Path) -> None:
    """A user model's checkpoint, exported, loads with ``load_state_dict(strict=True)`` into
    the plain ``nn.ModuleDict`` of its modules (no Spindle involved in the loading)."""
    from spindle.tools.export import consolidated
    from tests.distributed.test_user_models import PLAIN, plain_model

    w = load_workload(PLAIN)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        run = TrainingRun(w, make_plan(w, "spindle", 1, 1), 0, 1, torch.device("cpu"),
                          RunConfig())
        run.step(0)
        Checkpointer(run, tmp_path, keep=0).save(1)
        trained = {n: p.detach().clone() for n, p in run.local.params.items()}
    finally:
        dist.destroy_process_group()
    model = plain_model(w)
    model.load_state_dict(consolidated(find_latest(tmp_path)[0]), strict=True)
    mine = dict(model.named_parameters())
    assert all(torch.equal(mine[n], trained[n]) for n in trained)
