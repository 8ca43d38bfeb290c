"""Reading a plan and checking it: every plan the runtime or a tool reads passes here.

:func:`validate_plan` checks: every slice is placed; every layer of every MetaOp is scheduled
exactly once; devices are within ``num_devices`` and disjoint within a wave; every group size
divides its MetaOp's batch; every input of a slice (:func:`spindle.plan.layout.slice_inputs`) is
computed in an earlier wave; and, given the workload's contraction, that the plan's MetaOps are
exactly those.  Every failure is one :class:`~spindle.plan.contract.PlanError` line.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from spindle.plan.contract import ZERO_STAGES, MetaOp, Plan, PlanError
from spindle.plan.layout import slice_inputs
from spindle.validation import read_user_file


def plan_from_dict(d: dict[str, Any], source: str = "<plan>") -> Plan:
    """Parse and check a plan's JSON object."""
    plan = Plan.from_dict(d, source)
    validate_plan(plan, source=source)
    return plan


def load_plan(path: str | Path) -> Plan:
    """Read and check a plan file."""
    p = Path(path)
    data = read_user_file(p, "json", PlanError)
    if not isinstance(data, dict):
        raise PlanError(f"{p}: malformed plan: expected a JSON object")
    return plan_from_dict(data, str(p))


def metaop_difference(got: MetaOp, want: MetaOp, prefix: str = "") -> str:
    """The first field in which the plan's MetaOp ``got`` (or a part of it) differs from the
    workload's ``want``, as a phrase."""
    for f in dataclasses.fields(got):
        a, b = getattr(got, f.name), getattr(want, f.name)
        if a == b:
            continue
        if dataclasses.is_dataclass(a):
            return metaop_difference(a, b, f"{prefix}{f.name}.")  # type: ignore[arg-type]
        if f.name == "layers" and len(a) != len(b):
            return f"{len(a)} layers in the plan, {len(b)} in the workload"
        if f.name == "layers":
            i, x, y = next((i, x, y) for i, (x, y) in enumerate(zip(a, b)) if x != y)
            return f"layer {i} is {x} in the plan, {y} in the workload"
        return f"{prefix}{f.name} {a!r} in the plan, {b!r} in the workload"
    return "no difference"


def validate_plan(
    plan: Plan, expected: Sequence[MetaOp] | None = None, source: str = "<plan>"
) -> None:
    """Raise :class:`PlanError` unless ``plan`` is internally consistent (and its MetaOps are
    ``expected``, the workload's contraction, when given)."""
    where = source
    if plan.num_devices < 1:
        raise PlanError(f"{where}: num_devices {plan.num_devices} is below 1")
    if plan.devices_per_node < 1:
        raise PlanError(f"{where}: devices_per_node {plan.devices_per_node} is below 1")
    ids = [m.id for m in plan.metaops]
    if ids != list(range(len(ids))):
        raise PlanError(f"{where}: metaop ids must be 0..{len(ids) - 1} in order")
    if expected is not None:
        if len(expected) != len(plan.metaops):
            raise PlanError(
                f"{where}: plan has {len(plan.metaops)} MetaOps, workload has {len(expected)}"
            )
        for got, exp in zip(plan.metaops, expected):
            if got != exp:
                raise PlanError(f"{where}: MetaOp {got.id} ('{got.name}') does not match the"
                                f" workload: {metaop_difference(got, exp)}")
    for m in plan.metaops:
        for d in m.deps:
            if not 0 <= d < m.id:
                raise PlanError(f"{where}: MetaOp {m.id} depends on {d}, not an earlier MetaOp")
    for r in plan.recompute:
        if not 0 <= r < len(plan.metaops):
            raise PlanError(f"{where}: recompute names MetaOp {r}, which the plan does not have")
    for m_id, stage in plan.zero.items():
        if not 0 <= m_id < len(plan.metaops):
            raise PlanError(f"{where}: zero names MetaOp {m_id}, which the plan does not have")
        if stage not in ZERO_STAGES:
            raise PlanError(f"{where}: zero stage {stage} of MetaOp {m_id}: expected 0, 1 or 2")
    # when each layer (metaop, layer) is computed: wave index
    done: dict[tuple[int, int], int] = {}
    for wi, wave in enumerate(plan.waves):
        used: set[int] = set()
        for s in wave.slices:
            tag = f"{where}: wave {wi}, slice of MetaOp {s.metaop}"
            if not 0 <= s.metaop < len(plan.metaops):
                raise PlanError(f"{tag}: no such MetaOp")
            m = plan.metaops[s.metaop]
            if not 0 <= s.layer_start < s.layer_end <= m.num_layers:
                raise PlanError(
                    f"{tag}: layers [{s.layer_start}, {s.layer_end}) outside 0..{m.num_layers}"
                )
            if not s.devices:
                raise PlanError(f"{tag}: not placed (no devices)")
            for dev in s.devices:
                if not 0 <= dev < plan.num_devices:
                    raise PlanError(f"{tag}: device {dev} outside 0..{plan.num_devices - 1}")
                if dev in used:
                    raise PlanError(f"{tag}: device {dev} is used twice in the wave")
                used.add(dev)
            if m.batch % s.n:
                raise PlanError(f"{tag}: {s.n} devices do not divide batch {m.batch}")
            if s.time_s < 0:
                raise PlanError(f"{tag}: negative time {s.time_s}")
            for layer in range(s.layer_start, s.layer_end):
                if (s.metaop, layer) in done:
                    raise PlanError(f"{tag}: layer {layer} is scheduled twice")
            # every input computed in an earlier wave
            for need in slice_inputs(plan.metaops, s.metaop, s.layer_start):
                if done.get(need, wi) >= wi:
                    raise PlanError(
                        f"{tag}: needs layer {need[1]} of MetaOp {need[0]} from an earlier wave"
                    )
        for s in wave.slices:
            for layer in range(s.layer_start, s.layer_end):
                done[(s.metaop, layer)] = wi
    for m in plan.metaops:
        for layer in range(m.num_layers):
            if (m.id, layer) not in done:
                raise PlanError(
                    f"{where}: layer {layer} of MetaOp {m.id} ('{m.name}') is never scheduled")
