"""User models: ``.py`` workloads, user stacks, datasets, losses and frozen parts, checked on one
process (the multi-rank equivalence is tests/distributed/test_user_models.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from spindle.costs.graph import contract
from spindle.declare.datasets import collate, item_indices
from spindle.declare.modules import ModuleStack
from spindle.declare.workload import Loss, Stage, Task, Workload, WorkloadError, load_workload
from spindle.layers import provider_for
from spindle.layers.provider import LayerError
from spindle.layers.rowwise import check_rows
from spindle.layers.user import UserProvider
from spindle.runtime.data import DatasetData
from tests.plans import REPO

PLAIN = REPO / "tests" / "workloads" / "plain_modules.py"
FROZEN = REPO / "tests" / "workloads" / "plain_modules_frozen.py"


class Rows(torch.utils.data.Dataset):
    """Item i: features x [4] and a target y [2], from i alone."""

    def __init__(self, n: int = 8, bad: int | None = None) -> None:
        self.n, self.bad = n, bad

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        x = torch.randn(4, generator=g)
        return {"x": x.double() if i == self.bad else x, "y": torch.randn(2, generator=g)}


def mse(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return ((outputs["s"] - batch["y"]) ** 2).mean()


def one_stage(layer=lambda i: nn.Linear(4, 4), layers: int = 2, post=lambda: nn.Linear(4, 2),
              loss=mse, dataset=None, coupled: bool = False, frozen: bool = False,
              fields: tuple[str, ...] = ("x",), batch: int = 4) -> Workload:
    return Workload(name="one", components={
        "c": ModuleStack(layers=layers, layer=layer, post=post, frozen=frozen)},
        tasks=(Task(name="t", batch_size=batch, dataset=dataset or Rows(),
                    stages=(Stage(name="s", component="c", fields=fields),),
                    loss=Loss(type="custom", inputs=("s",), fields=("y",), fn=loss,
                              coupled=coupled)),))


# --- declaring ---------------------------------------------------------------------------------


@pytest.mark.parametrize("body, needle", [
    ("import not_a_module_anywhere\n", "fails to import: ModuleNotFoundError"),
    ("x = 1\n", "defines no workload() function"),
    ("def workload():\n    raise RuntimeError('boom')\n", "workload() fails: RuntimeError: boom"),
    ("def workload():\n    return 3\n", "returned int, not a spindle Workload"),
    ("from spindle.declare.workload import Workload\n"
     "def workload():\n    return Workload(name='w', components={}, tasks=())\n", "workload()"),
])
def test_a_bad_python_workload_is_one_line_naming_the_file(tmp_path: Path, body: str,
                                                            needle: str) -> None:
    path = tmp_path / "model.py"
    path.write_text(body)
    with pytest.raises(WorkloadError) as err:
        load_workload(path)
    assert needle in str(err.value) and str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_spindle_plan_on_a_bad_python_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "model.py"
    path.write_text("raise ValueError('no')\n")
    proc = subprocess.run([sys.executable, "-m", "spindle", "plan", str(path), "--devices", "2"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "fails to import: ValueError: no" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("kwargs, needle", [
    ({"layer": [nn.Linear(2, 2)], "layers": 3}, "layers 3 but a list of 1 modules"),
    ({"layer": [nn.Linear(2, 2), "x"]}, "layer 1 of the list is not an nn.Module"),
    ({"layer": 5, "layers": 1}, "'layer' must be a factory"),
    ({"layer": lambda i: nn.Linear(2, 2)}, "at least one layer"),
    ({"layer": lambda i: nn.Linear(2, 2), "layers": 1, "pre": 3}, "'pre' must be an nn.Module"),
])
def test_module_stack_refuses_bad_declarations(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        ModuleStack(**kwargs)


def test_a_python_workload_plans_and_keeps_shipped_fingerprints() -> None:
    w = load_workload(PLAIN)
    assert w.fingerprint() == load_workload(PLAIN).fingerprint()  # the same in every process
    assert w.fingerprint() != load_workload(FROZEN).fingerprint()
    assert load_workload("tiny-ofasys").fingerprint() == "609a92649682204f"
    names = provider_for(w).parameter_names()
    assert "vision.layers.1.attn.in_proj_weight" in names and "loss.match.scale" in names
    assert "fusion.pre.image.weight" in names and "fusion.post.out.bias" in names


# --- data ----------------------------------------------------------------------------------------


def test_batches_wrap_around_and_shuffle_per_epoch() -> None:
    task = one_stage(dataset=Rows(6)).tasks[0]
    assert item_indices(task, 0, 0, 0, 4) == [0, 1, 2, 3]
    assert item_indices(task, 0, 1, 0, 4) == [4, 5, 0, 1]
    assert item_indices(task, 0, 1, 2, 4) == [0, 1]  # rows [2, 4) of step 1
    shuffled = task.model_copy(update={"shuffle": True})
    epoch0 = item_indices(shuffled, 3, 0, 0, 4) + item_indices(shuffled, 3, 1, 0, 2)
    epoch1 = item_indices(shuffled, 3, 1, 2, 4) + item_indices(shuffled, 3, 2, 0, 4)
    assert sorted(epoch0) == list(range(6)) and sorted(epoch1) == list(range(6))
    assert epoch0 != epoch1 or epoch0 != list(range(6))
    assert item_indices(shuffled, 3, 0, 0, 4) == item_indices(shuffled, 3, 0, 0, 4)
    assert item_indices(shuffled, 4, 0, 0, 6) != item_indices(shuffled, 3, 0, 0, 6)


def test_each_rank_loads_its_rows_through_a_dataloader() -> None:
    task = one_stage(dataset=Rows(10)).tasks[0]
    data = DatasetData(task, seed=0, workers=1)
    full = collate(task, [task.dataset[i] for i in range(4, 8)])
    for step in (1, 2):  # step 1: items 4..7; the stream goes on to step 2 (8, 9, 0, 1)
        got = data.rows(step, 2, 4)
        want = collate(task, [task.dataset[i] for i in item_indices(task, 0, step, 2, 4)])
        assert torch.equal(got["x"], want["x"])
    assert torch.equal(DatasetData(task, 0).rows(1, 0, 4)["y"], full["y"])


def test_a_dataset_item_of_the_wrong_dtype_is_one_line() -> None:
    task = one_stage(dataset=Rows(8, bad=5)).tasks[0]
    with pytest.raises(WorkloadError, match=r"task 't': field 'x' of dataset item 5 is"
                                            r" torch.float64 \[4\], item 4's is torch.float32"):
        DatasetData(task, 0).rows(1, 0, 4)
    with pytest.raises(WorkloadError, match=r"field 'x' of the rows from item 5 is torch.float64"):
        DatasetData(task, 0).rows(1, 1, 2)


def test_a_stage_whose_items_lack_its_input_is_one_line() -> None:
    w = one_stage(fields=("image",))
    with pytest.raises(LayerError, match=r"stage 's': dataset items have no field 'image'"
                                         r" \(they have: x, y\)"):
        provider_for(w).check_runnable()


# --- modules -------------------------------------------------------------------------------------


def test_a_layer_that_does_not_chain_names_the_component() -> None:
    w = one_stage(layer=lambda i: nn.Linear(4, 4) if i == 0 else nn.Linear(3, 4))
    with pytest.raises(LayerError) as err:
        provider_for(w).check_runnable()
    text = str(err.value)
    assert "stage 's': c.layers.1 on the output of layer 0: fails" in text and "\n" not in text


def test_a_loss_that_is_not_a_scalar_is_one_line() -> None:
    w = one_stage(loss=lambda outputs, batch: (outputs["s"] - batch["y"]) ** 2)
    with pytest.raises(LayerError, match=r"task 't': the loss returned a tensor of shape \[2, 2\],"
                                         " not a scalar"):
        provider_for(w).check_runnable()


def split_all(w: Workload) -> list:
    return [(m.layers[0], 2) for m in contract(w).metaops] + \
        [(ref, 2) for m in contract(w).metaops for ref in m.layers[1:]]


def test_a_layer_that_mixes_rows_is_found_where_the_plan_splits_it() -> None:
    w = one_stage(layer=lambda i: nn.BatchNorm1d(4) if i == 1 else nn.Linear(4, 4))
    provider = provider_for(w)
    assert isinstance(provider, UserProvider)
    with pytest.raises(LayerError, match=r"component 'c': module 'c.layers.1' is not row-wise in"
                                         r" the batch .*BatchNorm.* over 2 devices"):
        check_rows(provider, split_all(w))
    check_rows(provider, [])  # not split: nothing to say
    ok = one_stage(layer=lambda i: nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)))
    check_rows(provider_for(ok), split_all(ok))  # random: cannot be told, passed over


def test_a_batch_coupled_loss_declared_row_wise_is_found() -> None:
    def centred(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        s = outputs["s"]
        return ((s - s.mean(0)) ** 2).mean()

    w = one_stage(loss=centred)
    with pytest.raises(LayerError, match="task 't': the loss is not a mean over rows"):
        check_rows(provider_for(w), split_all(w))
    coupled = one_stage(loss=centred, coupled=True)
    assert contract(coupled).metaops[-1].is_loss  # one device, all rows: nothing to check


def test_flops_are_counted_on_meta_tensors() -> None:
    w = one_stage(layer=lambda i: nn.Linear(4, 8) if i == 0 else nn.Linear(8, 4), batch=4)
    p = provider_for(w)
    first, second = (m for m in contract(w).metaops if not m.is_loss and m.kind != "loss")
    # forward 2*in*out per row; backward: the weight gradient, plus the input gradient where a
    # gradient flows back into the layer (not into the first layer, which reads the data)
    assert first.cost.flops_per_layer == 4 * (2 + 2) * 4 * 8
    assert second.layers[0].layer == 1
    post_flops = 4 * (2 + 2 + 2) * 4 * 2
    assert second.cost.flops_per_layer == 4 * (2 + 2 + 2) * 8 * 4 + post_flops
    assert first.cost.params_per_layer == 4 * 8 + 8
    assert p.operator_cost(first.layers[0], 4).saved_elements == 4  # the input row, x


def test_a_frozen_component_costs_its_forward_only_and_has_no_sync() -> None:
    from spindle.costs.memory import FP32, memory_report
    from spindle.plan.checks import validate_plan
    from spindle.plan.contract import Plan, Slice, Wave
    from spindle.planner.pipeline import make_context, plan_memory
    from spindle.planner.simulator import simulate

    trained, frozen = (load_workload(PLAIN), load_workload(FROZEN))
    got = {}
    for w in (trained, frozen):
        ctx = make_context(w, 2, 2, "cpu")
        g = ctx.graph
        waves = tuple(Wave((Slice(m.id, 0, m.num_layers, (0, 1) if not m.is_loss else (0,)),))
                      for m in g.metaops)
        plan = Plan("t", w.name, w.fingerprint(), 2, 2, "cpu", tuple(g.metaops), waves)
        validate_plan(plan, g.metaops)
        got[w.name] = (g, simulate(plan, g, ctx.estimator, ctx.links),
                       memory_report(plan, g, FP32), plan_memory(ctx, plan))
    (gt, st, mt, _), (gf, sf, mf, _) = got["plain-modules"], got["plain-modules-frozen"]
    vision = [m for m in gf.metaops if m.component == "vision"]
    assert all(not m.backward and m.cost.grad_share == 0.0 for m in vision)
    assert all(m.backward for m in gt.metaops)
    for a, b in zip((m for m in gt.metaops if m.component == "vision"), vision):
        assert b.cost.flops_per_layer < 0.5 * a.cost.flops_per_layer  # forward only
        assert b.cost.saved_elements_per_sample_per_layer == 0
    vision_params = sum(p.numel() for n, p in _params(frozen).items() if n.startswith("vision."))
    assert st.device_params[0] - sf.device_params[0] == vision_params  # no optimizer step
    assert sf.sync_s < st.sync_s
    # the frozen tower keeps its weights (4 bytes) but no gradient (4) nor AdamW state (8)
    assert mt.devices[0].param_bytes - mf.devices[0].param_bytes == 12 * vision_params


def _params(w: Workload) -> dict[str, torch.Tensor]:
    p = provider_for(w)
    with torch.device("meta"):
        return {n: torch.empty(s) for n, s in p.parameter_shapes_all().items()}


def test_initial_parameters_are_the_same_whatever_is_built() -> None:
    w = load_workload(PLAIN)
    p = provider_for(w)
    alone = p.create("text.layers.2", 7, torch.float64)
    again = p.create("text.layers.2", 7, torch.float64)
    other = p.create("text.layers.1", 7, torch.float64)
    for (n, a), b, c in zip(alone.named_parameters(), again.parameters(), other.parameters()):
        assert torch.equal(a, b), n
        assert a.dim() == 1 or not torch.equal(a, c), n  # each layer its own draw
    frozen = provider_for(load_workload(FROZEN)).create("vision.layers.0", 7, torch.float64)
    assert not any(q.requires_grad for q in frozen.parameters())
