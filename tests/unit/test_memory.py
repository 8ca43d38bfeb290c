"""Memory model: parameters counted once per device, activation peak, ZeRO stages, and the
runtime's measured memory is tests/distributed/test_zero.py's (benchmarks/memory_bench.py)."""

import dataclasses

import pytest

from spindle.costs.graph import contract
from spindle.costs.memory import (
    FP32,
    MIXED_BF16,
    MemoryLedger,
    memory_model_for,
    memory_report,
    saved_elements_per_layer,
)
from spindle.declare.workload import (
    load_workload,
)
from spindle.layers import provider_for
from spindle.plan.contract import Plan, Slice, Wave


def _plan(w, g, waves, n):
    return Plan("hand", w.name, w.fingerprint(), n, n, "cpu", tuple(g.metaops), tuple(waves))


def _one_device_plan(w, g):
    return _plan(w, g, [Wave((Slice(m.id, 0, m.num_layers, (0,)),)) for m in g.metaops], 1)


def test_bytes_per_parameter():
    # fp32 masters 4 + fp32 grads 4 + moments 8 + autocast's bf16 compute copy 2
    assert MIXED_BF16.state_bytes_per_param == 18
    assert FP32.state_bytes_per_param == 16  # 4 + 4 + 4 + 4
    assert memory_model_for("fp32") == FP32
    with pytest.raises(ValueError, match="precision"):
        memory_model_for("fp8")


def test_shared_parameters_are_counted_once_per_device():
    w = load_workload("tiny-multitask-clip")
    g = contract(w)
    by = {m.name: m for m in g.metaops}
    # everything on one device: every logical parameter of the runtime exactly once
    provider = provider_for(w)
    rep = memory_report(_one_device_plan(w, g), g, FP32)
    assert rep.devices[0].num_params == provider.num_parameters()
    # three text MetaOps (3 tasks) on device 0: the text layers count once there
    texts = [by[f"{t}/text"] for t in ("vision-text", "audio-text", "imu-text")]
    waves = [Wave((Slice(m.id, 0, m.num_layers, (0,)),)) for m in texts]
    rep = memory_report(_plan(w, g, waves, 2), g, FP32)
    one = memory_report(_plan(w, g, waves[:1], 2), g, FP32)
    blocks = sum(m.cost.params_per_layer for m in texts[:1]) * texts[0].num_layers
    # the second and third text MetaOps add only their own last-layer pieces (projection and
    # norm are shared too), so nothing at all
    assert rep.devices[0].num_params == one.devices[0].num_params >= blocks
    assert rep.devices[1].num_params == 0
    # the same MetaOps on two devices: each device holds its copy once
    waves2 = [Wave((Slice(texts[0].id, 0, 2, (0,)), Slice(texts[1].id, 0, 2, (1,)))),
              Wave((Slice(texts[2].id, 0, 2, (1,)),))]
    rep2 = memory_report(_plan(w, g, waves2, 2), g, FP32)
    assert rep2.devices[0].num_params == rep2.devices[1].num_params == one.devices[0].num_params
    assert rep2.devices[0].param_bytes == 16 * one.devices[0].num_params


