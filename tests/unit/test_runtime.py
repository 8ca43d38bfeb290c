"""The runtime engine's parts, in process: row re-splitting, localisation, parameter pools and
sync buckets, metrics, one rank without torchrun, the launcher's arguments and output."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from spindle.declare.workload import load_workload
from spindle.layers import provider_for
from spindle.layers.provider import parameter_index
from spindle.plan.contract import Plan, Slice, Wave
from spindle.plan.layout import (
    ParameterIndex,
    RowRange,
    iter_slices,
    parameter_pools,
    parameter_use,
    pieces,
    slice_rows,
    sync_buckets,
)
from spindle.runtime.config import RunConfig
from spindle.runtime.edges import TransmissionSchedule
from spindle.runtime.localise import executing_ranks, localise, rows_on
from spindle.runtime.metrics import PHASES, RankIteration, combine_ranks
from tests.fixtures import synthetic_graph
from tests.plans import (
    WORKLOADS,
    demanding_mixed_plan,
    is_demanding,
    sequential_hand_plan,
)

# --- row re-splitting ----------------------------------------------------------------------------


def _layout(devices: tuple[int, ...], batch: int) -> list[tuple[int, RowRange]]:
    per = batch // len(devices)
    return [(d, RowRange(k * per, (k + 1) * per)) for k, d in enumerate(devices)]


def test_four_devices_to_two_resplits_rows() -> None:
    moves = pieces(_layout((0, 1, 2, 3), 8), _layout((2, 0), 8))
    got = [(p.src, p.dst, p.rows.start, p.rows.end) for p in moves]
    assert got == [(2, 0, 4, 6), (3, 0, 6, 8), (0, 2, 0, 2), (1, 2, 2, 4)]
    first = moves[0]  # rows 4..6: the start of rank 2's rows, the start of rank 0's rows
    assert (first.src_index(), first.dst_index()) == (slice(0, 2), slice(0, 2))
    assert moves[1].dst_index() == slice(2, 4)
    assert [p.is_local for p in moves] == [False, False, False, False]


def test_two_devices_to_four_and_same_group_is_local() -> None:
    moves = pieces(_layout((0, 1), 8), _layout((0, 1, 2, 3), 8))
    assert [(p.src, p.dst, p.rows.start, p.src_index()) for p in moves] == [
        (0, 0, 0, slice(0, 2)), (0, 1, 2, slice(2, 4)), (1, 2, 4, slice(0, 2)),
        (1, 3, 6, slice(2, 4)),
    ]
    same = pieces(_layout((3, 1), 4), _layout((3, 1), 4))
    assert all(p.is_local for p in same) and len(same) == 2


def test_contrastive_loss_runs_on_the_first_device_with_the_whole_batch() -> None:
    w = load_workload("tiny-multitask-clip")
    plan = sequential_hand_plan(w, 4)
    for _, s in iter_slices(plan.waves):
        m = plan.metaops[s.metaop]
        if m.kind == "contrastive":
            assert s.n == 4
            whole = ((s.devices[0], RowRange(0, m.batch)),)
            assert slice_rows(plan.metaops[s.metaop], s.devices) == whole
            assert executing_ranks(plan, s) == (s.devices[0],)
            assert rows_on(plan, s, s.devices[1]) is None


@pytest.mark.parametrize("workload", WORKLOADS)
def test_every_slice_gets_each_of_its_rows_exactly_once(workload: str) -> None:
    plan = demanding_mixed_plan(load_workload(workload), 4)
    schedule = TransmissionSchedule.build(plan)
    for ref, s in iter_slices(plan.waves):
        m = plan.metaops[s.metaop]
        edges = schedule.inputs_of.get(ref, ())
        assert len(edges) == (1 if s.layer_start > 0 else len(m.deps))
        for e in edges:
            assert e.producer.wave < ref.wave
            for rank, rows in slice_rows(plan.metaops[s.metaop], s.devices):
                mine = sorted((p.rows.start, p.rows.end) for p in e.pieces if p.dst == rank)
                assert mine[0][0] == rows.start and mine[-1][1] == rows.end
                assert all(a[1] == b[0] for a, b in zip(mine, mine[1:]))


# --- localisation and parameter pools ----------------------------------------------------------


def test_each_rank_builds_only_the_modules_it_runs_from_name_and_seed() -> None:
    w = load_workload("tiny-ofasys")
    provider = provider_for(w)
    plan = demanding_mixed_plan(w, 4)
    seen: set[str] = set()
    for rank in range(4):
        local = localise(provider, plan, rank, seed=3, dtype=torch.float64)
        runs = {path for _, s in iter_slices(plan.waves) if rank in executing_ranks(plan, s)
                for ref in plan.metaops[s.metaop].layers[s.layer_start:s.layer_end]
                for path in provider.operator_modules(ref)}
        assert set(local.modules) == runs
        assert set(local.params) == {n for p in runs for n in provider.parameter_shapes(p)}
        for name, p in local.params.items():
            want = provider.initial_value(name, tuple(p.shape), 3, torch.float64)
            assert torch.equal(p.detach(), want)
        seen |= set(local.params)
    assert sorted(seen) == provider.parameter_names()


def _bucket_plan() -> tuple[Plan, ParameterIndex]:
    """Four one-layer MetaOps, one per wave, using the keys ``solo`` on (0,), ``b`` on (0, 1),
    ``d`` on (0, 1, 2), ``a`` and ``c`` on (0, 1): ready waves 0, 1, 2, 3, 3."""
    graph = synthetic_graph([1] * 4, batches=[48] * 4)
    uses = [{"solo": 1}, {"b": 1}, {"d": 1}, {"a": 2, "c": 1}]
    devices = [(0,), (0, 1), (0, 1, 2), (0, 1)]
    plan = Plan("hand", "t", "0", 3, 3, "", tuple(graph.metaops),
                tuple(Wave((Slice(i, 0, 1, devices[i]),)) for i in range(4)))
    index = ParameterIndex(graph.metaops, lambda ref: uses[int(ref.task[1:])])
    return plan, index


def test_pools_group_parameters_by_device_group_in_order_of_their_first_key() -> None:
    plan, index = _bucket_plan()
    holds, ready = parameter_use(plan, index)
    pools = {g: [index.names[i] for i in ids] for g, ids in parameter_pools(holds).items()}
    assert pools == {(0,): ["solo"], (0, 1): ["b", "a", "c"], (0, 1, 2): ["d"]}
    assert dict(zip(index.names, ready.tolist())) == {"solo": 0, "b": 1, "d": 2, "a": 3, "c": 3}


def test_ready_waves_are_the_earliest_wave_using_a_parameter() -> None:
    w = load_workload("tiny-qwen-val")
    provider = provider_for(w)
    plan = sequential_hand_plan(w, 2)
    index = parameter_index(provider, plan.metaops)
    _, ready_of = parameter_use(plan, index)
    ready = dict(zip(index.names, ready_of.tolist()))
    assert {n for path in ready for n in provider.parameter_shapes(path)} == set(
        provider.parameter_names())
    for name, wave in ready.items():
        using = [wi for wi, wv in enumerate(plan.waves) for s in wv.slices
                 for ref in plan.metaops[s.metaop].layers[s.layer_start:s.layer_end]
                 if name in provider.operator_modules(ref)]
        assert wave == min(using), name
    # the LLM is shared by the three tasks: final only after the first task's LM wave
    assert len(set(ready.values())) > 1


def test_sync_buckets_follow_the_ready_waves_and_the_size_caps() -> None:
    plan, index = _bucket_plan()
    holds, ready = parameter_use(plan, index)
    mib = 1 << 20

    def buckets(cap: float, least: float, waves=ready) -> list[tuple[tuple[str, ...], int]]:
        return [(tuple(index.names[k] for k in b.keys), b.ready_wave)
                for b in sync_buckets(index, holds, waves, mib, cap, least)]

    # launch order: descending ready wave; one-rank pools are never synced
    assert buckets(25 * mib, mib) == [(("a", "c"), 3), (("d",), 2), (("b",), 1)]
    assert buckets(2.5 * mib, mib) == [(("a",), 3), (("c",), 3), (("d",), 2), (("b",), 1)]
    # below the minimum a bucket runs on past a ready-wave change: it is final at the later
    assert buckets(25 * mib, 8 * mib) == [(("d",), 2), (("a", "c", "b"), 1)]
    # without ready waves (no overlap): one bucket per pool, final at the end (wave 0)
    assert buckets(25 * mib, mib, 0 * ready) == [(("a", "b", "c"), 0), (("d",), 0)]


def _layered_plan() -> tuple[Plan, ParameterIndex]:
    """MetaOp 0 (3 layers) on devices (0, 1) in waves 0 and 1 (layers [0, 1) then [1, 3)),
    layer ``j`` using the key ``w<j>`` (4 MiB each at 1 byte per element)."""
    graph = synthetic_graph([3], batches=[8])
    plan = Plan("hand", "t", "0", 2, 2, "", tuple(graph.metaops),
                (Wave((Slice(0, 0, 1, (0, 1)),)), Wave((Slice(0, 1, 3, (0, 1)),))))
    index = ParameterIndex(graph.metaops, lambda ref: {f"w{ref.layer}": 4 << 20})
    return plan, index


def test_ready_fractions_place_a_key_inside_its_ready_wave_backward() -> None:
    from spindle.plan.layout import ready_fractions

    plan, index = _layered_plan()
    holds, ready = parameter_use(plan, index)
    fraction = dict(zip(index.names, ready_fractions(plan, index, ready).tolist()))
    # wave 1 runs layers [1, 3) backward from layer 2: w2 after 1 of 2 layers, w1 after both
    assert fraction == {"w0": 1.0, "w1": 1.0, "w2": 0.5}
    got = [(tuple(index.names[k] for k in b.keys), b.ready_wave, b.ready_fraction)
           for b in sync_buckets(index, holds, ready, 1, min_bucket_bytes=0,
                                 fraction=ready_fractions(plan, index, ready))]
    assert got == [(("w2",), 1, 0.5), (("w1",), 1, 1.0), (("w0",), 0, 1.0)]
    # wave-granular: every key final at its wave's end, so w1 and w2 share a ready point
    got = [(tuple(index.names[k] for k in b.keys), b.ready_wave, b.ready_fraction)
           for b in sync_buckets(index, holds, ready, 1, min_bucket_bytes=0)]
    assert got == [(("w1", "w2"), 1, 1.0), (("w0",), 0, 1.0)]


def test_layer_granular_sync_launches_a_bucket_inside_the_backward(monkeypatch) -> None:
    """A bucket is launched from the post-accumulate-grad hook of its last parameter, before the
    backward reaches the layers below it; buckets always launch in the plan's order."""
    from spindle.runtime import param_groups

    events: list[str] = []

    class Recorder:
        def __init__(self, grads: list[torch.Tensor], group: object, dtype: object) -> None:
            self.nbytes = 0
            events.append("launch " + ",".join(names_of[id(g)] for g in grads))

        def wait(self) -> None:
            pass

    monkeypatch.setattr(param_groups, "BucketSum", Recorder)
    plan, index = _layered_plan()
    members = {f"w{j}": {f"w{j}": (1,)} for j in range(3)}
    for start in ("layer", "wave"):
        events.clear()
        params = {f"w{j}": torch.nn.Parameter(torch.tensor([1.0 + j])) for j in range(3)}
        names_of: dict[int, str] = {}

        def naming(name: str):  # noqa: ANN202
            def hook(p: torch.Tensor) -> None:
                names_of[id(p.grad)] = name
                if name == "w1":
                    events.append("grad w1")
            return hook

        for name in params:  # before the groups' own hooks: they fire in registration order
            params[name].register_post_accumulate_grad_hook(naming(name))
        groups = param_groups.ParameterGroups(plan, index, members, 0, 1, min_bucket_bytes=0,
                                              sync_start=start)
        groups.attach(params)
        x = torch.ones(1)
        h0 = (x * params["w0"]).detach().requires_grad_(True)  # wave 0's output, a leaf of wave 1
        for wave in (1, 0):
            groups.begin_backward(wave)
            if wave == 1:
                ((h0 * params["w1"]) * params["w2"]).sum().backward()
            else:
                (x * params["w0"]).backward(h0.grad)
            events.append(f"end {wave}")
            groups.launch_ready(wave, params)
        groups.finish(params)
        if start == "layer":
            assert events == ["launch w2", "grad w1", "launch w1", "end 1", "launch w0", "end 0"]
        else:
            # (16 MiB of float32 each: w1 and w2 do not fit one 25 MiB bucket)
            assert events == ["grad w1", "end 1", "launch w1", "launch w2", "end 0", "launch w0"]


