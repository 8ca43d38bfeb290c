"""Graph contraction: the operator DAG of all tasks, contracted into MetaOps and MetaLevels.

An *operator* is one layer invocation on one task's data (SPINDLE.md section 3).  Every stage of
every task contributes a chain of operators, one per block of its component; a contrastive loss is
one more operator reading the two encoder stages.  The light parts (input adapter, concatenation
of inputs, final norm, pooling, output projection, LM head and LM loss) are fused into the first
or last block operator of their stage: they cost little and never need their own devices.

Contraction walks the DAG in topological order and merges operator ``i`` into its successor ``j``
when ``i`` has out-degree 1, ``j`` has in-degree 1, and both have the same operator type and the
same input shape.  The operator type includes the component (the parameters it runs), so a chain
never mixes two components' layers.  A *MetaOp* is a maximal merged chain of ``L`` identical
layers; its *MetaLevel* is its depth in the MetaGraph (longest path from a source), so MetaOps of
one level never depend on each other.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from spindle.declare.workload import Task, Workload
from spindle.layers import costmodel

LOSS_KIND = "contrastive"


@dataclass(frozen=True)
class LayerRef:
    """Which layer an operator runs: ``layer`` of ``component`` inside ``stage`` of ``task``.
    For a contrastive loss operator, ``component`` is ``""`` and ``stage`` is ``"loss"``."""

    task: str
    stage: str
    component: str
    layer: int


@dataclass(frozen=True)
class OpType:
    """What makes two operators mergeable (together with their input shape)."""

    kind: str
    component: str
    hidden: int
    heads: int
    ffn: int


@dataclass(frozen=True)
class Operator:
    id: int
    ref: LayerRef
    optype: OpType
    batch: int
    tokens: int  # sequence length per sample entering the layer
    memory_tokens: int  # cross-attention memory length (decoder), else 0


@dataclass(frozen=True)
class MetaOp:
    """A chain of ``num_layers`` identical layers on one task's data, with one T_m(n)."""

    id: int
    name: str
    task: str
    kind: str
    component: str
    layers: tuple[LayerRef, ...]
    batch: int
    tokens: int
    memory_tokens: int
    hidden: int
    heads: int
    ffn: int
    deps: tuple[int, ...]
    level: int
    out_elements_per_sample: float  # elements handed to each consumer after the last layer
    extra_flops: float = 0.0  # fwd+bwd FLOPs of the fused light parts (adapters, projection, LM head)
    extra_params: int = 0  # parameters of those parts
    shared_by: int = 1  # MetaOps (this one included) that run the same component's parameters

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def is_loss(self) -> bool:
        return self.kind == LOSS_KIND

    @property
    def flops_per_layer(self) -> float:
        """Forward + backward FLOPs of one layer over the whole batch."""
        if self.is_loss:
            # similarity matrix and its gradient: 3 * 2 * B * B * d
            return 6.0 * self.batch * self.batch * self.hidden
        block = self.batch * costmodel.layer_train_flops(
            self.kind, self.hidden, self.ffn, self.tokens, self.memory_tokens
        )
        # the fused light parts are spread evenly over the chain, so T_m stays one per-layer time
        return block + self.extra_flops / self.num_layers

    @property
    def params_per_layer(self) -> int:
        if self.is_loss:
            return 1  # the learnable temperature
        return costmodel.layer_parameters(self.kind, self.hidden, self.ffn)

    @property
    def act_elements_per_sample(self) -> float:
        """Elements passed from one layer to the next inside the chain (hidden states, plus the
        cross-attention memory a decoder carries along)."""
        return float(self.tokens * self.hidden + self.memory_tokens * self.hidden)

    @property
    def saved_elements_per_sample_per_layer(self) -> float:
        if self.is_loss:
            return 4.0 * self.hidden + 2.0 * self.batch
        return costmodel.layer_activation_elements(
            self.kind, self.hidden, self.ffn, self.heads, self.tokens, self.memory_tokens
        )


