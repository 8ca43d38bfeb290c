"""User models train exactly like a plain PyTorch loop written here.

The model of ``tests/workloads/plain_modules.py`` (plain ``nn.Module``s, three tasks: a coupled
contrastive loss with a learnable temperature, a row-wise classifier, a weighted row-wise LM
loss) is trained by ``spindle train`` for 3 steps in float64 on 1, 2 and 3 ranks under every
planner and two hand-written plans, and every saved parameter must equal what a single-process
loop over the same modules and the same dataset items computes (AdamW, clip_grad_norm_, the sum
of weighted task means), to 1e-9.  The same with the vision tower frozen, and for
``examples/hf_multitask.py`` (CLIP, BERT and Qwen2 modules from Hugging Face).  The loop starts from
the parameters ``spindle train --steps 0 --save`` writes (the documented contract).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from spindle.declare.datasets import item_indices
from spindle.declare.workload import Workload, load_workload
from tests.plans import REPO, SEED, STEPS, all_plans, assert_matches, run_train

PLAIN = str(REPO / "tests" / "workloads" / "plain_modules.py")
FROZEN = str(REPO / "tests" / "workloads" / "plain_modules_frozen.py")
HF = str(REPO / "examples" / "hf_multitask.py")  # CLIP, BERT and Qwen2 modules
LR, WEIGHT_DECAY, CLIP = 1e-3, 0.01, 1.0  # spindle train's documented defaults


def plain_model(w: Workload) -> nn.ModuleDict:
    """Every module of ``w`` under its logical name: ``<component>.pre|layers.i|post``,
    ``loss.<task>``."""
    root = nn.ModuleDict()
    for name, c in w.components.items():
        parts = nn.ModuleDict()
        if c.pre is not None:
            parts["pre"] = c.pre() if not isinstance(c.pre, nn.Module) else copy.deepcopy(c.pre)
        layers = [c.layer(i) for i in range(c.layers)] if callable(c.layer) else \
            [copy.deepcopy(m) for m in c.layer]
        parts["layers"] = nn.ModuleList(layers)
        if c.post is not None:
            parts["post"] = c.post() if not isinstance(c.post, nn.Module) else \
                copy.deepcopy(c.post)
        if c.frozen:
            parts.requires_grad_(False)
        root[name] = parts
    root["loss"] = nn.ModuleDict({t.name: copy.deepcopy(t.loss.fn) for t in w.tasks
                                  if isinstance(t.loss.fn, nn.Module)})
    return root


def run_stage(parts: nn.Module, args: list[torch.Tensor]) -> torch.Tensor:
    x = parts["pre"](*args) if "pre" in parts else args[0]
    for layer in parts["layers"]:
        x = layer(x)
    return parts["post"](x) if "post" in parts else x


def plain_loop(w: Workload, init: dict[str, torch.Tensor], steps: int) -> dict[str, torch.Tensor]:
    """The single-process training loop over ``w``'s modules, from ``init``."""
    model = plain_model(w).double()
    model.load_state_dict(init)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    for step in range(steps):
        opt.zero_grad()
        total: Any = 0.0
        for t in w.tasks:
            items = [t.dataset[i] for i in item_indices(t, SEED, step, 0, t.batch_size)]
            batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
            batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
            outs: dict[str, torch.Tensor] = {}
            for st in t.stages:
                args = [batch[f] for f in st.fields] + [outs[s] for s in st.inputs]
                outs[st.name] = run_stage(model[st.component], args)
            fn = model["loss"][t.name] if isinstance(t.loss.fn, nn.Module) else t.loss.fn
            total = total + t.weight * fn({s: outs[s] for s in t.loss.inputs},
                                          {f: batch[f] for f in t.loss.fields})
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def spindle_train(tmp_path: Path, workload: str, nproc: int, args: list[str]) -> Path:
    out = tmp_path / "out"
    proc = run_train(nproc, workload, [*args, "--seed", str(SEED), "--dtype", "float64",
                                       "--save", str(out), "--no-progress", "--timeout", "60"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def initial(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, torch.Tensor]]:
    """``spindle train --steps 0 --save``: the initial parameters of both models."""
    got = {}
    running = []
    for path in (PLAIN, FROZEN, HF):  # the three launches side by side (each mostly start-up)
        out = tmp_path_factory.mktemp("init") / "out"
        proc = subprocess.Popen(
            [sys.executable, "-m", "spindle", "train", path, "--nproc", "1", "--steps", "0",
             "--seed", str(SEED), "--dtype", "float64", "--save", str(out), "--no-progress"],
            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        running.append((path, out, proc))
    for path, out, proc in running:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        got[path] = torch.load(out / "params.pt")
    return got


@pytest.mark.parametrize("workload, nproc", [
    (PLAIN, 1), (PLAIN, 2), (PLAIN, 3), (FROZEN, 2), (FROZEN, 3), (HF, 1), (HF, 2), (HF, 3),
], ids=lambda v: Path(v).stem if isinstance(v, str) else str(v))
def test_user_modules_train_like_a_plain_pytorch_loop(
    tmp_path: Path, initial: dict[str, dict[str, torch.Tensor]], workload: str, nproc: int
) -> None:
    w = load_workload(workload)
    plans = all_plans(w, nproc)
    paths = []
    for label, plan in plans.items():
        plan.save(tmp_path / f"{label}.json")
        paths.append(str(tmp_path / f"{label}.json"))
    out = spindle_train(tmp_path, workload, nproc, ["--plan", *paths, "--steps", str(STEPS),
                                                    "--min-bucket-bytes", "0"])
    init = initial[workload]
    want = plain_loop(w, init, STEPS)
    if workload == FROZEN:  # frozen parameters stay where they started, the rest moved
        assert all(torch.equal(want[n], init[n]) for n in want if n.startswith("vision."))
    assert all(not torch.equal(want[n], init[n]) for n in want if ".layers.1." in n
               and not n.startswith("vision.") and n.endswith("weight"))
    for label in plans:
        got = torch.load(out / label / "params.pt")
        assert_matches(got, want, atol=1e-9, rtol=1e-9, label=f"{Path(workload).stem}/{nproc}"
                       f"/{label}")
