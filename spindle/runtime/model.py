"""The model side of the runtime: logical parameters and one operator's computation.

Every operator of the plan (one block invocation, SPINDLE.md section 3) is computed by
:func:`run_operator` from *logical* parameters, named independently of where they live:

- ``{comp}.input.embedding`` [vocab, h] (``tokens`` adapter), or ``{comp}.input.weight`` [h, dim]
  and ``{comp}.input.bias`` [h] (``features`` adapter);
- ``{comp}.in_proj.{src}.weight`` [h, h_src] and ``.bias`` [h]: projects the output of a stage of
  component ``src`` (an ``inputs`` stage or a decoder's ``memory``) to this component's hidden
  size.  Shared by every task that feeds ``src`` into ``comp``.  Not counted by
  :func:`spindle.layers.costmodel.component_parameters` (see :func:`in_proj_parameter_count`);
- ``{comp}.blocks.{i}.*``: block ``i`` (see :func:`block_parameter_shapes`); its size equals
  :func:`spindle.layers.costmodel.layer_parameters` exactly;
- ``{comp}.norm.*`` (final norm), ``{comp}.proj.weight`` [output_dim, h] (contrastive embedding,
  no bias), ``{comp}.head.weight`` [vocab, h] (LM head, no bias);
- ``loss.{task}.logit_scale`` (a scalar, the contrastive temperature, init log(1/0.07)).

Blocks: ``encoder`` = pre-LN bidirectional self-attention + GELU MLP; ``decoder`` = pre-LN causal
self-attention + pre-LN cross-attention to the memory + GELU MLP; ``llm`` = RMSNorm, causal
self-attention (q/k/v/o with biases, as the cost model counts) + SwiGLU MLP without biases.
Positions: a fixed sinusoidal embedding (no parameters) is added to the sequence entering the
first layer of every stage.  The final norm is a LayerNorm, except for ``llm`` components where
it is an RMSNorm (h parameters where the cost model counts 2h).

Every computation is row-wise in the batch except the contrastive loss operator, so an operator
run on rows [i, j) of a batch gives exactly those rows of the full-batch result; the LM loss is
summed over the local rows and divided by the *global* token count, so the scalars returned by
all ranks add up to the task's mean loss.  The contrastive embedding of a stage is the mean over
its output tokens (after the final norm and pooling), projected by ``{comp}.proj``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from typing import Protocol

import torch
import torch.nn.functional as F

from spindle.declare.workload import Component, LayerRef, Stage, Task, Workload

Activation = tuple[torch.Tensor, ...]
"""Batch-first tensors passed between operators: ``(x,)`` or, inside a decoder stage,
``(x, memory)``; a contrastive input stage ends with ``(emb,)``."""

LOSS_STAGE = "loss"
"""``LayerRef.stage`` of a contrastive loss operator (its ``component`` is ``""``)."""

LOGIT_SCALE_INIT = math.log(1.0 / 0.07)
LN_EPS = 1e-5
RMS_EPS = 1e-6


class LayerLike(Protocol):
    """Anything naming an operator: :class:`spindle.plan.contract.LayerRef` or
    :class:`spindle.costs.graph.LayerRef`."""

    task: str
    stage: str
    component: str
    layer: int


class RuntimeModelError(ValueError):
    """A workload or operator the runtime model cannot compute; one line."""


# --- workload lookups --------------------------------------------------------------------------


def is_loss_operator(ref: LayerLike) -> bool:
    return ref.stage == LOSS_STAGE and ref.component == ""


def find_stage(task: Task, name: str) -> Stage:
    for st in task.stages:
        if st.name == name:
            return st
    raise RuntimeModelError(f"task '{task.name}' has no stage '{name}'")


def stage_context(workload: Workload, ref: LayerLike) -> tuple[Task, Stage, Component]:
    """The task, stage and component operator ``ref`` belongs to (not for a loss operator)."""
    task = workload.task(ref.task)
    st = find_stage(task, ref.stage)
    if st.component != ref.component:
        raise RuntimeModelError(
            f"operator {ref}: stage '{st.name}' runs component '{st.component}'"
        )
    comp = workload.components[st.component]
    if not 0 <= ref.layer < comp.layers:
        raise RuntimeModelError(f"operator {ref}: layer out of range 0..{comp.layers - 1}")
    return task, st, comp


def is_contrastive_input(task: Task, stage: str) -> bool:
    return task.loss.type == "contrastive" and stage in task.loss.inputs


def is_lm_stage(task: Task, stage: str) -> bool:
    return task.loss.type == "lm" and task.loss.stage == stage


def needs_raw(workload: Workload, ref: LayerLike) -> bool:
    """Whether :func:`run_operator` needs ``raw`` for ``ref``: at layer 0 of a stage that reads
    raw tokens, and at the last layer of an LM loss stage (its targets)."""
    if is_loss_operator(ref):
        return False
    task, st, comp = stage_context(workload, ref)
    first = ref.layer == 0 and st.tokens > 0
    last = ref.layer == comp.layers - 1 and is_lm_stage(task, st.name)
    return first or last


def operator_input_stages(workload: Workload, ref: LayerLike) -> tuple[str, ...]:
    """Names of the stages whose outputs ``ref`` reads through ``stage_inputs``: the ``inputs``
    and ``memory`` of its stage at layer 0, the two loss inputs for a loss operator, else none."""
    task = workload.task(ref.task)
    if is_loss_operator(ref):
        return tuple(task.loss.inputs)
    _, st, _ = stage_context(workload, ref)
    if ref.layer != 0:
        return ()
    return (*st.inputs, *([st.memory] if st.memory else []))


def returns_loss(workload: Workload, ref: LayerLike) -> bool:
    """Whether ``ref`` returns a scalar loss contribution rather than an :data:`Activation`."""
    if is_loss_operator(ref):
        return True
    task, st, comp = stage_context(workload, ref)
    return ref.layer == comp.layers - 1 and is_lm_stage(task, st.name)


def all_operators(workload: Workload) -> list[LayerRef]:
    """Every operator of every task in a topological order (tasks, stages, layers, loss)."""
    ops: list[LayerRef] = []
    for task in workload.tasks:
        for st in task.stages:
            for layer in range(workload.components[st.component].layers):
                ops.append(LayerRef(task.name, st.name, st.component, layer))
        if task.loss.type == "contrastive":
            ops.append(LayerRef(task.name, LOSS_STAGE, "", 0))
    return ops


def check_supported(workload: Workload) -> None:
    """Raise :class:`RuntimeModelError` for the few valid workloads this model cannot run: a
    stage whose output is both a loss input and read by another stage, or an LM stage with
    ``pool_to``."""
    for task in workload.tasks:
        consumed = {r for s in task.stages for r in (*s.inputs, *([s.memory] if s.memory else []))}
        ends = set(task.loss.inputs) | ({task.loss.stage} if task.loss.stage else set())
        both = sorted(consumed & ends)
        if both:
            raise RuntimeModelError(
                f"task '{task.name}': stage '{both[0]}' feeds both the loss and another stage"
            )
        if task.loss.type == "lm" and find_stage(task, str(task.loss.stage)).pool_to:
            raise RuntimeModelError(f"task '{task.name}': the LM loss stage cannot use pool_to")


# --- parameters --------------------------------------------------------------------------------


def _linear_shapes(
    prefix: str, out: int, inp: int, bias: bool = True
) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {f"{prefix}.weight": (out, inp)}
    if bias:
        shapes[f"{prefix}.bias"] = (out,)
    return shapes


def _norm_shapes(prefix: str, h: int, rms: bool) -> dict[str, tuple[int, ...]]:
    if rms:
        return {f"{prefix}.weight": (h,)}
    return {f"{prefix}.weight": (h,), f"{prefix}.bias": (h,)}


def block_parameter_shapes(
    comp_name: str, comp: Component, layer: int
) -> dict[str, tuple[int, ...]]:
    """Shapes of block ``layer`` of component ``comp_name`` (sum = costmodel.layer_parameters)."""
    h, ffn = comp.hidden, comp.ffn_size
    p = f"{comp_name}.blocks.{layer}"
    rms = comp.kind == "llm"
    shapes = _norm_shapes(f"{p}.norm1", h, rms)
    for x in "qkvo":
        shapes |= _linear_shapes(f"{p}.attn.{x}", h, h)
    if comp.kind == "decoder":
        shapes |= _norm_shapes(f"{p}.norm_cross", h, rms=False)
        for x in "qkvo":
            shapes |= _linear_shapes(f"{p}.cross.{x}", h, h)
    shapes |= _norm_shapes(f"{p}.norm2", h, rms)
    if rms:
        shapes |= _linear_shapes(f"{p}.mlp.gate", ffn, h, bias=False)
        shapes |= _linear_shapes(f"{p}.mlp.up", ffn, h, bias=False)
        shapes |= _linear_shapes(f"{p}.mlp.down", h, ffn, bias=False)
    else:
        shapes |= _linear_shapes(f"{p}.mlp.fc1", ffn, h)
        shapes |= _linear_shapes(f"{p}.mlp.fc2", h, ffn)
    return shapes


def _adapter_shapes(comp_name: str, comp: Component) -> dict[str, tuple[int, ...]]:
    if comp.input is None:
        return {}
    if comp.input.type == "tokens":
        return {f"{comp_name}.input.embedding": (int(comp.input.vocab or 0), comp.hidden)}
    return _linear_shapes(f"{comp_name}.input", comp.hidden, int(comp.input.dim or 0))


def _in_proj_sources(workload: Workload, comp_name: str) -> set[str]:
    """Components whose stage outputs are fed (as inputs or memory) into ``comp_name``."""
    sources: set[str] = set()
    for task in workload.tasks:
        comp_of = {s.name: s.component for s in task.stages}
        for st in task.stages:
            if st.component == comp_name:
                refs = (*st.inputs, *([st.memory] if st.memory else []))
                sources.update(comp_of[r] for r in refs)
    return sources


def component_parameter_shapes(
    workload: Workload, comp_name: str
) -> dict[str, tuple[int, ...]]:
    """Every parameter a component owns: adapter, ``in_proj`` of each source component used in
    the workload, blocks, final norm, and the projection / LM head if the component declares
    them.  Whether an operator actually uses ``proj`` / ``head`` depends on the tasks."""
    comp = workload.components[comp_name]
    shapes = _adapter_shapes(comp_name, comp)
    for src in sorted(_in_proj_sources(workload, comp_name)):
        shapes |= _linear_shapes(
            f"{comp_name}.in_proj.{src}", comp.hidden, workload.components[src].hidden
        )
    for layer in range(comp.layers):
        shapes |= block_parameter_shapes(comp_name, comp, layer)
    shapes |= _norm_shapes(f"{comp_name}.norm", comp.hidden, rms=comp.kind == "llm")
    if comp.output_dim is not None:
        shapes |= _linear_shapes(f"{comp_name}.proj", comp.output_dim, comp.hidden, bias=False)
    if comp.vocab is not None:
        shapes |= _linear_shapes(f"{comp_name}.head", comp.vocab, comp.hidden, bias=False)
    return shapes


def in_proj_parameter_count(workload: Workload, comp_name: str) -> int:
    """Parameters of ``comp_name``'s ``in_proj`` projections (absent from the cost model)."""
    shapes = component_parameter_shapes(workload, comp_name)
    return sum(math.prod(s) for n, s in shapes.items() if n.startswith(f"{comp_name}.in_proj."))


