"""The runtime's model side: parameters vs the cost model, deterministic init and data,
split-batch equivalence of run_operator (what the distributed runtime relies on), the reference
trainer, and the DDP baseline against the reference."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spindle.declare.workload import LayerRef, load_workload, workload_from_dict
from spindle.layers import costmodel
from spindle.runtime.data import make_raw, token_range
from spindle.runtime.model import (
    LOSS_STAGE,
    Activation,
    all_operators,
    all_parameter_names,
    block_parameter_shapes,
    component_parameter_shapes,
    in_proj_parameter_count,
    init_parameter,
    needs_raw,
    operator_input_stages,
    parameter_names,
    parameter_shape,
    returns_loss,
    run_operator,
)
from spindle.runtime.reference import ReferenceModel, train_reference

TINY = ["tiny-multitask-clip", "tiny-ofasys", "tiny-qwen-val"]
FULL = ["multitask-clip-4", "ofasys-4", "qwen-val-3"]


@pytest.mark.parametrize("name", TINY + FULL)
def test_parameter_counts_match_costmodel(name: str) -> None:
    w = load_workload(name)
    for c, comp in w.components.items():
        for layer in (0, comp.layers - 1):
            block = block_parameter_shapes(c, comp, layer)
            assert sum(math.prod(s) for s in block.values()) == costmodel.layer_parameters(
                comp.kind, comp.hidden, comp.ffn_size
            )
        total = sum(math.prod(s) for s in component_parameter_shapes(w, c).values())
        # known difference: in_proj projections depend on the tasks, not the component alone
        expected = costmodel.component_parameters(comp) + in_proj_parameter_count(w, c)
        assert total == expected, c


@pytest.mark.parametrize("name", TINY)
def test_parameter_names_cover_operators(name: str) -> None:
    w = load_workload(name)
    names = all_parameter_names(w)
    assert names == sorted(names) and len(names) == len(set(names))
    for ref in all_operators(w):
        used = parameter_names(w, ref)
        assert used == sorted(used) and set(used) <= set(names)
        for n in used:
            assert isinstance(parameter_shape(w, n), tuple)
    first = parameter_names(w, all_operators(w)[0])
    assert any(".input." in n for n in first)
    with pytest.raises(KeyError):
        parameter_shape(w, "nope.blocks.0.attn.q.weight")


def test_operator_parameters_by_role() -> None:
    w = load_workload("tiny-ofasys")
    enc0 = parameter_names(w, LayerRef("caption", "encode", "lm_encoder", 0))
    assert "lm_encoder.in_proj.vit.weight" in enc0 and "lm_encoder.input.embedding" in enc0
    dec_last = parameter_names(w, LayerRef("caption", "decode", "lm_decoder", 1))
    assert "lm_decoder.head.weight" in dec_last and "lm_decoder.norm.bias" in dec_last
    assert "lm_decoder.in_proj.lm_encoder.weight" not in dec_last
    clip = load_workload("tiny-multitask-clip")
    loss = LayerRef("vision-text", LOSS_STAGE, "", 0)
    assert parameter_names(clip, loss) == ["loss.vision-text.logit_scale"]
    assert parameter_shape(clip, "loss.vision-text.logit_scale") == ()


def test_init_parameter_is_deterministic_and_independent() -> None:
    a = init_parameter("text.blocks.0.attn.q.weight", (8, 8), seed=3)
    init_parameter("text.blocks.1.attn.q.weight", (8, 8), seed=3)  # drawing others changes nothing
    assert torch.equal(a, init_parameter("text.blocks.0.attn.q.weight", (8, 8), seed=3))
    assert not torch.equal(a, init_parameter("text.blocks.1.attn.q.weight", (8, 8), seed=3))
    assert not torch.equal(a, init_parameter("text.blocks.0.attn.q.weight", (8, 8), seed=4))
    wide = init_parameter("text.blocks.0.attn.q.weight", (8, 8), 3, torch.float64)
    assert wide.dtype == torch.float64 and torch.equal(wide.float(), a)
    assert torch.equal(init_parameter("text.norm.weight", (4,), 0), torch.ones(4))
    assert torch.equal(init_parameter("text.blocks.0.mlp.fc1.bias", (4,), 0), torch.zeros(4))
    scale = init_parameter("loss.t.logit_scale", (), 0)
    assert scale.shape == () and math.isclose(float(scale), math.log(1 / 0.07), rel_tol=1e-6)


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


def _run_rows(
    w, task: str, params: dict[str, torch.Tensor], raw: dict[str, torch.Tensor | None], rows: slice
) -> dict[str, Activation | torch.Tensor]:
    """Run every stage of ``task`` operator by operator on ``rows``, as the executor does."""
    t = w.task(task)
    out: dict[str, Activation | torch.Tensor] = {}
    for st in t.stages:
        carry = None
        for layer in range(w.components[st.component].layers):
            ref = LayerRef(task, st.name, st.component, layer)
            ins = {s: out[s] for s in operator_input_stages(w, ref)}
            r = raw[st.name][rows] if needs_raw(w, ref) else None  # type: ignore[index]
            carry = run_operator(
                w, ref, params, carry, ins, r, t.batch_size  # type: ignore[arg-type]
            )
            assert isinstance(carry, torch.Tensor) == returns_loss(w, ref)
        out[st.name] = carry  # type: ignore[assignment]
    return out


def _task_loss(w, task: str, params, raw, splits: list[slice]) -> torch.Tensor:
    t = w.task(task)
    parts = [_run_rows(w, task, params, raw, rows) for rows in splits]
    if t.loss.type == "lm":
        return sum(p[str(t.loss.stage)] for p in parts)  # type: ignore[return-value]
    full = {s: (torch.cat([p[s][0] for p in parts]),) for s in t.loss.inputs}  # type: ignore[index]
    loss_op = LayerRef(task, LOSS_STAGE, "", 0)
    loss = run_operator(w, loss_op, params, None, full, None, t.batch_size)
    assert isinstance(loss, torch.Tensor)
    return loss


@pytest.mark.parametrize("name", TINY)
def test_split_batch_matches_full_batch(name: str) -> None:
    w = load_workload(name)
    model = ReferenceModel(w, seed=5, dtype=torch.float64)
    params = model.named_logical_parameters()
    for t in w.tasks:
        # float32 features straight from make_raw, as the executor passes them
        raw = {st.name: make_raw(w, t.name, st.name, step=1, seed=5) for st in t.stages}
        half = t.batch_size // 2
        results = []
        for splits in ([slice(0, t.batch_size)], [slice(0, half), slice(half, t.batch_size)]):
            model.zero_grad(set_to_none=True)
            loss = _task_loss(w, t.name, params, raw, splits)
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
    assert set(final) == set(all_parameter_names(w))
    start = ReferenceModel(w, seed=0).named_logical_parameters()
    assert all(start[n].shape == final[n].shape for n in final)


def _ddp_worker(rank: int, world: int, store: str, out: str, names: list[str]) -> None:
    from spindle.runtime.ddp_baseline import run_ddp_baseline

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        results = {}
        for name in names:
            r = run_ddp_baseline(load_workload(name), steps=2, seed=7, warmup=1,
                                 dtype=torch.float64, return_parameters=True)
            results[name] = (r["parameters"], r["iteration_s"], r["losses"], r["grad_norms"])
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def test_ddp_baseline_matches_reference(tmp_path: Path) -> None:
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(out), TINY), nprocs=2, join=True)
    results = torch.load(out)
    for name in TINY:
        params, times, losses, grad_norms = results[name]
        assert len(times) == 2 and all(x > 0 for x in times)
        w = load_workload(name)
        assert list(losses) == [t.name for t in w.tasks]
        history: list[dict[str, float]] = []
        ref = train_reference(w, seed=7, steps=3, dtype=torch.float64, history=history)
        for task, value in losses.items():
            assert math.isclose(value, history[-1][task], rel_tol=1e-9), (name, task)
        # Adam hides a uniform gradient scale, so check the loss scaling on the raw gradients
        model = ReferenceModel(w, seed=7, dtype=torch.float64)
        torch.stack(list(model(0).values())).sum().backward()
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        assert math.isclose(grad_norms[0], float(norm), rel_tol=1e-9), name
        assert set(params) == set(ref)
        for n, p in ref.items():
            assert torch.allclose(params[n], p, rtol=1e-7, atol=1e-10), (name, n)