def test_activation_peak_of_a_hand_made_plan():
    w = load_workload("tiny-multitask-clip")
    g = contract(w)
    vis = g.metaops[0]  # vision-text/vision: 3 layers, batch 8, raw features
    # layers [0,2) on 2 devices, then layer 2 on 1 device (device 0 runs both)
    waves = [Wave((Slice(vis.id, 0, 2, (0, 1)),)), Wave((Slice(vis.id, 2, 3, (0,)),))]
    rep = memory_report(_plan(w, g, waves, 2), g, MIXED_BF16)
    per = saved_elements_per_layer(vis, MIXED_BF16) * 2  # bytes per sample per layer
    raw = 9 * 12 * 2  # 9 tokens x 12 features saved by the input projection, per sample
    d0_saved = 4 * (2 * per + raw) + 8 * per  # 4 rows x 2 layers (+ input), then 8 rows x 1
    assert rep.devices[0].activation_bytes == pytest.approx(d0_saved)
    assert rep.devices[0].transient_bytes == pytest.approx(8 * per)  # the larger of the two
    assert rep.devices[1].activation_bytes == pytest.approx(4 * (2 * per + raw))
    assert rep.devices[1].transient_bytes == pytest.approx(4 * per)
    params = {0: 0, 1: 0}
    for d, layers in ((0, range(3)), (1, range(2))):
        params[d] = sum(sum(g.provider.module_sizes(vis.layers[i]).values()) for i in layers)
    for d in (0, 1):
        dm = rep.devices[d]
        assert dm.param_bytes == 18 * params[d]
        assert dm.grad_bytes == dm.step_grad_bytes == 4 * params[d]  # fp32 gradients
        # the end of forward holds every activation but no gradient; the backward every
        # gradient; AdamW's step the gradients and a temporary as large
        assert dm.total_bytes == pytest.approx(dm.param_bytes - dm.grad_bytes + max(
            max(dm.activation_bytes, dm.grad_bytes) + dm.transient_bytes, 2 * dm.grad_bytes))
    assert rep.peak_bytes == rep.devices[0].total_bytes
    assert rep.imbalance == pytest.approx(rep.peak_bytes / rep.mean_bytes)
    assert rep.fits() and memory_report(_plan(w, g, waves, 2), g, MIXED_BF16, 1.0).over_capacity()


def test_a_contrastive_loss_runs_on_its_first_device_only():
    w = load_workload("tiny-multitask-clip")
    g = contract(w)
    loss = g.metaops[2]
    rep = memory_report(_plan(w, g, [Wave((Slice(loss.id, 0, 1, (1, 0)),))], 2), g, FP32)
    assert rep.devices[1].num_params == 1 and rep.devices[1].activation_bytes > 0
    assert rep.devices[0].total_bytes == 0


@pytest.mark.parametrize("stage, per_param", [(1, 4 + 2 + 4 + 8 / 4), (2, 4 + 2 + 12 / 4)])
def test_zero_shards_optimizer_states_and_gradients_over_the_group(stage, per_param):
    w = load_workload("tiny-multitask-clip")
    g = contract(w)
    vis = g.metaops[0]
    waves = [Wave((Slice(vis.id, 0, 3, (0, 1, 2, 3)),))]
    p = _plan(w, g, waves, 4)
    plain = memory_report(p, g, MIXED_BF16).devices[0]
    zero = memory_report(p, g, memory_model_for("bf16-mixed", zero=stage)).devices[0]
    assert plain.param_bytes == 18 * plain.num_params
    assert zero.param_bytes == pytest.approx(per_param * plain.num_params)
    # the plan's per-MetaOp stage is the same as the override for that MetaOp
    own = memory_report(dataclasses.replace(p, zero={vis.id: stage}), g, MIXED_BF16).devices[0]
    assert own.param_bytes == pytest.approx(zero.param_bytes)
    # the ledger's running charge is an upper bound of the final share
    ledger = MemoryLedger(g, memory_model_for("bf16-mixed", zero=stage), 4)
    ledger.add(waves[0].slices[0])
    assert ledger.param_bytes[0] >= zero.param_bytes - 1e-6


def test_a_pool_on_one_device_is_never_sharded():
    w = load_workload("tiny-multitask-clip")
    g = contract(w)
    vis = g.metaops[0]
    p = _plan(w, g, [Wave((Slice(vis.id, 0, 3, (0,)),))], 1)
    plain = memory_report(p, g, FP32).devices[0]
    sharded = memory_report(dataclasses.replace(p, zero={vis.id: 2}), g, FP32).devices[0]
    assert sharded.param_bytes == plain.param_bytes == 16 * plain.num_params


# --- the model against torch's allocator on CPU -------------------------------------------------