def parameter_shape(workload: Workload, name: str) -> tuple[int, ...]:
    """The shape of logical parameter ``name``."""
    head, _, rest = name.partition(".")
    if head == LOSS_STAGE and rest.endswith(".logit_scale"):
        workload.task(rest.removesuffix(".logit_scale"))  # KeyError for an unknown task
        return ()
    if head not in workload.components:
        raise KeyError(name)
    return component_parameter_shapes(workload, head)[name]


def parameter_names(workload: Workload, ref: LayerLike) -> list[str]:
    """All logical parameter names operator ``ref`` uses (sorted)."""
    if is_loss_operator(ref):
        return [f"{LOSS_STAGE}.{ref.task}.logit_scale"]
    task, st, comp = stage_context(workload, ref)
    c = st.component
    names = list(block_parameter_shapes(c, comp, ref.layer))
    if ref.layer == 0:
        if st.tokens > 0:
            names += list(_adapter_shapes(c, comp))
        comp_of = {s.name: s.component for s in task.stages}
        for src_stage in (*st.inputs, *([st.memory] if st.memory else [])):
            src = comp_of[src_stage]
            names += [f"{c}.in_proj.{src}.weight", f"{c}.in_proj.{src}.bias"]
    if ref.layer == comp.layers - 1:
        names += list(_norm_shapes(f"{c}.norm", comp.hidden, rms=comp.kind == "llm"))
        if is_contrastive_input(task, st.name):
            names.append(f"{c}.proj.weight")
        if is_lm_stage(task, st.name):
            names.append(f"{c}.head.weight")
    return sorted(set(names))