def test_combine_ranks_takes_the_slowest_phase_and_sums_bytes_and_losses() -> None:
    tasks = ["t1", "t2"]
    a = RankIteration(1.0, 0.1, {p: 0.1 for p in PHASES}, 100, 50, 8, {"t1": 0.5})
    b = RankIteration(2.0, 0.2, {p: 0.3 for p in PHASES}, 10, 5, 8, {"t1": 0.25, "t2": 1.0})
    rec = combine_ranks("x", "spindle", 4, tasks, [a.to_vector(tasks), b.to_vector(tasks)], 1.5)
    assert rec.time_s == 2.0 and rec.compute_s == 0.3 and rec.rank_time_s == [1.0, 2.0]
    assert (rec.bytes_sent, rec.bytes_sent_forward, rec.bytes_sent_backward) == (165, 110, 55)
    assert rec.losses == {"t1": 0.75, "t2": 1.0} and rec.loss == 1.75
    assert json.loads(rec.to_json())["planner"] == "spindle"


def test_one_rank_without_torchrun_trains_like_the_reference() -> None:
    """World size 1 needs no process group: every piece is a local view."""
    from spindle.runtime.executor import TrainingRun
    from spindle.runtime.reference import train_reference

    w = load_workload("tiny-qwen-val")
    run = TrainingRun(w, demanding_mixed_plan(w, 1), 0, 1, torch.device("cpu"),
                      RunConfig(seed=5, dtype="float64"))
    for step in range(2):
        outcome = run.step(step)
        assert outcome.rank_iteration.bytes_forward == 0
    want = train_reference(w, 5, 2, dtype=torch.float64)
    got = run.gather_parameters()
    assert got is not None and sorted(got) == sorted(want)
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-10, rtol=1e-10), name