@dataclass
class MetaGraph:
    """The contracted graph: MetaOps (ids 0..M-1, topologically ordered) and their levels."""

    workload: Workload
    metaops: list[MetaOp]
    operators: list[Operator] = field(repr=False)

    @property
    def levels(self) -> list[list[MetaOp]]:
        out: list[list[MetaOp]] = [[] for _ in range(1 + max(m.level for m in self.metaops))]
        for m in self.metaops:
            out[m.level].append(m)
        return out

    def consumers(self, metaop_id: int) -> list[MetaOp]:
        return [m for m in self.metaops if metaop_id in m.deps]

    def shared_parameter_groups(self) -> dict[tuple[str, int], list[int]]:
        """(component, layer) -> MetaOps that run that layer's parameters."""
        groups: dict[tuple[str, int], list[int]] = defaultdict(list)
        for m in self.metaops:
            for ref in m.layers:
                if ref.component:
                    groups[(ref.component, ref.layer)].append(m.id)
        return dict(groups)


def build_operator_graph(w: Workload) -> tuple[list[Operator], list[tuple[int, int]]]:
    """All operators of all tasks, in a topological order, and the edges between them."""
    ops: list[Operator] = []
    edges: list[tuple[int, int]] = []
    for task in w.tasks:
        _task_operators(w, task, ops, edges)
    return ops, edges


def _task_operators(
    w: Workload, task: Task, ops: list[Operator], edges: list[tuple[int, int]]
) -> None:
    seq = w.stage_tokens(task)
    out_tok = w.stage_output_tokens(task)
    last_op: dict[str, int] = {}
    for st in task.stages:
        comp = w.components[st.component]
        optype = OpType(comp.kind, st.component, comp.hidden, comp.heads, comp.ffn_size)
        mem = out_tok[st.memory] if st.memory else 0
        prev: list[int] = [last_op[r] for r in (*st.inputs, *([st.memory] if st.memory else []))]
        for layer in range(comp.layers):
            op = Operator(
                len(ops), LayerRef(task.name, st.name, st.component, layer), optype,
                task.batch_size, seq[st.name], mem,
            )
            ops.append(op)
            edges.extend((p, op.id) for p in prev)
            prev = [op.id]
        last_op[st.name] = prev[0]
    if task.loss.type == "contrastive":
        a, b = task.loss.inputs
        dim = _stage_component(w, task, a).output_dim or 0
        op = Operator(
            len(ops), LayerRef(task.name, "loss", "", 0), OpType(LOSS_KIND, "", dim, 1, 0),
            task.batch_size, 1, 0,
        )
        ops.append(op)
        edges.append((last_op[a], op.id))
        edges.append((last_op[b], op.id))


def _stage_component(w: Workload, task: Task, stage: str):
    for st in task.stages:
        if st.name == stage:
            return w.components[st.component]
    raise KeyError(stage)