def all_parameter_names(workload: Workload) -> list[str]:
    """Every logical parameter some operator of ``workload`` uses (sorted)."""
    names: set[str] = set()
    for ref in all_operators(workload):
        names.update(parameter_names(workload, ref))
    return sorted(names)


def _seed_of(*key: object) -> int:
    digest = hashlib.sha256(":".join(str(k) for k in key).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def keyed_generator(*key: object) -> torch.Generator:
    """A CPU generator seeded from a sha256 of ``key`` (stable across processes and runs)."""
    g = torch.Generator()
    g.manual_seed(_seed_of(*key))
    return g


def init_parameter(
    name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Initial value of parameter ``name``: a function of (``seed``, ``name``, ``shape``) only.

    Biases 0; norm gains 1; ``logit_scale`` log(1/0.07); token embeddings N(0, 1); every other
    weight N(0, 1/fan_in) with fan_in = ``shape[-1]``.  Drawn in float32 on the CPU from a
    generator keyed by sha256(f"{seed}:{name}"), then cast to ``dtype``.
    """
    leaf = name.rsplit(".", 1)[-1]
    parts = name.split(".")
    if leaf == "logit_scale":
        return torch.full(shape, LOGIT_SCALE_INIT, dtype=dtype)
    if leaf == "bias":
        return torch.zeros(shape, dtype=dtype)
    if len(parts) >= 2 and parts[-2].startswith("norm"):
        return torch.ones(shape, dtype=dtype)
    g = keyed_generator(seed, name)
    std = 1.0 if leaf == "embedding" else 1.0 / math.sqrt(shape[-1])
    return (torch.randn(shape, generator=g, dtype=torch.float32) * std).to(dtype)


# --- layer maths -------------------------------------------------------------------------------


def sinusoidal_positions(tokens: int, hidden: int, like: torch.Tensor) -> torch.Tensor:
    """Fixed [tokens, hidden] sin/cos position embedding (no parameters)."""
    half = (hidden + 1) // 2
    pos = torch.arange(tokens, dtype=torch.float64)[:, None]
    freq = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / half)
    ang = pos * freq
    pe = torch.cat([ang.sin(), ang.cos()], dim=-1)[:, :hidden]
    return pe.to(dtype=like.dtype, device=like.device)


def _linear(p: Mapping[str, torch.Tensor], prefix: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, p[f"{prefix}.weight"], p.get(f"{prefix}.bias"))


def _norm(p: Mapping[str, torch.Tensor], prefix: str, x: torch.Tensor, rms: bool) -> torch.Tensor:
    h = x.shape[-1]
    if rms:
        return F.rms_norm(x, (h,), p[f"{prefix}.weight"], eps=RMS_EPS)
    return F.layer_norm(x, (h,), p[f"{prefix}.weight"], p[f"{prefix}.bias"], eps=LN_EPS)


def _attention(
    p: Mapping[str, torch.Tensor], prefix: str, x: torch.Tensor, kv: torch.Tensor, heads: int,
    causal: bool,
) -> torch.Tensor:
    b, t, h = x.shape
    s, d = kv.shape[1], h // heads
    q = _linear(p, f"{prefix}.q", x).view(b, t, heads, d).transpose(1, 2)
    k = _linear(p, f"{prefix}.k", kv).view(b, s, heads, d).transpose(1, 2)
    v = _linear(p, f"{prefix}.v", kv).view(b, s, heads, d).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return _linear(p, f"{prefix}.o", o.transpose(1, 2).reshape(b, t, h))


def block_forward(
    comp: Component, prefix: str, p: Mapping[str, torch.Tensor], x: torch.Tensor,
    memory: torch.Tensor | None = None,
) -> torch.Tensor:
    """One block ``prefix`` (= ``{comp}.blocks.{i}``) of kind ``comp.kind`` on x [b, t, h]."""
    rms = comp.kind == "llm"
    causal = comp.kind != "encoder"
    y = _norm(p, f"{prefix}.norm1", x, rms)
    x = x + _attention(p, f"{prefix}.attn", y, y, comp.heads, causal)
    if comp.kind == "decoder":
        if memory is None:
            raise RuntimeModelError(f"{prefix}: a decoder block needs a memory")
        y = _norm(p, f"{prefix}.norm_cross", x, rms=False)
        x = x + _attention(p, f"{prefix}.cross", y, memory, comp.heads, causal=False)
    y = _norm(p, f"{prefix}.norm2", x, rms)
    if rms:
        gate = F.linear(y, p[f"{prefix}.mlp.gate.weight"])
        up = F.linear(y, p[f"{prefix}.mlp.up.weight"])
        return x + F.linear(F.silu(gate) * up, p[f"{prefix}.mlp.down.weight"])
    return x + _linear(p, f"{prefix}.mlp.fc2", F.gelu(_linear(p, f"{prefix}.mlp.fc1", y)))


# --- operators ---------------------------------------------------------------------------------


def _embed(
    workload: Workload, task: Task, st: Stage, comp: Component, p: Mapping[str, torch.Tensor],
    stage_inputs: Mapping[str, Activation], raw: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """First layer's input: projected ``inputs`` then own raw tokens, plus positions; and the
    projected memory of a decoder stage."""
    c = st.component
    comp_of = {s.name: s.component for s in task.stages}
    pieces = [
        _linear(p, f"{c}.in_proj.{comp_of[src]}", stage_inputs[src][0]) for src in st.inputs
    ]
    if st.tokens > 0:
        if raw is None:
            raise RuntimeModelError(f"{task.name}/{st.name}: layer 0 needs raw input")
        if comp.input is not None and comp.input.type == "tokens":
            pieces.append(F.embedding(raw, p[f"{c}.input.embedding"]))
        else:  # features: follow the parameters' dtype (make_raw gives float32)
            pieces.append(_linear(p, f"{c}.input", raw.to(p[f"{c}.input.weight"].dtype)))
    x = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
    expect = workload.stage_tokens(task)[st.name]
    if x.shape[1] != expect:
        raise RuntimeModelError(
            f"{task.name}/{st.name}: {x.shape[1]} tokens enter the stage, expected {expect}"
        )
    x = x + sinusoidal_positions(x.shape[1], comp.hidden, x)
    memory = None
    if st.memory is not None:
        memory = _linear(p, f"{c}.in_proj.{comp_of[st.memory]}", stage_inputs[st.memory][0])
    return x, memory


def _finish(
    task: Task, st: Stage, comp: Component, p: Mapping[str, torch.Tensor], x: torch.Tensor,
    raw: torch.Tensor | None, global_batch: int,
) -> Activation | torch.Tensor:
    """After the last block: final norm, pooling, then embedding / LM loss / hidden states."""
    c = st.component
    x = _norm(p, f"{c}.norm", x, rms=comp.kind == "llm")
    if st.pool_to is not None:
        x = F.adaptive_avg_pool1d(x.transpose(1, 2), st.pool_to).transpose(1, 2)
    if is_contrastive_input(task, st.name):
        return (F.linear(x.mean(dim=1), p[f"{c}.proj.weight"]),)
    if is_lm_stage(task, st.name):
        if raw is None:
            raise RuntimeModelError(f"{task.name}/{st.name}: the LM loss needs the raw tokens")
        t = st.tokens
        logits = F.linear(x[:, -t:-1], p[f"{c}.head.weight"])
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), raw[:, 1:].reshape(-1),
                              reduction="sum")
        return nll / (global_batch * (t - 1))
    return (x,)


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a full batch of paired embeddings a, b [B, d]."""
    a = F.normalize(a, dim=-1)
    b = F.normalize(b, dim=-1)
    logits = logit_scale.exp() * a @ b.T
    labels = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def run_operator(
    workload: Workload, ref: LayerLike, params: Mapping[str, torch.Tensor],
    carry: Activation | None, stage_inputs: Mapping[str, Activation],
    raw: torch.Tensor | None, global_batch: int,
) -> Activation | torch.Tensor:
    """Compute operator ``ref`` on the local rows of the batch.

    ``carry``: the previous layer's output in the same stage (``None`` at layer 0).
    ``stage_inputs``: stage name -> output, for :func:`operator_input_stages` (layer 0 and the
    loss operator, which gets both embeddings for the FULL batch).  ``raw``: this stage's raw
    input rows where :func:`needs_raw`.  ``global_batch``: the task's whole batch size, which
    normalises the LM loss.  Returns the next :data:`Activation`, or a scalar: the local share
    of the task's loss (LM stage) or the whole contrastive loss (loss operator).
    """
    if is_loss_operator(ref):
        a, b = workload.task(ref.task).loss.inputs
        scale = params[f"{LOSS_STAGE}.{ref.task}.logit_scale"]
        return contrastive_loss(stage_inputs[a][0], stage_inputs[b][0], scale)
    task, st, comp = stage_context(workload, ref)
    if ref.layer == 0:
        x, memory = _embed(workload, task, st, comp, params, stage_inputs, raw)
    else:
        if carry is None:
            raise RuntimeModelError(f"operator {ref}: layer {ref.layer} needs the carry")
        x, memory = carry[0], (carry[1] if len(carry) > 1 else None)
    x = block_forward(comp, f"{st.component}.blocks.{ref.layer}", params, x, memory)
    if ref.layer < comp.layers - 1:
        return (x, memory) if memory is not None else (x,)
    return _finish(task, st, comp, params, x, raw, global_batch)


def parameter_count(workload: Workload, names: Iterable[str]) -> int:
    """Total elements of the named logical parameters."""
    return sum(math.prod(parameter_shape(workload, n)) for n in names)
