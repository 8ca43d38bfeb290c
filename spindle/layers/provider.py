"""Layer providers: the ``nn.Module``s a workload is made of, and what each operator runs.

A :class:`LayerProvider` answers, for one workload:

* which modules an operator (one layer of one stage of one task, a :class:`LayerRef`) runs:
  logical module *paths* such as ``text.blocks.3``, ``text.input`` or ``loss.vision-text``
  (:meth:`~LayerProvider.operator_modules`; the layer's own module first, then the light parts
  fused into it: input adapter, projections, final norm, head, loss);
* how to build the module at a path (:meth:`~LayerProvider.build`), on whatever device is the
  default: the cost models build on ``meta`` and read parameter names and shapes off the module;
  the runtime builds on ``meta`` only the modules a rank runs and materialises them
  (:func:`materialise`);
* the initial value of a parameter, a function of (seed, logical name) only, so that any plan on
  any world size starts from the same parameters (:meth:`~LayerProvider.initial_value`);
* how to run an operator on its inputs (:meth:`~LayerProvider.run`) and what it costs
  (:meth:`~LayerProvider.operator_cost`).

A parameter's *logical name* is ``{module path}.{name inside the module}``; it is the same
whatever the plan or the world size, and it is what ``--save`` files use.

Every rule that needs "which parameters does this operator use" reads it from here: the graph
and the memory model (:func:`parameter_index`, keyed by module path), the runtime's
localisation and parameter groups (the same index) and the single-process reference.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from spindle.declare.workload import LOSS_STAGE, LayerRef, Task, Workload
from spindle.plan.contract import MetaOp
from spindle.plan.layout import ParameterIndex

Activation = tuple[torch.Tensor, ...]
"""Batch-first tensors passed between operators: ``(x,)`` or, inside a decoder stage,
``(x, memory)``; a contrastive input stage ends with ``(emb,)``."""

Output = Activation | torch.Tensor
"""What an operator returns: the next activation, or a scalar loss contribution."""


class LayerError(ValueError):
    """A workload, module or operator a provider cannot build or run; one line."""


@dataclass(frozen=True)
class OperatorCost:
    """What the cost models need of one operator (per sample unless said otherwise).

    ``kind`` and the shape fields (``hidden``, ``heads``, ``ffn``, ``tokens``,
    ``memory_tokens``) decide, with the batch, which operators merge into a MetaOp and which
    profile entry times it."""

    kind: str
    hidden: int
    heads: int
    ffn: int
    tokens: int
    memory_tokens: int
    layer_flops: float  # forward + backward of the layer itself over the whole batch
    light_flops: float  # of the light parts fused into this operator, whole batch
    carry_elements: float  # passed to the next layer of the stage
    out_elements: float  # handed to the stage's consumers after its last layer
    saved_elements: float  # kept for backward by the layer
    attention_elements: float = 0.0  # of those, attention scores a fused kernel does not keep
    input_elements: float = 0.0  # raw features the stage's first layer keeps for backward
    logit_elements: float = 0.0  # LM logits of the stage's last layer (kept in fp32)
    variant: str = ""  # tells apart layers of one component with different modules


class LayerProvider(ABC):
    """The modules of one workload (module docstring)."""

    def __init__(self, workload: Workload) -> None:
        self.workload = workload
        self._shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        self._flow: dict[LayerRef, tuple[bool, bool]] | None = None

    @abstractmethod
    def operator_modules(self, ref: LayerRef) -> tuple[str, ...]:
        """The module paths operator ``ref`` runs, the layer's own module first."""

    @abstractmethod
    def build(self, path: str) -> nn.Module:
        """A new module for ``path`` on the current default device (uninitialised)."""

    @abstractmethod
    def initial_value(
        self, name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """The initial CPU value, in ``dtype``, of the parameter with logical name ``name``."""

    @abstractmethod
    def fields(self, ref: LayerRef) -> tuple[str, ...]:
        """The fields of its task's data operator ``ref`` reads (see :mod:`spindle.runtime.data`:
        a built-in stage's raw tokens are the field named after the stage)."""

    @abstractmethod
    def input_stages(self, ref: LayerRef) -> tuple[str, ...]:
        """The stages whose outputs ``ref`` reads through ``stage_inputs`` (none for a layer
        inside a stage, which reads the previous layer's output, the *carry*)."""

    @abstractmethod
    def output_shapes(self, task: str, stage: str) -> tuple[tuple[int, ...], ...]:
        """Per-sample shapes of the tensors a stage hands its consumers (its last layer's
        :data:`Activation`)."""

    @abstractmethod
    def run(
        self, ref: LayerRef, modules: Mapping[str, nn.Module], carry: Activation | None,
        stage_inputs: Mapping[str, Activation], batch: Mapping[str, torch.Tensor],
        global_batch: int,
    ) -> Output:
        """Operator ``ref`` on the local rows of the batch.  ``carry``: the previous layer's
        output in the same stage (None where ``input_stages`` is not empty); ``batch``: the
        local rows of the :meth:`fields` it reads; ``global_batch``: the task's whole batch, so
        that every rank's loss share adds up to the task's mean loss."""

    @abstractmethod
    def operator_cost(self, ref: LayerRef, batch: int) -> OperatorCost:
        """The costs of operator ``ref`` on a batch of ``batch`` samples."""

    @abstractmethod
    def num_layers(self, component: str) -> int:
        """How many layers ``component`` stacks."""

    def operators(self) -> list[LayerRef]:
        """Every operator of the workload in a topological order (tasks, stages, layers,
        loss)."""
        ops: list[LayerRef] = []
        for task in self.workload.tasks:
            for st in task.stages:
                ops += [LayerRef(task.name, st.name, st.component, i)
                        for i in range(self.num_layers(st.component))]
            if self.has_loss_operator(task):
                ops.append(LayerRef(task.name, LOSS_STAGE, "", 0))
        return ops

    def has_loss_operator(self, task: Task) -> bool:
        """Whether ``task``'s loss is an operator of its own (else its last stage's last layer
        computes it, as the built-in LM loss does)."""
        return task.loss.type == "contrastive"

    def create(self, path: str, seed: int, dtype: torch.dtype,
               device: torch.device | str = "cpu") -> nn.Module:
        """The module at ``path`` with its initial parameters, on ``device``: built on the meta
        device, then every parameter set to :meth:`initial_value` (seed, logical name)."""
        with torch.device("meta"):
            module = self.build(path)
        module = module.to(dtype=dtype).to_empty(device=device)
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.copy_(self.initial_value(f"{path}.{name}", tuple(p.shape), seed, dtype))
        return module

    def trainable(self, name: str) -> bool:
        """Whether the parameter with logical name ``name`` is trained (not frozen)."""
        return True

    def trainable_size(self, path: str) -> int:
        """Elements of the module at ``path`` that train (gradient, optimizer state, sync)."""
        return sum(math.prod(s) for n, s in self.parameter_shapes(path).items()
                   if self.trainable(n))

    def gradient_flow(self) -> dict[LayerRef, tuple[bool, bool]]:
        """For every operator: (whether a gradient reaches its inputs, whether it runs a
        backward at all).  A gradient reaches an operator's inputs when something trainable
        comes before it in its task; it runs a backward when it, or something before it, has
        a trainable parameter.  A frozen stage that nothing trainable precedes runs forward
        only, and nothing is sent back to it."""
        if self._flow is None:
            flow: dict[LayerRef, tuple[bool, bool]] = {}
            last: dict[tuple[str, str], bool] = {}  # (task, stage) -> its last op's backward
            for ref in self.operators():
                stages = self.input_stages(ref)
                if stages:
                    before = any(last[(ref.task, s)] for s in stages)
                else:
                    before = ref.layer > 0 and last[(ref.task, ref.stage)]
                here = any(self.trainable(n) for n in self.operator_parameters(ref))
                flow[ref] = (before, before or here)
                last[(ref.task, ref.stage)] = before or here
            self._flow = flow
        return self._flow

    def check_runnable(self) -> None:
        """Raise :class:`LayerError` (one line) if the runtime cannot run this workload; a
        workload that is not runnable can still be planned."""

    # --- derived, the same for every provider --------------------------------------------------
    def parameter_shapes(self, path: str) -> dict[str, tuple[int, ...]]:
        """Logical name -> shape of every parameter of the module at ``path`` (built once on
        the meta device and cached)."""
        got = self._shapes.get(path)
        if got is None:
            with torch.device("meta"):
                module = self.build(path)
            got = {f"{path}.{n}": tuple(p.shape) for n, p in module.named_parameters()}
            self._shapes[path] = got
        return got

    def module_sizes(self, ref: LayerRef) -> dict[str, int]:
        """Module path -> parameter elements, for every module operator ``ref`` runs."""
        return {path: sum(math.prod(s) for s in self.parameter_shapes(path).values())
                for path in self.operator_modules(ref)}

    def operator_parameters(self, ref: LayerRef) -> dict[str, tuple[int, ...]]:
        """Logical name -> shape of every parameter operator ``ref`` uses."""
        out: dict[str, tuple[int, ...]] = {}
        for path in self.operator_modules(ref):
            out.update(self.parameter_shapes(path))
        return out

    def parameter_shapes_all(self) -> dict[str, tuple[int, ...]]:
        """Logical name -> shape of every parameter some operator uses (sorted by name)."""
        every = {n: s for ref in self.operators() for n, s in self.operator_parameters(ref).items()}
        return dict(sorted(every.items()))

    def parameter_names(self) -> list[str]:
        """Every logical parameter some operator uses (sorted)."""
        return list(self.parameter_shapes_all())

    def num_parameters(self) -> int:
        """Parameters of the whole model (every one some operator uses)."""
        return sum(math.prod(s) for s in self.parameter_shapes_all().values())


def parameter_index(provider: LayerProvider, metaops: Sequence[MetaOp]) -> ParameterIndex:
    """The modules (keys) and their parameter elements of every operator of ``metaops``: the
    index the memory model, the simulator and the runtime's parameter groups share."""
    sizes: dict[LayerRef, dict[str, int]] = {}

    def keys_of(ref: LayerRef) -> dict[str, int]:
        got = sizes.get(ref)
        if got is None:
            got = sizes[ref] = provider.module_sizes(ref)
        return got

    return ParameterIndex(metaops, keys_of, provider.trainable_size)


def materialise(
    provider: LayerProvider, paths: Iterable[str], seed: int, dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> dict[str, nn.Module]:
    """The modules at ``paths`` with their initial parameters on ``device``
    (:meth:`LayerProvider.create`): nothing else is ever built."""
    return {path: provider.create(path, seed, dtype, device) for path in sorted(set(paths))}


def keyed_generator(*key: object) -> torch.Generator:
    """A CPU generator seeded from a sha256 of ``key`` (stable across processes and runs)."""
    digest = hashlib.sha256(":".join(str(k) for k in key).encode()).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g
