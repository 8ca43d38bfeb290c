"""The built-in provider: the components a YAML/TOML workload declares (``encoder``, ``decoder``,
``llm`` stacks with their adapters and heads), as ``nn.Module``s.

Modules of component ``c`` (their paths; a parameter's logical name is path + name inside):

- ``c.input``: a :class:`~spindle.layers.blocks.TokenEmbedding` (``embedding`` [vocab, h]) for a
  ``tokens`` adapter, or a linear projection (``weight`` [h, dim], ``bias``) for ``features``;
- ``c.in_proj.src``: projects the output of a stage of component ``src`` (an ``inputs`` stage
  or a decoder's ``memory``) to this component's hidden size; shared by every task that feeds
  ``src`` into ``c``;
- ``c.blocks.i``: block ``i`` (:class:`~spindle.layers.blocks.Block`);
- ``c.norm`` (final norm: LayerNorm, or RMSNorm for ``llm``), ``c.proj`` (contrastive
  embedding, [output_dim, h], no bias), ``c.head`` (LM head, [vocab, h], no bias);
- ``loss.task``: a task's :class:`~spindle.layers.blocks.ContrastiveLoss`.

An operator (layer ``i`` of a stage) runs ``c.blocks.i``; layer 0 also runs the stage's input
adapter (when it reads raw tokens) and the ``in_proj`` of every input and memory stage (their
outputs projected, then concatenated along the tokens before the stage's own raw tokens, plus a
fixed sinusoidal position embedding); the last layer also runs the final norm, ``pool_to``
average pooling, and then the contrastive projection of the mean token, or the LM head and the
next-token cross entropy over the stage's own tokens (summed over the local rows and divided by
the task's *global* token count, so the ranks' shares add up to the task's mean loss).

Initialisation (:meth:`BuiltinProvider.initial_value`): biases 0, norm gains 1, ``logit_scale``
log(1/0.07) (all in the run's dtype), token embeddings N(0, 1), every other weight N(0, 1/fan_in)
with fan_in the last dimension, drawn in float32 from a generator keyed by
sha256(f"{seed}:{name}") and then cast.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from spindle.declare.workload import (
    LOSS_STAGE,
    Component,
    LayerRef,
    Stage,
    Task,
)
from spindle.layers import costmodel
from spindle.layers.blocks import (
    LOGIT_SCALE_INIT,
    Block,
    ContrastiveLoss,
    TokenEmbedding,
    norm,
    sinusoidal_positions,
)
from spindle.layers.provider import (
    Activation,
    LayerError,
    LayerProvider,
    OperatorCost,
    Output,
    keyed_generator,
)
from spindle.plan.contract import LOSS_KIND


class BuiltinProvider(LayerProvider):
    """The modules of a declared workload (module docstring)."""

    # --- the workload's structure ----------------------------------------------------------------
    def num_layers(self, component: str) -> int:
        return self.component(component).layers

    def component(self, name: str) -> Component:
        """The built-in component ``name``."""
        comp = self.workload.components[name]
        if not isinstance(comp, Component):
            raise LayerError(f"component '{name}' is not a built-in stack")
        return comp

    def context(self, ref: LayerRef) -> tuple[Task, Stage, Component]:
        """The task, stage and component of operator ``ref`` (not a loss operator)."""
        task = self.workload.task(ref.task)
        st = _stage(task, ref.stage)
        if st.component != ref.component:
            raise LayerError(f"operator {ref}: stage '{st.name}' runs component '{st.component}'")
        comp = self.component(st.component)
        if not 0 <= ref.layer < comp.layers:
            raise LayerError(f"operator {ref}: layer out of range 0..{comp.layers - 1}")
        return task, st, comp

    def fields(self, ref: LayerRef) -> tuple[str, ...]:
        """The stage's raw tokens (the field named after the stage) at layer 0 of a stage that
        reads them, and at the last layer of an LM loss stage (its targets)."""
        if ref.is_loss:
            return ()
        task, st, comp = self.context(ref)
        reads = (ref.layer == 0 and st.tokens > 0) or (
            ref.layer == comp.layers - 1 and _is_lm_stage(task, st.name))
        return (st.name,) if reads else ()

    def input_stages(self, ref: LayerRef) -> tuple[str, ...]:
        """The ``inputs`` and ``memory`` of the stage at layer 0, the two loss inputs for a loss
        operator, else none."""
        task = self.workload.task(ref.task)
        if ref.is_loss:
            return tuple(task.loss.inputs)
        _, st, _ = self.context(ref)
        return st.sources if ref.layer == 0 else ()

    def output_shapes(self, task: str, stage: str) -> tuple[tuple[int, ...], ...]:
        """The contrastive embedding [output_dim] of a loss input, else the final hidden states
        [tokens, hidden]."""
        t = self.workload.task(task)
        comp = self.component(_stage(t, stage).component)
        if _is_contrastive_input(t, stage):
            return ((int(comp.output_dim or 0),),)
        return ((self.workload.stage_output_tokens(t)[stage], comp.hidden),)

    # --- modules ---------------------------------------------------------------------------------
    def operator_modules(self, ref: LayerRef) -> tuple[str, ...]:
        if ref.is_loss:
            return (f"loss.{ref.task}",)
        task, st, comp = self.context(ref)
        c = st.component
        paths = [f"{c}.blocks.{ref.layer}"]
        if ref.layer == 0:
            if st.tokens > 0:
                paths.append(f"{c}.input")
            comp_of = {s.name: s.component for s in task.stages}
            paths += [f"{c}.in_proj.{comp_of[src]}" for src in st.sources]
        if ref.layer == comp.layers - 1:
            paths.append(f"{c}.norm")
            if _is_contrastive_input(task, st.name):
                paths.append(f"{c}.proj")
            if _is_lm_stage(task, st.name):
                paths.append(f"{c}.head")
        return tuple(dict.fromkeys(paths))

    def build(self, path: str) -> nn.Module:
        head, _, rest = path.partition(".")
        if head == LOSS_STAGE:
            self.workload.task(rest)  # KeyError for an unknown task
            return ContrastiveLoss()
        comp = self.workload.components.get(head)
        if not isinstance(comp, Component):
            raise LayerError(f"no module '{path}': no component '{head}'")
        h = comp.hidden
        part, _, tail = rest.partition(".")
        if part == "blocks":
            return Block(comp.kind, h, comp.heads, comp.ffn_size)
        if part == "input" and comp.input is not None:
            if comp.input.type == "tokens":
                return TokenEmbedding(int(comp.input.vocab or 0), h)
            return nn.Linear(int(comp.input.dim or 0), h)
        if part == "in_proj" and tail in self.workload.components:
            return nn.Linear(self.component(tail).hidden, h)
        if part == "norm":
            return norm(h, rms=comp.kind == "llm")
        if part == "proj" and comp.output_dim is not None:
            return nn.Linear(h, comp.output_dim, bias=False)
        if part == "head" and comp.vocab is not None:
            return nn.Linear(h, comp.vocab, bias=False)
        raise LayerError(f"no module '{path}' in component '{head}'")

    def parameter_shapes(self, path: str) -> dict[str, tuple[int, ...]]:
        """As the base class, but the blocks of one component are one shape: built once."""
        head, _, rest = path.partition(".")
        part, _, index = rest.partition(".")
        if part == "blocks" and index != "0":
            first = super().parameter_shapes(f"{head}.blocks.0")
            cut = len(f"{head}.blocks.0")
            return {f"{path}{n[cut:]}": shape for n, shape in first.items()}
        return super().parameter_shapes(path)

    def initial_value(
        self, name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype
    ) -> torch.Tensor:
        leaf = name.rsplit(".", 1)[-1]
        parts = name.split(".")
        if leaf == "logit_scale":
            return torch.full(shape, LOGIT_SCALE_INIT, dtype=dtype)
        if leaf == "bias":
            return torch.zeros(shape, dtype=dtype)
        if len(parts) >= 2 and parts[-2].startswith("norm"):
            return torch.ones(shape, dtype=dtype)
        std = 1.0 if leaf == "embedding" else 1.0 / math.sqrt(shape[-1])
        # drawn in float32 whatever the dtype, so every precision starts from the same draw
        return (torch.randn(shape, generator=keyed_generator(seed, name)) * std).to(dtype)

    # --- running an operator ---------------------------------------------------------------------
    def run(
        self, ref: LayerRef, modules: Mapping[str, nn.Module], carry: Activation | None,
        stage_inputs: Mapping[str, Activation], batch: Mapping[str, torch.Tensor],
        global_batch: int,
    ) -> Output:
        raw = batch.get(ref.stage)
        if ref.is_loss:
            a, b = self.workload.task(ref.task).loss.inputs
            return modules[f"loss.{ref.task}"](stage_inputs[a][0], stage_inputs[b][0])
        task, st, comp = self.context(ref)
        c = st.component
        if ref.layer == 0:
            x, memory = self._embed(task, st, comp, modules, stage_inputs, raw)
        else:
            if carry is None:
                raise LayerError(f"operator {ref}: layer {ref.layer} needs the carry")
            x, memory = carry[0], (carry[1] if len(carry) > 1 else None)
        x = modules[f"{c}.blocks.{ref.layer}"](x, memory)
        if ref.layer < comp.layers - 1:
            return (x, memory) if memory is not None else (x,)
        return self._finish(task, st, comp, modules, x, raw, global_batch)

    def _embed(
        self, task: Task, st: Stage, comp: Component, modules: Mapping[str, nn.Module],
        stage_inputs: Mapping[str, Activation], raw: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """First layer's input: projected ``inputs`` then own raw tokens, plus positions; and the
        projected memory of a decoder stage."""
        c = st.component
        comp_of = {s.name: s.component for s in task.stages}
        pieces = [modules[f"{c}.in_proj.{comp_of[src]}"](stage_inputs[src][0])
                  for src in st.inputs]
        if st.tokens > 0:
            if raw is None:
                raise LayerError(f"{task.name}/{st.name}: layer 0 needs raw input")
            adapter = modules[f"{c}.input"]
            if comp.input is not None and comp.input.type == "tokens":
                pieces.append(adapter(raw))
            else:  # features: follow the parameters' dtype (the data is float32)
                weight = adapter.weight
                assert isinstance(weight, torch.Tensor)
                pieces.append(adapter(raw.to(weight.dtype)))
        x = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
        expect = self.workload.stage_tokens(task)[st.name]
        if x.shape[1] != expect:
            raise LayerError(
                f"{task.name}/{st.name}: {x.shape[1]} tokens enter the stage, expected {expect}")
        x = x + sinusoidal_positions(x.shape[1], comp.hidden, x)
        memory = None
        if st.memory is not None:
            memory = modules[f"{c}.in_proj.{comp_of[st.memory]}"](stage_inputs[st.memory][0])
        return x, memory

    def _finish(
        self, task: Task, st: Stage, comp: Component, modules: Mapping[str, nn.Module],
        x: torch.Tensor, raw: torch.Tensor | None, global_batch: int,
    ) -> Output:
        """After the last block: final norm, pooling, then embedding / LM loss / hidden states."""
        c = st.component
        x = modules[f"{c}.norm"](x)
        if st.pool_to is not None:
            x = F.adaptive_avg_pool1d(x.transpose(1, 2), st.pool_to).transpose(1, 2)
        if _is_contrastive_input(task, st.name):
            return (modules[f"{c}.proj"](x.mean(dim=1)),)
        if _is_lm_stage(task, st.name):
            if raw is None:
                raise LayerError(f"{task.name}/{st.name}: the LM loss needs the raw tokens")
            t = st.tokens
            logits = modules[f"{c}.head"](x[:, -t:-1])
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), raw[:, 1:].reshape(-1),
                                  reduction="sum")
            return nll / (global_batch * (t - 1))
        return (x,)

    # --- costs -----------------------------------------------------------------------------------
    def operator_cost(self, ref: LayerRef, batch: int) -> OperatorCost:
        """The analytic counts of :mod:`spindle.layers.costmodel` (FLOPs: 2 per multiply-add,
        backward twice the forward)."""
        w = self.workload
        task = w.task(ref.task)
        if ref.is_loss:
            dim = int(self.component(_stage(task, task.loss.inputs[0]).component).output_dim or 0)
            # the similarity matrix and its gradient: 3 * 2 * B * B * d
            return OperatorCost(LOSS_KIND, dim, 1, 0, 1, 0, layer_flops=6.0 * batch * batch * dim,
                                light_flops=0.0, carry_elements=float(dim), out_elements=0.0,
                                saved_elements=4.0 * dim + 2.0 * batch)
        _, st, comp = self.context(ref)
        h, ffn, heads, kind = comp.hidden, comp.ffn_size, comp.heads, comp.kind
        s = w.stage_tokens(task)[st.name]
        out_tokens = w.stage_output_tokens(task)
        m = out_tokens[st.memory] if st.memory else 0
        light = 0.0
        if ref.layer == 0:
            if st.tokens and comp.input is not None and comp.input.type == "features":
                light += 6.0 * batch * st.tokens * int(comp.input.dim or 0) * h
            for src in st.sources:
                src_comp = self.component(_stage(task, src).component)
                light += 6.0 * batch * out_tokens[src] * src_comp.hidden * h
        last = ref.layer == comp.layers - 1
        if last and _is_contrastive_input(task, st.name):
            light += 6.0 * batch * h * (comp.output_dim or 0)
        if last and _is_lm_stage(task, st.name):
            light += 6.0 * batch * st.tokens * h * (comp.vocab or 0)
        if _is_contrastive_input(task, st.name):
            out = float(comp.output_dim or 0)
        elif _is_lm_stage(task, st.name):
            out = 0.0
        else:
            out = float(out_tokens[st.name] * h)
        features = ref.layer == 0 and st.tokens and comp.input is not None \
            and comp.input.type == "features"
        return OperatorCost(
            kind, h, heads, ffn, s, m,
            layer_flops=batch * costmodel.layer_train_flops(kind, h, ffn, s, m),
            light_flops=light, carry_elements=float(s * h + m * h), out_elements=out,
            saved_elements=costmodel.layer_activation_elements(kind, h, ffn, heads, s, m),
            attention_elements=2.0 * heads * s * (s + m),
            input_elements=float(st.tokens * int(comp.input.dim or 0))  # type: ignore[union-attr]
            if features else 0.0,
            logit_elements=float((st.tokens - 1) * int(comp.vocab or 0))
            if last and _is_lm_stage(task, st.name) else 0.0,
        )

    # --- what the built-in model cannot compute --------------------------------------------------
    def check_runnable(self) -> None:
        """Refuse the few valid workloads these modules cannot run (they can still be planned):
        a stage whose output is both a loss input and read by another stage, or an LM stage
        with ``pool_to``."""
        for task in self.workload.tasks:
            consumed = {r for s in task.stages for r in s.sources}
            ends = set(task.loss.inputs) | ({task.loss.stage} if task.loss.stage else set())
            both = sorted(consumed & ends)
            if both:
                raise LayerError(
                    f"task '{task.name}': stage '{both[0]}' feeds both the loss and another stage")
            if task.loss.type == "lm" and _stage(task, str(task.loss.stage)).pool_to:
                raise LayerError(f"task '{task.name}': the LM loss stage cannot use pool_to")


def _stage(task: Task, name: str) -> Stage:
    for st in task.stages:
        if st.name == name:
            return st
    raise LayerError(f"task '{task.name}' has no stage '{name}'")


def _is_contrastive_input(task: Task, stage: str) -> bool:
    return task.loss.type == "contrastive" and stage in task.loss.inputs


def _is_lm_stage(task: Task, stage: str) -> bool:
    return task.loss.type == "lm" and task.loss.stage == stage
