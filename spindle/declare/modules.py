"""User components: stacks of the user's own ``nn.Module``s, declared in Python.

A :class:`ModuleStack` is a component of a workload (``Workload.components``) made of

* ``pre`` (optional): maps the stage's inputs to hidden states.  It is called positionally with
  the stage's dataset ``fields`` (each a batch-first tensor of the task's rows), then the outputs
  of the stage's ``inputs`` stages, in the order declared.  Without ``pre`` a stage has exactly
  one input (one field, or one earlier stage) and the first layer reads it;
* ``layer``: the ``layers`` modules of the stack, each mapping hidden states (one batch-first
  tensor) to hidden states *row-wise in the batch* (row ``i`` of the output depends on row ``i``
  of the input only, so the planner may split the batch).  Either a factory ``layer(i) ->
  nn.Module`` (each rank calls it only for the layers it runs) or a list of modules;
* ``post`` (optional): applied to the last layer's output; its result is the stage's output.

``pre``, ``post`` and the factory's results are modules; ``pre`` and ``post`` may also be given
as zero-argument factories.  A module made by a factory is built with PyTorch's global RNG seeded
from (run seed, module path) (:func:`module_seed`), so its initial parameters are the same on
every rank, plan and world size; a module given as an instance starts from its own values.

``frozen=True`` freezes the whole component (as does ``requires_grad=False`` on a parameter):
no gradient, no all-reduce, no optimizer state.

Losses of user tasks are callables ``fn(outputs, batch) -> scalar`` (``Loss(type="custom")``):
``outputs`` maps each stage named in the loss's ``inputs`` to its output rows, ``batch`` each of
its ``fields`` to the same rows of the task's data.  A row-wise loss returns the mean over the
rows it is given; a ``coupled`` one (contrastive) is given every row of the batch at once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator
from torch import nn

from spindle.declare.limits import MAX_LAYERS

ModuleSource = nn.Module | Callable[[], nn.Module]
"""A module, or a zero-argument factory of one."""

LayerSource = Callable[[int], nn.Module] | Sequence[nn.Module]
"""A factory ``layer index -> module``, or the list of layer modules."""


class ModuleStack(BaseModel):
    """A component made of the user's modules (module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    kind: Literal["module"] = "module"
    layers: StrictInt = Field(default=0, ge=0, le=MAX_LAYERS,
                              description="number of layers; with a list, its length")
    layer: Any = Field(exclude=True, description="factory (index -> module) or list of modules")
    pre: Any = Field(default=None, exclude=True, description="module or factory: inputs -> hidden")
    post: Any = Field(default=None, exclude=True, description="module or factory on the output")
    frozen: StrictBool = False

    @model_validator(mode="before")
    @classmethod
    def _count_list(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("layer"), (list, tuple)):
            given = data.get("layers", 0)
            if given not in (0, len(data["layer"])):
                raise ValueError(f"layers {given} but a list of {len(data['layer'])} modules")
            data = {**data, "layers": len(data["layer"])}
        return data

    @model_validator(mode="after")
    def _check(self) -> "ModuleStack":
        if isinstance(self.layer, (list, tuple)):
            bad = [i for i, m in enumerate(self.layer) if not isinstance(m, nn.Module)]
            if bad:
                raise ValueError(f"layer {bad[0]} of the list is not an nn.Module")
        elif not callable(self.layer):
            raise ValueError("'layer' must be a factory (index -> nn.Module) or a list of modules")
        if self.layers < 1:
            raise ValueError("a stack needs at least one layer ('layers')")
        for part in ("pre", "post"):
            value = getattr(self, part)
            if value is not None and not (isinstance(value, nn.Module) or callable(value)):
                raise ValueError(f"'{part}' must be an nn.Module or a factory of one")
        return self

    # --- the modules ---------------------------------------------------------------------------
    def build_layer(self, index: int) -> nn.Module:
        """A new module for layer ``index`` (a copy of a listed module)."""
        if isinstance(self.layer, (list, tuple)):
            return _copy(self.layer[index])
        return _checked(self.layer(index), f"layer({index})")

    def build_part(self, part: str) -> nn.Module:
        """A new ``pre`` or ``post`` module."""
        value = getattr(self, part)
        if value is None:
            raise KeyError(part)
        if isinstance(value, nn.Module):
            return _copy(value)
        return _checked(value(), f"{part}()")

    def signature(self) -> str:
        """A hash of every parameter's name and shape (built on the meta device): two stacks
        with the same signature hold the same parameters."""
        h = hashlib.sha256()
        parts = [("pre", self.pre), ("post", self.post)]
        with torch.device("meta"):
            for name, value in parts:
                if value is not None:
                    _hash_module(h, name, self.build_part(name))
            for i in range(self.layers):
                _hash_module(h, f"layers.{i}", self.build_layer(i))
        return h.hexdigest()[:16]


