"""The plain single-process model: every module of the workload, every task in turn.

This is the ground truth the distributed runtime is checked against on the shipped workloads:
one iteration runs every task's whole batch through its stages with the same modules and the
same operator loop as the runtime (:func:`spindle.layers.chain.run_chain`, so a mismatch points
at the distribution logic, not at the layers), sums the task losses and takes one AdamW step with
gradient clipping over all parameters.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch
from torch import nn

from spindle.declare.workload import LOSS_STAGE, LayerRef, Workload
from spindle.layers import provider_for
from spindle.layers.chain import run_chain
from spindle.layers.provider import Activation, materialise
from spindle.runtime.data import task_data

log = logging.getLogger(__name__)

Gather = Callable[[torch.Tensor], torch.Tensor]
"""Turns a stage's local embedding rows into the full batch (the identity on one process)."""


def module_key(path: str) -> str:
    """``nn.ModuleDict`` key of a module path (module keys may not contain '.')."""
    return path.replace(".", "/")


class ReferenceModel(nn.Module):
    """Every module of ``workload`` by path; ``forward(step)`` gives each task's loss."""

    def __init__(self, workload: Workload, seed: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.workload = workload
        self.seed = seed
        self.provider = provider_for(workload)
        self.provider.check_runnable()
        paths = {p for ref in self.provider.operators()
                 for p in self.provider.operator_modules(ref)}
        self.paths = sorted(paths)
        self.mods = nn.ModuleDict({module_key(p): m for p, m in
                                   materialise(self.provider, paths, seed, dtype).items()})
        self._data = {t.name: task_data(workload, t.name, seed) for t in workload.tasks}

    @property
    def by_path(self) -> dict[str, nn.Module]:
        return {p: self.mods[module_key(p)] for p in self.paths}

    def named_logical_parameters(self) -> dict[str, nn.Parameter]:
        """Logical name -> parameter (sorted by name)."""
        out = {f"{p}.{n}": prm for p, m in self.by_path.items() for n, prm in m.named_parameters()}
        return dict(sorted(out.items()))

    def batch_rows(
        self, task: str, step: int, rows: slice = slice(None)
    ) -> dict[str, torch.Tensor]:
        """``rows`` of ``task``'s data at ``step`` by field, on this model's device (floating
        fields in its dtype)."""
        like = next(iter(self.parameters()))
        start, stop, _ = rows.indices(self.workload.task(task).batch_size)
        got = self._data[task].rows(step, start, stop)
        return {f: t.to(device=like.device, dtype=like.dtype if t.is_floating_point() else t.dtype)
                for f, t in got.items()}

    def coupled(self, task: str) -> bool:
        """Whether ``task``'s loss needs the whole batch at once (gathered across ranks)."""
        loss = self.workload.task(task).loss
        return loss.type == "contrastive" or (loss.type == "custom" and loss.coupled)

    def task_loss(
        self, task: str, step: int, rows: slice = slice(None), gather: Gather | None = None,
        batch: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``task``'s loss at ``step`` computed on ``rows`` of its batch.

        Built-in LM task, row-wise custom loss: the local share (the rows' mean scaled by
        rows / batch).  Contrastive or coupled task: the whole loss, after ``gather`` has
        assembled the full batch of its inputs.  ``batch`` (from :meth:`batch_rows` with the
        same ``rows``) avoids loading the data again.
        """
        t = self.workload.task(task)
        modules = self.by_path
        batch = batch if batch is not None else self.batch_rows(task, step, rows)
        outputs: dict[str, Activation] = {}
        for st in t.stages:
            refs = [LayerRef(task, st.name, st.component, i)
                    for i in range(self.provider.num_layers(st.component))]
            out = run_chain(self.provider, modules, refs, {s: outputs[s] for s in st.sources},
                            None, batch, t.batch_size)
            if isinstance(out, torch.Tensor):  # the LM loss stage
                return out
            outputs[st.name] = out
        joined = gather if gather is not None and self.coupled(task) else None
        full = {name: ((joined(outputs[name][0]) if joined is not None else outputs[name][0]),)
                for name in t.loss.inputs}
        fields = batch
        if joined is not None:
            fields = {f: joined(v) for f, v in batch.items()}
        loss = run_chain(self.provider, modules, [LayerRef(task, LOSS_STAGE, "", 0)], full, None,
                         fields, t.batch_size)
        assert isinstance(loss, torch.Tensor)
        return loss

    def forward(self, step: int) -> dict[str, torch.Tensor]:
        """Each task's loss on its full batch at ``step``, tasks in declaration order."""
        return {t.name: self.task_loss(t.name, step) for t in self.workload.tasks}


def train_reference(
    workload: Workload, seed: int, steps: int, lr: float = 1e-3, weight_decay: float = 0.01,
    clip: float = 1.0, dtype: torch.dtype = torch.float32,
    history: list[dict[str, float]] | None = None,
    optimizer_state: dict[str, dict[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Train the reference model for ``steps`` iterations (data of steps 0..steps-1): loss = sum
    of task losses, ``clip_grad_norm_`` over all parameters, AdamW(lr, default betas,
    ``weight_decay``) on all parameters.  Appends each step's task losses to ``history`` if
    given, and AdamW's final state by logical name to ``optimizer_state``.  Returns logical
    name -> final value."""
    model = ReferenceModel(workload, seed, dtype)
    params = [p for p in model.named_logical_parameters().values() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        losses = model(step)
        total = torch.stack(list(losses.values())).sum()
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        if history is not None:
            history.append({k: float(v.detach()) for k, v in losses.items()})
        log.debug("reference step %d: loss %.4f", step, float(total.detach()))
    if optimizer_state is not None:
        for n, p in model.named_logical_parameters().items():
            if p in opt.state:
                optimizer_state[n] = {k: v.detach().clone() for k, v in opt.state[p].items()}
    return {n: p.detach().clone() for n, p in model.named_logical_parameters().items()}
