"""Localisation: which layers each rank runs, which rows it holds, and which parameters it builds.

Everything here is read off the plan (SPINDLE.md section 8.1); nothing is re-planned.

* Which rows of a slice a rank holds is :mod:`spindle.plan.layout`'s rule (a contrastive loss
  runs on the first device of its group with the whole batch).
* A logical parameter's *device group* is the set of ranks that execute at least one operator
  using it (:func:`parameter_device_groups`); every rank computes the same groups from the plan.
* :func:`localise` builds, on one rank, exactly the parameters of the operators that rank runs,
  each initialised from ``(seed, logical name)`` by the model's ``init_parameter``, so any plan on
  any world size starts from the same values as the single-process reference model.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from spindle.declare.workload import LayerRef, Workload
from spindle.plan.contract import Plan, Slice
from spindle.plan.layout import (
    ParameterIndex,
    RowRange,
    SliceRef,
    executing_devices,
    iter_slices,
    parameter_use,
    slice_rows,
)
from spindle.runtime.model import init_parameter, parameter_names, parameter_shape

log = logging.getLogger(__name__)


def executing_ranks(plan: Plan, s: Slice) -> tuple[int, ...]:
    """The ranks that run slice ``s`` (all its devices, or the first for a contrastive loss)."""
    return executing_devices(plan.metaops[s.metaop], s.devices)


def rows_on(plan: Plan, s: Slice, rank: int) -> RowRange | None:
    """The rows of slice ``s`` held by ``rank``, or None when ``rank`` does not run it."""
    for r, rows in slice_rows(plan.metaops[s.metaop], s.devices):
        if r == rank:
            return rows
    return None


def slices_of_rank(plan: Plan, rank: int) -> dict[int, tuple[SliceRef, Slice]]:
    """Wave index -> the slice ``rank`` executes in that wave (at most one: groups are disjoint)."""
    mine: dict[int, tuple[SliceRef, Slice]] = {}
    for ref, s in iter_slices(plan.waves):
        if rank in executing_ranks(plan, s):
            mine[ref.wave] = (ref, s)
    return mine


def parameter_index(workload: Workload, plan: Plan) -> ParameterIndex:
    """The logical parameters (and their elements) of every operator of ``plan``."""
    shapes: dict[LayerRef, dict[str, int]] = {}

    def params_of(ref: LayerRef) -> dict[str, int]:
        if ref not in shapes:
            shapes[ref] = {n: math.prod(parameter_shape(workload, n))
                           for n in parameter_names(workload, ref)}
        return shapes[ref]

    return ParameterIndex(plan.metaops, params_of)


def parameter_device_groups(index: ParameterIndex, plan: Plan) -> dict[str, tuple[int, ...]]:
    """Logical parameter name -> sorted ranks that hold a replica (its device group ``D``)."""
    holds, _ = parameter_use(plan, index)
    return {index.names[i]: tuple(int(d) for d in holds[i].nonzero()[0])
            for i in sorted(range(len(index)), key=lambda i: index.names[i])}


@dataclass
class LocalModel:
    """One rank's share of the model: its parameters, every parameter's device group and the
    wave after whose backward its gradient is final."""

    rank: int
    params: dict[str, torch.nn.Parameter]  # sorted by logical name
    device_groups: dict[str, tuple[int, ...]]  # every parameter of the plan, sorted by name
    index: ParameterIndex  # every parameter of the plan, by operator

    @property
    def num_elements(self) -> int:
        return sum(p.numel() for p in self.params.values())


def localise(
    workload: Workload,
    plan: Plan,
    rank: int,
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> LocalModel:
    """Build the parameters of the operators ``rank`` runs, initialised by (seed, name)."""
    index = parameter_index(workload, plan)
    groups = parameter_device_groups(index, plan)
    params: dict[str, torch.nn.Parameter] = {}
    for name, ranks in groups.items():
        if rank not in ranks:
            continue
        shape = tuple(parameter_shape(workload, name))
        value = init_parameter(name, shape, seed, dtype)
        params[name] = torch.nn.Parameter(value.to(device=device, dtype=dtype))
    local = LocalModel(rank, params, groups, index)
    log.debug("rank %d holds %d of %d parameters (%d elements)", rank, len(params), len(groups),
              local.num_elements)
    return local
