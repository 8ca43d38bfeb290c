"""The layer providers: modules and parameter names, deterministic initialisation, the analytic
costs against torch's FLOP counter, split-batch equivalence of the operator loop (what the
distributed runtime relies on), synthetic data and the reference trainer."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from spindle.costs.graph import contract
from spindle.declare.workload import (
    LOSS_STAGE,
    LayerRef,
    load_workload,
    workload_from_dict,
)
from spindle.layers import costmodel, provider_for
from spindle.layers.blocks import Block
from spindle.layers.chain import run_chain
from spindle.layers.provider import Activation, LayerError, materialise
from spindle.runtime.data import make_raw, token_range
from spindle.runtime.reference import ReferenceModel, train_reference

TINY = ["tiny-multitask-clip", "tiny-ofasys", "tiny-qwen-val"]
FULL = ["multitask-clip-4", "ofasys-4", "qwen-val-3"]


@pytest.mark.parametrize("kind", ["encoder", "decoder", "llm"])
def test_the_cost_model_counts_the_flops_torch_counts(kind: str) -> None:
    h, heads, ffn, s, m, b = 64, 4, 176, 10, 7, 3
    with torch.device("meta"):
        block = Block(kind, h, heads, ffn)
        x = torch.empty(b, s, h, requires_grad=True)
        mem = torch.empty(b, m, h, requires_grad=True) if kind == "decoder" else None
    with FlopCounterMode(display=False) as forward:
        y = block(x, mem)
    assert forward.get_total_flops() == b * costmodel.layer_forward_flops(kind, h, ffn, s, m)
    with FlopCounterMode(display=False) as both:
        block(x, mem).sum().backward()
    assert both.get_total_flops() == pytest.approx(
        b * costmodel.layer_train_flops(kind, h, ffn, s, m), rel=0.01)
    assert y.shape == x.shape


@pytest.mark.parametrize("name", TINY + FULL)
def test_metaop_parameters_are_the_modules_parameters(name: str) -> None:
    """The graph's per-layer parameters are read off the modules the operators run."""
    w = load_workload(name)
    provider = provider_for(w)
    for m in contract(w, provider).metaops:
        sizes = [provider.module_sizes(ref) for ref in m.layers]
        assert m.cost.params_per_layer == next(iter(sizes[-1].values()))
        assert m.cost.extra_params == sum(sum(list(s.values())[1:]) for s in sizes)
        if not m.is_loss:
            with torch.device("meta"):
                block = provider.build(f"{m.component}.blocks.0")
            assert sum(p.numel() for p in block.parameters()) == m.cost.params_per_layer


@pytest.mark.parametrize("name", TINY)
def test_parameter_names_cover_operators(name: str) -> None:
    w = load_workload(name)
    provider = provider_for(w)
    names = provider.parameter_names()
    assert names == sorted(names) and len(names) == len(set(names))
    for ref in provider.operators():
        used = provider.operator_parameters(ref)
        assert set(used) <= set(names) and all(isinstance(s, tuple) for s in used.values())
        paths = provider.operator_modules(ref)
        assert all(n.startswith(paths) for n in used)
    first = provider.operator_parameters(provider.operators()[0])
    assert any(".input." in n for n in first)
    with pytest.raises(LayerError, match="no component 'nope'"):
        provider.parameter_shapes("nope.blocks.0")


def test_operator_parameters_by_role() -> None:
    w = load_workload("tiny-ofasys")
    p = provider_for(w)
    enc0 = p.operator_parameters(LayerRef("caption", "encode", "lm_encoder", 0))
    assert "lm_encoder.in_proj.vit.weight" in enc0 and "lm_encoder.input.embedding" in enc0
    dec_last = p.operator_parameters(LayerRef("caption", "decode", "lm_decoder", 1))
    assert "lm_decoder.head.weight" in dec_last and "lm_decoder.norm.bias" in dec_last
    assert "lm_decoder.in_proj.lm_encoder.weight" not in dec_last
    clip = provider_for(load_workload("tiny-multitask-clip"))
    loss = LayerRef("vision-text", LOSS_STAGE, "", 0)
    assert clip.operator_parameters(loss) == {"loss.vision-text.logit_scale": ()}
    qwen = provider_for(load_workload("tiny-qwen-val"))
    assert set(qwen.parameter_shapes("llm.norm")) == {"llm.norm.weight"}  # RMSNorm: gain only


def test_initial_values_depend_on_seed_and_name_only() -> None:
    p = provider_for(load_workload("tiny-multitask-clip"))
    name = "text.blocks.0.attn.q.weight"
    a = p.initial_value(name, (8, 8), 3, torch.float32)
    p.initial_value("text.blocks.1.attn.q.weight", (8, 8), 3, torch.float32)  # changes nothing
    assert torch.equal(a, p.initial_value(name, (8, 8), 3, torch.float32))
    assert not torch.equal(a, p.initial_value("text.blocks.1.attn.q.weight", (8, 8), 3,
                                              torch.float32))
    assert not torch.equal(a, p.initial_value(name, (8, 8), 4, torch.float32))
    wide = p.initial_value(name, (8, 8), 3, torch.float64)
    assert wide.dtype == torch.float64 and torch.equal(wide.float(), a)
    assert torch.equal(p.initial_value("text.norm.weight", (4,), 0, torch.float32), torch.ones(4))
    assert torch.equal(p.initial_value("text.blocks.0.mlp.fc1.bias", (4,), 0, torch.float32),
                       torch.zeros(4))
    scale = p.initial_value("loss.t.logit_scale", (), 0, torch.float64)
    assert scale.shape == () and float(scale) == math.log(1 / 0.07)


