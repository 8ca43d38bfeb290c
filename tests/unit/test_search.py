"""Sync-aware planning (spindle.planner.search): Spindle's plan is chosen by the whole simulated
iteration, so it is never slower in the simulator than any baseline's plan."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spindle.declare.workload import Workload, workload_from_dict
from spindle.plan.checks import plan_from_dict
from spindle.plan.contract import PlanError
from spindle.planner.pipeline import BASELINES, evaluate, make_context
from spindle.planner.placement import PlacementError
from spindle.planner.registry import PlanningError


@st.composite
def workloads(draw: st.DrawFn) -> Workload:
    """2-4 encoders of mixed sizes, optionally a decoder LM, and 1-6 tasks: contrastive pairs of
    encoders, or an encoder feeding the decoder (an LM loss).  On such workloads the wavefront
    schedule alone (``sync_aware=False``) is slower than some baseline in 8 of 40 random draws
    (by up to 1.5x; measured when this test was written), so the test can fail."""
    comps: dict[str, dict] = {}
    for i in range(draw(st.integers(2, 4))):
        hidden = draw(st.sampled_from([256, 512, 1024, 2048]))
        comps[f"enc{i}"] = {"kind": "encoder", "layers": draw(st.integers(1, 24)),
                            "hidden": hidden, "heads": hidden // 64,
                            "input": {"type": "features", "dim": 64}, "output_dim": 256}
    encoders = sorted(comps)
    with_lm = draw(st.booleans())
    if with_lm:
        hidden = draw(st.sampled_from([1024, 2048, 4096]))
        comps["lm"] = {"kind": "decoder", "layers": draw(st.integers(2, 32)), "hidden": hidden,
                       "heads": hidden // 128, "input": {"type": "tokens", "vocab": 32000},
                       "vocab": 32000}
    tasks = []
    for t in range(draw(st.integers(1, 6))):
        batch = draw(st.sampled_from([8, 16, 32, 64, 128, 256]))
        if with_lm and draw(st.booleans()):
            enc = draw(st.sampled_from(encoders))
            tasks.append({"name": f"t{t}", "batch_size": batch, "stages": [
                {"name": "a", "component": enc, "tokens": draw(st.sampled_from([16, 64, 256]))},
                {"name": "d", "component": "lm", "tokens": draw(st.sampled_from([32, 128])),
                 "memory": "a"}], "loss": {"type": "lm", "stage": "d"}})
        else:
            a, b = draw(st.permutations(encoders))[:2]
            tasks.append({"name": f"t{t}", "batch_size": batch, "stages": [
                {"name": "a", "component": a, "tokens": draw(st.sampled_from([16, 64, 256]))},
                {"name": "b", "component": b, "tokens": draw(st.sampled_from([16, 77]))}],
                "loss": {"type": "contrastive", "inputs": ["a", "b"]}})
    return workload_from_dict({"name": "random", "components": comps, "tasks": tasks})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), st.sampled_from([1, 2, 3, 4, 8, 12, 16, 32, 48, 64]),
       st.sampled_from([1, 4, 8]), st.booleans())
def test_spindle_is_never_slower_than_any_baseline(w: Workload, n: int, per_node: int,
                                                   memory: bool) -> None:
    ctx = make_context(w, n, min(per_node, n), check_memory=memory)
    try:
        ours = evaluate(ctx, "spindle")
    except (PlanningError, PlacementError):
        return  # nothing fits (with the memory check) or no valid count: no plan to compare
    for name in BASELINES:
        try:
            theirs = evaluate(ctx, name)
        except (PlanningError, PlacementError):
            continue  # this baseline cannot plan or fit
        assert ours.simulation.makespan_s <= theirs.simulation.makespan_s * (1 + 1e-9), (
            f"{name}: {theirs.simulation.makespan_s} < spindle {ours.simulation.makespan_s}")


def test_the_plan_records_what_the_search_chose() -> None:
    ctx = make_context("ofasys-4", 64, 8, check_memory=False)
    res = evaluate(ctx, "spindle")
    choice = res.plan.choice
    assert set(choice) == {"schedule", "placement", "searched", "memory"}
    labels = {"wavefront", "wavefront-bfs-levels", "wavefront-rebalance", "wavefront-shortest",
              *BASELINES}
    assert choice["schedule"] in labels
    again = plan_from_dict(res.plan.to_dict())
    assert again.choice == choice
    # the schedule alone (no search) is a candidate of the search: never faster
    alone = evaluate(make_context("ofasys-4", 64, 8, check_memory=False, sync_aware=False))
    assert set(alone.plan.choice) == {"memory"}
    assert res.simulation.makespan_s <= alone.simulation.makespan_s * (1 + 1e-12)


def test_the_planner_recomputes_only_when_the_plan_does_not_fit_without() -> None:
    """On 1.9 MB devices (ZeRO fixed off) tiny-ofasys fits only with recomputation: the plan
    says so, its memory is modelled with it, and its simulated compute pays the second
    forward."""
    import dataclasses

    from spindle.planner.simulator import simulate

    def plan_on(megabytes: float):  # noqa: ANN202
        return evaluate(make_context("tiny-ofasys", 2, 2, "cpu", zero=0,
                                     device_memory_gib=megabytes * 1e6 / 2**30))

    roomy, tight = plan_on(3.2), plan_on(1.9)
    assert roomy.plan.recompute == () and roomy.plan.choice["memory"] == "none"
    ops = tight.plan.metaops
    # recomputation where it is needed (per MetaOp: the others were undone where it still fits)
    assert tight.plan.recompute and set(tight.plan.recompute) <= {m.id for m in ops
                                                                  if not m.is_loss}
    assert tight.plan.choice["memory"].startswith("recompute")
    assert tight.memory.fits() and tight.memory.peak_bytes <= 1.9e6
    again = plan_from_dict(tight.plan.to_dict())
    assert again.recompute == tight.plan.recompute
    ctx = make_context("tiny-ofasys", 2, 2, "cpu", zero=0)
    without = simulate(dataclasses.replace(tight.plan, recompute=()), ctx.graph, ctx.estimator,
                       ctx.links)
    assert tight.simulation.compute_s > without.compute_s
    # a baseline is held to the same memory and gets the same strategy
    assert evaluate(make_context("tiny-ofasys", 2, 2, "cpu", device_memory_gib=1.9e6 / 2**30,
                                 zero=0), "sequential").memory.fits()


@pytest.mark.parametrize("workload, devices, planner", [
    ("qwen-val-3", 32, "spindle"), ("qwen-val-3", 64, "spindle"), ("ofasys-4", 16, "spindle"),
    ("qwen-val-3", 32, "sequential"),
])
def test_the_chosen_memory_strategy_is_the_fastest_that_fits(
    workload: str, devices: int, planner: str
) -> None:
    """Every uniform strategy the user could fix (``--zero``, ``--recompute``) either does not
    fit or simulates no faster than the planner's own choice, which fits, give or take 2%: a
    strategy chosen on a placement made under another is placed again with the chosen schedule
    only (not the whole search; ofasys-4 at 16 devices: 131.2 ms against 129.5 ms with
    ``--zero 1``, whose own search picks another schedule)."""
    chosen = evaluate(make_context(workload, devices), planner)
    assert chosen.memory.fits(), workload
    for zero in (0, 1, 2):
        for recompute in (False, True):
            try:
                fixed = evaluate(make_context(workload, devices, zero=zero, recompute=recompute),
                                 planner)
            except PlacementError:
                continue
            assert fixed.memory.fits()
            assert chosen.simulation.makespan_s <= fixed.simulation.makespan_s * 1.02, (
                f"zero {zero}, recompute {recompute}: {fixed.simulation.makespan_s} <"
                f" {chosen.simulation.makespan_s}")


def test_the_memory_strategy_is_carried_by_the_plan_file() -> None:
    res = evaluate(make_context("qwen-val-3", 64))
    again = plan_from_dict(res.plan.to_dict())
    assert again.zero == res.plan.zero and again.recompute == res.plan.recompute
    assert again.zero and set(again.zero.values()) <= {1, 2}
    with pytest.raises(PlanError, match="zero stage 3"):
        plan_from_dict({**res.plan.to_dict(), "zero": {"0": 3}})


def test_memory_bound_plan_is_never_slower_than_a_baselines_own_plan() -> None:
    """A draw the property test found: on 2 devices under memory pressure the sequential
    baseline fits with recompute + ZeRO-1 and, refined per MetaOp, beats the schedule Spindle's
    search picked under uniform recomputation (2.75 vs 3.17 s); and with a smaller task the
    search's first placement did not fit a later schedule (it raised IndexError)."""
    enc = {"kind": "encoder", "layers": 1, "hidden": 256, "heads": 4,
           "input": {"type": "features", "dim": 64}, "output_dim": 256}
    for batch in (64, 16):
        comps: dict[str, dict] = {f"enc{i}": dict(enc) for i in range(4)}
        comps["lm"] = {"kind": "decoder", "layers": 12, "hidden": 4096, "heads": 32,
                       "input": {"type": "tokens", "vocab": 32000}, "vocab": 32000}
        tasks = [{"name": f"t{t}", "batch_size": b, "stages": [
            {"name": "a", "component": "enc0", "tokens": 16},
            {"name": "d", "component": "lm", "tokens": tok, "memory": "a"}],
            "loss": {"type": "lm", "stage": "d"}}
            for t, (b, tok) in enumerate([(8, 32), (batch, 128), (256, 128)])]
        w = workload_from_dict({"name": "random", "components": comps, "tasks": tasks})
        ctx = make_context(w, 2, 1, check_memory=True)
        ours = evaluate(ctx, "spindle").simulation.makespan_s
        for name in BASELINES:
            assert ours <= evaluate(ctx, name).simulation.makespan_s * (1 + 1e-9), (batch, name)
