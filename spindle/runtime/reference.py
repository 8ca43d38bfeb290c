"""The plain single-process model: every logical parameter in one module, every task in turn.

This is the ground truth the distributed runtime is checked against: one iteration runs every
task's whole batch through its stages, layer by layer, with :func:`run_operator` (the same layer
maths as the runtime, so a mismatch points at the distribution logic, not at the layers), sums the
task losses and takes one AdamW step with gradient clipping over all parameters.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch
from torch import nn

from spindle.declare.workload import LayerRef, Workload
from spindle.runtime.data import make_raw
from spindle.runtime.model import (
    LOSS_STAGE,
    Activation,
    all_parameter_names,
    check_supported,
    init_parameter,
    is_lm_stage,
    needs_raw,
    parameter_shape,
    run_operator,
)

log = logging.getLogger(__name__)

Gather = Callable[[torch.Tensor], torch.Tensor]
"""Turns a stage's local embedding rows into the full batch (the identity on one process)."""


def module_key(name: str) -> str:
    """``nn.ParameterDict`` key of a logical name (module keys may not contain '.')."""
    return name.replace(".", "/")


class ReferenceModel(nn.Module):
    """All parameters of ``workload`` by logical name; ``forward(step)`` gives each task's loss."""

    def __init__(self, workload: Workload, seed: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        check_supported(workload)
        self.workload = workload
        self.seed = seed
        self.logical_names = all_parameter_names(workload)
        self.params = nn.ParameterDict(
            {
                module_key(n): nn.Parameter(
                    init_parameter(n, parameter_shape(workload, n), seed, dtype)
                )
                for n in self.logical_names
            }
        )

    def named_logical_parameters(self) -> dict[str, nn.Parameter]:
        """Logical name -> parameter (sorted by name)."""
        return {n: self.params[module_key(n)] for n in self.logical_names}

    def raw_inputs(
        self, task: str, step: int, rows: slice = slice(None)
    ) -> dict[str, torch.Tensor | None]:
        """Raw input rows of every stage of ``task`` at ``step``, on this model's device."""
        like = next(iter(self.params.values()))
        out: dict[str, torch.Tensor | None] = {}
        for st in self.workload.task(task).stages:
            raw = make_raw(self.workload, task, st.name, step, self.seed)
            if raw is not None:
                dtype = like.dtype if raw.is_floating_point() else raw.dtype
                raw = raw[rows].to(device=like.device, dtype=dtype)
            out[st.name] = raw
        return out

    def task_loss(
        self, task: str, step: int, rows: slice = slice(None), gather: Gather | None = None,
        raw: Mapping[str, torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """``task``'s loss at ``step`` computed on ``rows`` of its batch.

        LM task: the local share (sum over ``rows`` / global token count).  Contrastive task:
        the whole loss, after ``gather`` has assembled the full batch of both embeddings.
        ``raw`` (from :meth:`raw_inputs` with the same ``rows``) avoids regenerating the data.
        """
        w = self.workload
        t = w.task(task)
        params = self.named_logical_parameters()
        raw = raw if raw is not None else self.raw_inputs(task, step, rows)
        outputs: dict[str, Activation | torch.Tensor] = {}
        for st in t.stages:
            comp = w.components[st.component]
            carry: Activation | torch.Tensor | None = None
            for layer in range(comp.layers):
                ref = LayerRef(task, st.name, st.component, layer)
                carry = run_operator(
                    w, ref, params, carry if isinstance(carry, tuple) else None,
                    outputs,  # type: ignore[arg-type]  # only Activations are read
                    raw[st.name] if needs_raw(w, ref) else None, t.batch_size,
                )
            assert carry is not None
            outputs[st.name] = carry
        if t.loss.type == "lm":
            loss = outputs[str(t.loss.stage)]
            assert isinstance(loss, torch.Tensor) and is_lm_stage(t, str(t.loss.stage))
            return loss
        full: dict[str, Activation] = {}
        for name in t.loss.inputs:
            (emb,) = outputs[name]  # type: ignore[misc]
            full[name] = (gather(emb) if gather is not None else emb,)
        loss_op = LayerRef(task, LOSS_STAGE, "", 0)
        out = run_operator(w, loss_op, params, None, full, None, t.batch_size)
        assert isinstance(out, torch.Tensor)
        return out

    def forward(self, step: int) -> dict[str, torch.Tensor]:
        """Each task's loss on its full batch at ``step``, tasks in declaration order."""
        return {t.name: self.task_loss(t.name, step) for t in self.workload.tasks}


def train_reference(
    workload: Workload, seed: int, steps: int, lr: float = 1e-3, weight_decay: float = 0.01,
    clip: float = 1.0, dtype: torch.dtype = torch.float32,
    history: list[dict[str, float]] | None = None,
) -> dict[str, torch.Tensor]:
    """Train the reference model for ``steps`` iterations (data of steps 0..steps-1): loss = sum
    of task losses, ``clip_grad_norm_`` over all parameters, AdamW(lr, default betas,
    ``weight_decay``) on all parameters.  Appends each step's task losses to ``history`` if
    given.  Returns logical name -> final value."""
    model = ReferenceModel(workload, seed, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        losses = model(step)
        total = torch.stack(list(losses.values())).sum()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if history is not None:
            history.append({k: float(v.detach()) for k, v in losses.items()})
        log.debug("reference step %d: loss %.4f", step, float(total.detach()))
    return {n: p.detach().clone() for n, p in model.named_logical_parameters().items()}