def _saved_bytes_of_steps(run: object, steps: int) -> int:
    """Run ``steps`` steps of ``run`` (a TrainingRun); the bytes autograd saved for backward
    through its ordinary saved-tensor path meanwhile."""
    kept = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for step in range(steps):
            run.step(step)  # type: ignore[attr-defined]
    return kept[0]


@pytest.mark.parametrize("workload", WORKLOADS)
def test_recompute_trains_exactly_like_the_run_without_it(workload: str) -> None:
    """``--recompute`` (torch.utils.checkpoint per operator): float64 parameters after 3 steps
    equal the run without it, and the checkpoints are engaged: almost nothing is saved for
    backward through autograd's ordinary saved-tensor path (the checkpoints keep only each
    operator's inputs, their own way)."""
    from spindle.runtime.executor import TrainingRun

    w = load_workload(workload)
    got: dict[bool, dict[str, torch.Tensor]] = {}
    saved: dict[bool, int] = {}
    for recompute in (False, True):
        run = TrainingRun(w, demanding_mixed_plan(w, 1), 0, 1, torch.device("cpu"),
                          RunConfig(seed=3, dtype="float64", recompute=recompute))
        saved[recompute] = _saved_bytes_of_steps(run, 3)
        params = run.gather_parameters()
        assert params is not None
        got[recompute] = params
    for name, want in got[False].items():
        assert torch.allclose(got[True][name], want, atol=1e-12, rtol=1e-12), name
    assert saved[True] < 0.1 * saved[False], saved