def contract(w: Workload) -> MetaGraph:
    """Contract the operator graph of ``w`` into MetaOps and assign MetaLevels."""
    ops, edges = build_operator_graph(w)
    succ: dict[int, list[int]] = defaultdict(list)
    pred: dict[int, list[int]] = defaultdict(list)
    for a, b in edges:
        succ[a].append(b)
        pred[b].append(a)

    def mergeable(i: Operator, j: Operator) -> bool:
        return (
            len(succ[i.id]) == 1
            and len(pred[j.id]) == 1
            and i.optype == j.optype
            and (i.batch, i.tokens, i.memory_tokens) == (j.batch, j.tokens, j.memory_tokens)
        )

    # ops are already topologically ordered (stages in declaration order, layers in order)
    chain_of: dict[int, int] = {}
    chains: list[list[Operator]] = []
    for op in ops:
        p = pred[op.id]
        if len(p) == 1 and mergeable(ops[p[0]], op):
            c = chain_of[p[0]]
            chains[c].append(op)
        else:
            c = len(chains)
            chains.append([op])
        chain_of[op.id] = c

    deps: list[set[int]] = [set() for _ in chains]
    for a, b in edges:
        ca, cb = chain_of[a], chain_of[b]
        if ca != cb:
            deps[cb].add(ca)
    level = [0] * len(chains)
    for c in range(len(chains)):  # chains are created in topological order
        level[c] = 1 + max((level[d] for d in deps[c]), default=-1)

    users: dict[str, int] = defaultdict(int)
    for chain in chains:
        users[chain[0].optype.component] += 1

    consumers_of: dict[int, list[int]] = defaultdict(list)
    for c, ds in enumerate(deps):
        for d in ds:
            consumers_of[d].append(c)

    metaops: list[MetaOp] = []
    for c, chain in enumerate(chains):
        first = chain[0]
        t = first.optype
        name = f"{first.ref.task}/{first.ref.stage}"
        out_elems = _output_elements(w, first.ref, t)
        extra_flops, extra_params = _light_parts(w, chain) if t.kind != LOSS_KIND else (0.0, 0)
        metaops.append(
            MetaOp(
                id=c, name=name, task=first.ref.task, kind=t.kind, component=t.component,
                layers=tuple(o.ref for o in chain), batch=first.batch, tokens=first.tokens,
                memory_tokens=first.memory_tokens, hidden=t.hidden, heads=t.heads, ffn=t.ffn,
                deps=tuple(sorted(deps[c])), level=level[c], out_elements_per_sample=out_elems,
                extra_flops=extra_flops, extra_params=extra_params,
                shared_by=users[t.component] if t.component else 1,
            )
        )
    return MetaGraph(w, metaops, ops)


def _output_elements(w: Workload, ref: LayerRef, t: OpType) -> float:
    """Per-sample elements a stage hands to its consumers: the pooled projected embedding for a
    contrastive loss, else the hidden states of its output tokens.  A loss hands nothing."""
    if t.kind == LOSS_KIND:
        return 0.0
    task = w.task(ref.task)
    if task.loss.type == "contrastive" and ref.stage in task.loss.inputs:
        comp = w.components[ref.component]
        return float(comp.output_dim or 0)
    if task.loss.type == "lm" and ref.stage == task.loss.stage:
        return 0.0
    return float(w.stage_output_tokens(task)[ref.stage] * t.hidden)


def _light_parts(w: Workload, chain: list[Operator]) -> tuple[float, int]:
    """FLOPs (fwd+bwd, whole batch) and parameters of the light parts fused into a chain: the
    input adapter and input projections at a stage's first layer; final norm, output projection
    and LM head at its last layer."""
    flops, params = 0.0, 0
    for op in chain:
        ref = op.ref
        task = w.task(ref.task)
        comp = w.components[ref.component]
        stage = next(s for s in task.stages if s.name == ref.stage)
        b, h = op.batch, comp.hidden
        if ref.layer == 0:
            if stage.tokens and comp.input is not None and comp.input.type == "features":
                flops += 6.0 * b * stage.tokens * comp.input.dim * h  # type: ignore[operator]
                params += comp.input.dim * h + h  # type: ignore[operator]
            elif stage.tokens and comp.input is not None:
                params += comp.input.vocab * h  # type: ignore[operator]
            out_tok = w.stage_output_tokens(task)
            for src in (*stage.inputs, *([stage.memory] if stage.memory else [])):
                src_comp = w.components[next(s for s in task.stages if s.name == src).component]
                flops += 6.0 * b * out_tok[src] * src_comp.hidden * h
                params += src_comp.hidden * h + h
        if ref.layer == comp.layers - 1:
            params += 2 * h
            if task.loss.type == "contrastive" and ref.stage in task.loss.inputs:
                flops += 6.0 * b * h * (comp.output_dim or 0)
                params += h * (comp.output_dim or 0)
            if task.loss.type == "lm" and ref.stage == task.loss.stage:
                flops += 6.0 * b * stage.tokens * h * (comp.vocab or 0)
                params += h * (comp.vocab or 0)
    return flops, params