def test_materialise_builds_only_the_modules_asked_for() -> None:
    p = provider_for(load_workload("tiny-qwen-val"))
    modules = materialise(p, ["llm.blocks.1", "llm.head"], seed=2, dtype=torch.float64)
    assert sorted(modules) == ["llm.blocks.1", "llm.head"]
    for path, module in modules.items():
        for n, prm in module.named_parameters():
            assert prm.device.type == "cpu" and prm.dtype == torch.float64
            assert torch.equal(prm.detach(), p.initial_value(f"{path}.{n}", tuple(prm.shape), 2,
                                                             torch.float64))


def test_workloads_the_modules_cannot_run_can_still_be_planned() -> None:
    d = load_workload("tiny-qwen-val").to_dict()
    d["tasks"][0]["stages"][-1]["pool_to"] = 4  # the LM stage pooled: no next-token targets
    w = workload_from_dict(d)
    assert contract(w).metaops  # the planner can price it
    with pytest.raises(LayerError, match="LM loss stage cannot use pool_to"):
        provider_for(w).check_runnable()
    with pytest.raises(LayerError, match="pool_to"):
        ReferenceModel(w, seed=0)


def test_make_raw_is_deterministic_and_in_range() -> None:
    w = load_workload("tiny-ofasys")
    x = make_raw(w, "caption", "decode", step=2, seed=1)
    assert x is not None and x.dtype == torch.long and x.shape == (8, 6)
    assert torch.equal(x, make_raw(w, "caption", "decode", step=2, seed=1))
    assert not torch.equal(x, make_raw(w, "caption", "decode", step=3, seed=1))
    assert int(x.min()) >= 0 and int(x.max()) < token_range(w, "lm_decoder")
    f = make_raw(w, "caption", "vit", step=2, seed=1)
    assert f is not None and f.dtype == torch.float32 and f.shape == (8, 9, 12)
    data = w.to_dict()
    data["tasks"][0]["stages"][1]["tokens"] = 0  # caption/encode reads only the vit output
    assert make_raw(workload_from_dict(data), "caption", "encode", step=0, seed=1) is None


def _run_rows(w, task: str, modules, raw, rows: slice) -> dict[str, Activation | torch.Tensor]:
    """Every stage of ``task`` on ``rows``, one operator chain per stage, as the runtime does."""
    provider = provider_for(w)
    t = w.task(task)
    out: dict[str, Activation | torch.Tensor] = {}
    local = {s: (None if r is None else r[rows]) for s, r in raw.items()}
    for st in t.stages:
        refs = [LayerRef(task, st.name, st.component, i)
                for i in range(provider.num_layers(st.component))]
        out[st.name] = run_chain(provider, modules, refs, {s: out[s] for s in st.sources}, None,
                                 local, t.batch_size)  # type: ignore[dict-item]
    return out


def _task_loss(w, task: str, modules, raw, splits: list[slice]) -> torch.Tensor:
    t = w.task(task)
    parts = [_run_rows(w, task, modules, raw, rows) for rows in splits]
    if t.loss.type == "lm":
        return sum(p[str(t.loss.stage)] for p in parts)  # type: ignore[return-value]
    full = {s: (torch.cat([p[s][0] for p in parts]),) for s in t.loss.inputs}  # type: ignore[index]
    loss = run_chain(provider_for(w), modules, [LayerRef(task, LOSS_STAGE, "", 0)], full, None,
                     {}, t.batch_size)
    assert isinstance(loss, torch.Tensor)
    return loss


@pytest.mark.parametrize("name", TINY)
def test_split_batch_matches_full_batch(name: str) -> None:
    w = load_workload(name)
    model = ReferenceModel(w, seed=5, dtype=torch.float64)
    modules = model.by_path
    params = model.named_logical_parameters()
    for t in w.tasks:
        # float32 features straight from make_raw, as the executor passes them
        raw = {st.name: make_raw(w, t.name, st.name, step=1, seed=5) for st in t.stages}
        half = t.batch_size // 2
        results = []
        for splits in ([slice(0, t.batch_size)], [slice(0, half), slice(half, t.batch_size)]):
            model.zero_grad(set_to_none=True)
            loss = _task_loss(w, t.name, modules, raw, splits)
            loss.backward()
            results.append((loss.detach(), {n: p.grad for n, p in params.items()}))
        (full_loss, full_grads), (split_loss, split_grads) = results
        assert torch.allclose(full_loss, split_loss, rtol=1e-10, atol=1e-12), t.name
        assert torch.allclose(full_loss, model.task_loss(t.name, 1).detach(), rtol=1e-10)
        for n in params:
            g, h = full_grads[n], split_grads[n]
            assert (g is None) == (h is None), n
            if g is not None:
                assert torch.allclose(g, h, rtol=1e-8, atol=1e-12), (t.name, n)


@pytest.mark.parametrize("name", TINY)
def test_reference_trains(name: str) -> None:
    w = load_workload(name)
    history: list[dict[str, float]] = []
    final = train_reference(w, seed=0, steps=20, lr=3e-3, history=history)
    totals = [sum(h.values()) for h in history]
    assert len(totals) == 20 and all(math.isfinite(x) for x in totals)
    assert sum(totals[-3:]) < 0.9 * sum(totals[:3])
    assert set(final) == set(provider_for(w).parameter_names())
    start = ReferenceModel(w, seed=0).named_logical_parameters()
    assert all(start[n].shape == final[n].shape for n in final)