def test_the_runtime_recomputes_what_the_plan_says() -> None:
    """A plan's memory strategy (its recomputed MetaOps) is executed: float64 parameters equal
    the reference's, and the checkpoints are engaged (almost nothing saved the ordinary way)."""
    from spindle.runtime.executor import TrainingRun
    from spindle.runtime.reference import train_reference

    w = load_workload("tiny-ofasys")
    plain = demanding_mixed_plan(w, 1)
    recomputing = dataclasses.replace(
        plain, recompute=tuple(m.id for m in plain.metaops if not m.is_loss))
    saved = {}
    for label, plan in (("plain", plain), ("recompute", recomputing)):
        run = TrainingRun(w, plan, 0, 1, torch.device("cpu"), RunConfig(seed=2, dtype="float64"))
        saved[label] = _saved_bytes_of_steps(run, 2)
        got = run.gather_parameters()
        assert got is not None
        want = train_reference(w, 2, 2, dtype=torch.float64)
        for name in want:
            assert torch.allclose(got[name], want[name], atol=1e-10, rtol=1e-10), (label, name)
    assert saved["recompute"] < 0.1 * saved["plain"], saved


def test_bf16_mixed_keeps_float32_masters_and_follows_the_float32_losses() -> None:
    """bf16-mixed: the parameters and AdamW state stay float32, the layers compute in bfloat16,
    and the loss of each of 50 steps is within 2% of the float32 run's (measured: 0.1%)."""
    from spindle.runtime.executor import TrainingRun

    w = load_workload("tiny-qwen-val")
    curves: dict[str, list[float]] = {}
    for precision in ("fp32", "bf16-mixed"):
        run = TrainingRun(w, demanding_mixed_plan(w, 1), 0, 1, torch.device("cpu"),
                          RunConfig(seed=0, precision=precision))
        seen: set[torch.dtype] = set()
        for module in run.local.modules.values():
            for m in module.modules():
                if isinstance(m, torch.nn.Linear):
                    m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
        curves[precision] = [sum(run.step(s).rank_iteration.task_losses.values())
                             for s in range(50)]
        assert {p.dtype for p in run.local.params.values()} == {torch.float32}
        assert run.optimizer is not None
        assert {t.dtype for st in run.optimizer.state.values() for t in st.values()
                if t.is_floating_point()} == {torch.float32}
        assert seen == ({torch.bfloat16} if precision == "bf16-mixed" else {torch.float32})
    for a, b in zip(curves["fp32"], curves["bf16-mixed"], strict=True):
        assert abs(b - a) <= 0.02 * abs(a), (a, b)
    assert curves["bf16-mixed"] != curves["fp32"]  # bfloat16 did round something


