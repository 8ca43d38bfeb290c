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

from spindle.declare.workload import LOSS_STAGE, LayerRef, Task, Workload
from spindle.layers import costmodel
from spindle.plan.contract import LOSS_KIND, MetaOp, OpCost


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
            len(ops), LayerRef(task.name, LOSS_STAGE, "", 0), OpType(LOSS_KIND, "", dim, 1, 0),
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

    metaops: list[MetaOp] = []
    for c, chain in enumerate(chains):
        first = chain[0]
        t = first.optype
        metaops.append(MetaOp(
            id=c, name=f"{first.ref.task}/{first.ref.stage}", task=first.ref.task, kind=t.kind,
            component=t.component, batch=first.batch, level=level[c],
            deps=tuple(sorted(deps[c])), layers=tuple(o.ref for o in chain),
            cost=_cost(w, chain, users[t.component] if t.component else 1),
        ))
    return MetaGraph(w, metaops, ops)


def _cost(w: Workload, chain: list[Operator], shared_by: int) -> OpCost:
    """The cost record of the MetaOp made of ``chain``."""
    first = chain[0]
    t = first.optype
    b, h, s, m = first.batch, t.hidden, first.tokens, first.memory_tokens
    shape = dict(hidden=h, heads=t.heads, ffn=t.ffn, tokens=s, memory_tokens=m)
    if t.kind == LOSS_KIND:
        # similarity matrix and its gradient: 3 * 2 * B * B * d; the learnable temperature
        return OpCost(**shape, flops_per_layer=6.0 * b * b * h, params_per_layer=1,
                      extra_params=0, act_elements_per_sample=float(s * h + m * h),
                      out_elements_per_sample=0.0,
                      saved_elements_per_sample_per_layer=4.0 * h + 2.0 * b)
    extra_flops, extra_params = _light_parts(w, chain)
    block = b * costmodel.layer_train_flops(t.kind, h, t.ffn, s, m)
    task = w.task(first.ref.task)
    stage = next(st for st in task.stages if st.name == first.ref.stage)
    comp = w.components[first.ref.component]
    features = stage.tokens and comp.input is not None and comp.input.type == "features"
    lm = task.loss.type == "lm" and task.loss.stage == stage.name
    return OpCost(
        **shape,
        # the fused light parts are spread evenly over the chain: T_m stays one per-layer time
        flops_per_layer=block + extra_flops / len(chain),
        params_per_layer=costmodel.layer_parameters(t.kind, h, t.ffn),
        extra_params=extra_params,
        act_elements_per_sample=float(s * h + m * h),
        out_elements_per_sample=_output_elements(w, first.ref, t),
        saved_elements_per_sample_per_layer=costmodel.layer_activation_elements(
            t.kind, h, t.ffn, t.heads, s, m),
        attention_elements_per_sample=2.0 * t.heads * s * (s + m),
        input_elements_per_sample=float(stage.tokens * int(comp.input.dim or 0))  # type: ignore[union-attr]
        if features else 0.0,
        logit_elements_per_sample=float((stage.tokens - 1) * int(comp.vocab or 0)) if lm else 0.0,
        shared_by=shared_by,
    )


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