# --- declaration rules (called by the workload validator) ----------------------------------

def check_user_stage(where: str, st: Any, comp: ModuleStack) -> None:
    """The declaration rules of a workload stage (``Stage``) that runs a user stack."""
    where = f"{where}, stage '{st.name}'"
    for name in ("tokens", "memory", "pool_to"):
        if getattr(st, name):
            raise ValueError(f"{where}: '{name}' is for built-in components; a user stack reads"
                             " dataset 'fields' and earlier stages ('inputs')")
    if len(set(st.fields)) != len(st.fields):
        raise ValueError(f"{where}: a field is named twice in {list(st.fields)}")
    given = len(st.fields) + len(st.inputs)
    if given == 0:
        raise ValueError(f"{where}: reads nothing (no fields, no inputs)")
    if comp.pre is None and given != 1:
        raise ValueError(f"{where}: {given} inputs but component '{st.component}' has no 'pre'"
                         " module to combine them (without one a stage reads exactly one)")


def check_custom_loss(where: str, task: Any, seen: dict[str, Any], user: bool) -> None:
    """The declaration rules of a task (``Task``) with a ``custom`` loss."""
    loss = task.loss
    if not user:
        raise ValueError(f"{where}: a custom loss needs user stacks (ModuleStack components)")
    if not callable(loss.fn):
        raise ValueError(f"{where}: a custom loss needs 'fn', a callable (outputs, batch) ->"
                         " scalar")
    if loss.stage is not None:
        raise ValueError(f"{where}: a custom loss names its stages in 'inputs', not 'stage'")
    if not loss.inputs:
        raise ValueError(f"{where}: a custom loss needs 'inputs' (the stages it reads)")
    for ref in loss.inputs:
        if ref not in seen:
            raise ValueError(f"{where}: loss input '{ref}' is not a stage")
    if task.dataset is None:
        raise ValueError(f"{where}: a task of user stacks needs a 'dataset'")
    if not (hasattr(task.dataset, "__getitem__") and hasattr(task.dataset, "__len__")):
        raise ValueError(f"{where}: 'dataset' must be map-style (__getitem__ and __len__)")
    if task.collate is not None and not callable(task.collate):
        raise ValueError(f"{where}: 'collate' must be callable")


def module_seed(seed: int, path: str) -> int:
    """The seed of PyTorch's global RNG while the module at ``path`` is built by its factory."""
    digest = hashlib.sha256(f"{seed}:module:{path}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _copy(module: nn.Module) -> nn.Module:
    """A copy of a given module on the current default device (meta: shapes only)."""
    import copy

    if torch.empty(0).device.type == "meta":
        return copy.deepcopy(module).to("meta")
    return copy.deepcopy(module)


def _checked(module: object, what: str) -> nn.Module:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{what} returned {type(module).__name__}, not an nn.Module")
    return module


def _hash_module(h: Any, prefix: str, module: nn.Module) -> None:
    for name, p in module.named_parameters():
        h.update(f"{prefix}.{name}:{tuple(p.shape)}:{p.dtype}:{p.requires_grad};".encode())