def test_bf16_mixed_is_refused_in_one_line_where_it_cannot_run(monkeypatch) -> None:
    from spindle.runtime import config as config_module
    from spindle.runtime.config import ConfigError, check_autocast

    with pytest.raises(ConfigError, match="--precision bf16-mixed with --dtype float64"):
        RunConfig(precision="bf16-mixed", dtype="float64").check()

    def no_autocast(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no bfloat16 here")

    monkeypatch.setattr(config_module.torch, "autocast", no_autocast)
    with pytest.raises(ConfigError, match="CPU device cannot compute in bfloat16"):
        check_autocast(torch.device("cpu"), torch.bfloat16)


# --- the torchrun entry -----------------------------------------------------------------------
















# --- the launcher ----------------------------------------------------------------------------




def test_spindle_train_carries_every_run_option_to_every_rank(tmp_path: Path) -> None:
    """One config object: whatever ``spindle train`` is given reaches the torchrun entry as the
    same :class:`RunConfig`, field by field (none can be forgotten between them)."""
    from spindle.tools.launcher import add_train_arguments, train_arguments
    from spindle.tools.train import build_parser

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    plan = tmp_path / "plan.json"
    plain = train_arguments(parser.parse_args(["tiny-ofasys"]), plan)
    assert plain == ["tiny-ofasys", "--plan", str(plan)]
    changed = RunConfig(steps=3, seed=4, lr=0.5, weight_decay=0.25, clip=2.0, dtype="float64",
                        device="cpu", save="out", metrics="m.jsonl", timeout=9.0,
                        overlap_sync=False, min_bucket_bytes=7, progress=False,
                        data_workers=2, checkpoint_dir="ck", checkpoint_every=4, keep=1,
                        resume=True, sync_start="wave", recompute=True, precision="fp64",
                        reduce_dtype="bf16", zero=2, transfer_chunks=3)
    assert all(getattr(changed, f.name) != f.default for f in dataclasses.fields(RunConfig))
    launcher_args = parser.parse_args(["tiny-ofasys", *changed.to_argv()])
    entry_args = build_parser().parse_args(train_arguments(launcher_args, plan))
    assert RunConfig.from_args(entry_args) == changed


@pytest.mark.parametrize("argv, needle", [
    (["--steps", "-1"], "--steps -1"), (["--lr", "nan"], "--lr nan"), (["--timeout", "0"],
     "--timeout 0"), (["--clip", "-1"], "--clip -1"), (["--min-bucket-bytes", "-2"],
     "--min-bucket-bytes -2"), (["--transfer-chunks", "0"], "--transfer-chunks 0"),
])
def test_bad_run_options_are_one_line_before_anything_starts(argv: list[str], needle: str) -> None:
    from spindle.runtime.config import ConfigError
    from spindle.tools.launcher import add_train_arguments, run_train_command

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    with pytest.raises(ConfigError, match=needle):
        run_train_command(parser.parse_args(["tiny-ofasys", "--nproc", "1", *argv]))


def test_launcher_hides_torchrun_report_but_not_rank_lines() -> None:
    import io
    import os

    from spindle.tools.launcher import _forward_without_torchrun_report

    text = (
        "bar 10%\rbar 50%\r"
        "spindle.train: rank 1: injected failure\n"
        "E1125 15:19:42.655000 15569 .venv/lib/python3.11/site-packages/torch/distributed/"
        "elastic/multiprocessing/api.py:1002] failed (exitcode: 1)\n"
        "Traceback (most recent call last):\n  File \"run.py\", line 1, in <module>\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
        "=====\nspindle.train FAILED\n=====\n"
    )
    r, w = os.pipe()
    os.write(w, text.encode())
    os.close(w)
    out = io.StringIO()
    with os.fdopen(r, "rb") as src:
        _forward_without_torchrun_report(src, out)
    assert out.getvalue() == "bar 10%\rbar 50%\rspindle.train: rank 1: injected failure\n"


def test_one_line_reasons() -> None:
    from spindle.tools.train import TrainError, _one_line

    assert _one_line(TrainError("plan is for 4 devices")) == "plan is for 4 devices"
    gloo = RuntimeError("[/x/gloo/pair.cc:553] Connection closed by peer [127.0.0.1]:42. More.")
    assert _one_line(gloo) == (
        "lost contact with another rank (it failed or stopped): Connection closed by peer"
        " [127.0.0.1]:42")
    assert _one_line(KeyError("w")) == "KeyError: 'w'"


def test_plan_helpers_cover_side_by_side_waves() -> None:
    plan = demanding_mixed_plan(load_workload("tiny-qwen-val"), 4)
    assert any(len(w.slices) > 1 for w in plan.waves)
    assert isinstance(plan.waves[0], Wave) and isinstance(plan.waves[0].slices[0], Slice)


def test_mixed_plans_are_valid_and_demanding() -> None:
    for name in WORKLOADS:
        w = load_workload(name)
        for n in (2, 4):
            plan = demanding_mixed_plan(w, n)
            assert is_demanding(plan)
            re_split = sum(
                1 for wv in plan.waves for s in wv.slices
                if s.layer_start > 0 or plan.metaops[s.metaop].deps
            )
            assert re_split > 0


