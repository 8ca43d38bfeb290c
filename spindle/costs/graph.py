"""Graph contraction: the operator DAG of all tasks, contracted into MetaOps and MetaLevels.

An *operator* is one layer invocation on one task's data (docs/method.md section 3).  Every
stage of every task contributes a chain of operators, one per layer of its component; a
contrastive loss is one more operator reading the two stages it compares.  The light parts
(input adapter, input projections, final norm, pooling, output projection, LM head and LM loss)
are fused into the first or last operator of their stage: they cost little and never need their
own devices.  What an operator runs and costs comes from the workload's layer provider
(:mod:`spindle.layers`); which stages feed which comes from the declaration.

Contraction walks the DAG in topological order and merges operator ``i`` into its successor ``j``
when ``i`` has out-degree 1, ``j`` has in-degree 1, and both have the same operator type and the
same input shape.  The operator type includes the component (the parameters it runs), so a chain
never mixes two components' layers.  A *MetaOp* is a maximal merged chain of ``L`` identical
layers; its *MetaLevel* is its depth in the MetaGraph (longest path from a source), so MetaOps of
one level never depend on each other.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass, field

from spindle.declare.workload import LayerRef, Workload
from spindle.layers import provider_for
from spindle.layers.provider import LayerProvider, OperatorCost, parameter_index
from spindle.plan.contract import MetaOp, OpCost
from spindle.plan.layout import ParameterIndex


@dataclass(frozen=True)
class Operator:
    id: int
    ref: LayerRef
    batch: int
    cost: OperatorCost

    @property
    def merge_key(self) -> tuple[object, ...]:
        """What makes two operators mergeable: the component, the operator type and the input
        shape."""
        c = self.cost
        return (self.ref.component, c.kind, c.hidden, c.heads, c.ffn, self.batch, c.tokens,
                c.memory_tokens, c.variant)


@dataclass
class MetaGraph:
    """The contracted graph: MetaOps (ids 0..M-1, topologically ordered) and their levels."""

    workload: Workload
    provider: LayerProvider
    metaops: list[MetaOp]
    operators: list[Operator] = field(repr=False)

    @property
    def levels(self) -> list[list[MetaOp]]:
        out: list[list[MetaOp]] = [[] for _ in range(1 + max(m.level for m in self.metaops))]
        for m in self.metaops:
            out[m.level].append(m)
        return out

    @functools.cached_property
    def parameter_index(self) -> ParameterIndex:
        """The modules every operator runs, by module path (shared with the runtime)."""
        return parameter_index(self.provider, self.metaops)


def build_operator_graph(
    w: Workload, provider: LayerProvider
) -> tuple[list[Operator], list[tuple[int, int]]]:
    """All operators of all tasks, in a topological order, and the edges between them."""
    ops: list[Operator] = []
    edges: list[tuple[int, int]] = []
    last_op: dict[tuple[str, str], int] = {}  # (task, stage) -> its last operator
    for ref in provider.operators():
        task = w.task(ref.task)
        op = Operator(len(ops), ref, task.batch_size, provider.operator_cost(ref, task.batch_size))
        if ref.is_loss:
            prev = [last_op[(ref.task, s)] for s in task.loss.inputs]
        elif ref.layer == 0:
            st = next(s for s in task.stages if s.name == ref.stage)
            prev = [last_op[(ref.task, s)] for s in st.sources]
        else:
            prev = [last_op[(ref.task, ref.stage)]]
        ops.append(op)
        edges.extend((p, op.id) for p in prev)
        last_op[(ref.task, ref.stage)] = op.id
    return ops, edges


def contract(w: Workload, provider: LayerProvider | None = None) -> MetaGraph:
    """Contract the operator graph of ``w`` into MetaOps and assign MetaLevels."""
    provider = provider or provider_for(w)
    ops, edges = build_operator_graph(w, provider)
    succ: dict[int, list[int]] = defaultdict(list)
    pred: dict[int, list[int]] = defaultdict(list)
    for a, b in edges:
        succ[a].append(b)
        pred[b].append(a)

    def mergeable(i: Operator, j: Operator) -> bool:
        return len(succ[i.id]) == 1 and len(pred[j.id]) == 1 and i.merge_key == j.merge_key

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
        users[chain[0].ref.component] += 1

    flow = provider.gradient_flow()
    metaops: list[MetaOp] = []
    for c, chain in enumerate(chains):
        first = chain[0]
        component = first.ref.component
        metaops.append(MetaOp(
            id=c, name=f"{first.ref.task}/{first.ref.stage}", task=first.ref.task,
            kind=first.cost.kind, component=component, batch=first.batch, level=level[c],
            deps=tuple(sorted(deps[c])), layers=tuple(o.ref for o in chain),
            cost=_cost(provider, chain, users[component] if component else 1),
            backward=any(flow[o.ref][1] for o in chain),
        ))
    return MetaGraph(w, provider, metaops, ops)


def _cost(provider: LayerProvider, chain: list[Operator], shared_by: int) -> OpCost:
    """The cost record of the MetaOp made of ``chain``: the first operator's shape, the light
    parts' FLOPs spread evenly over the chain (so that T_m stays one per-layer time), and the
    parameters of the modules the operators run (the layer's own, the light parts')."""
    first, last = chain[0].cost, chain[-1].cost
    light_flops = 0.0
    layer_params = extra_params = 0
    total = trained = 0
    for op in chain:
        light_flops += op.cost.light_flops
        sizes = list(provider.module_sizes(op.ref).values()) or [0]  # a loss may have none
        layer_params, extra_params = sizes[0], extra_params + sum(sizes[1:])
        total += sum(sizes)
        trained += sum(provider.trainable_size(p) for p in provider.operator_modules(op.ref))
    return OpCost(
        hidden=first.hidden, heads=first.heads, ffn=first.ffn, tokens=first.tokens,
        memory_tokens=first.memory_tokens,
        flops_per_layer=first.layer_flops + light_flops / len(chain),
        params_per_layer=layer_params, extra_params=extra_params,
        act_elements_per_sample=first.carry_elements, out_elements_per_sample=last.out_elements,
        saved_elements_per_sample_per_layer=first.saved_elements,
        attention_elements_per_sample=first.attention_elements,
        input_elements_per_sample=first.input_elements,
        logit_elements_per_sample=last.logit_elements, shared_by=shared_by,
        grad_share=trained / total if total else 1.0,
    )
