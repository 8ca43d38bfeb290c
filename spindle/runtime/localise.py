"""Localisation: which layers each rank runs, which rows it holds, and which parameters it builds.

Everything here is read off the plan (SPINDLE.md section 8.1); nothing is re-planned.

* A slice of a MetaOp with batch ``B`` on an ordered device group of ``n`` devices is
  data-parallel: device ``k`` of the group holds rows ``[k*B/n, (k+1)*B/n)``
  (:func:`slice_layout`).  The one exception is a contrastive-loss MetaOp: its operator needs
  the whole batch (the similarity matrix couples every pair of samples), so it runs on the first
  device of its group with all ``B`` rows and the other devices of that group idle.
* A logical parameter's *device group* is the set of ranks that execute at least one operator
  using it (:func:`parameter_device_groups`); every rank computes the same groups from the plan.
* :func:`localise` builds, on one rank, exactly the parameters of the operators that rank runs,
  each initialised from ``(seed, logical name)`` by the model's ``init_parameter``, so any plan on
  any world size starts from the same values as the single-process reference model.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator

import torch

from spindle.declare.workload import Workload
from spindle.plan.contract import Plan, PlanLayer, Slice, executing_devices, row_range
from spindle.runtime.model import init_parameter, parameter_names, parameter_shape

log = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class RowRange:
    """Rows ``[start, end)`` of a MetaOp's batch."""

    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start

    def overlap(self, other: "RowRange") -> "RowRange | None":
        lo, hi = max(self.start, other.start), min(self.end, other.end)
        return RowRange(lo, hi) if lo < hi else None


@dataclass(frozen=True)
class SliceRef:
    """Where a slice sits in the plan: ``plan.waves[wave].slices[index]``."""

    wave: int
    index: int


def slice_layout(plan: Plan, s: Slice) -> tuple[tuple[int, RowRange], ...]:
    """``(rank, rows)`` for every rank that executes slice ``s``, in group order."""
    metaop = plan.metaops[s.metaop]
    ranks = executing_devices(metaop, s.devices)
    return tuple(
        (rank, RowRange(*row_range(metaop.batch, len(ranks), k))) for k, rank in enumerate(ranks)
    )


def executing_ranks(plan: Plan, s: Slice) -> tuple[int, ...]:
    """The ranks that run slice ``s`` (all its devices, or the first for a contrastive loss)."""
    return tuple(rank for rank, _ in slice_layout(plan, s))


def rows_on(plan: Plan, s: Slice, rank: int) -> RowRange | None:
    """The rows of slice ``s`` held by ``rank``, or None when ``rank`` does not run it."""
    for r, rows in slice_layout(plan, s):
        if r == rank:
            return rows
    return None


def iter_slices(plan: Plan) -> Iterator[tuple[SliceRef, Slice]]:
    for wi, wave in enumerate(plan.waves):
        for si, s in enumerate(wave.slices):
            yield SliceRef(wi, si), s


def slices_of_rank(plan: Plan, rank: int) -> dict[int, tuple[SliceRef, Slice]]:
    """Wave index -> the slice ``rank`` executes in that wave (at most one: groups are disjoint)."""
    mine: dict[int, tuple[SliceRef, Slice]] = {}
    for ref, s in iter_slices(plan):
        if rank in executing_ranks(plan, s):
            mine[ref.wave] = (ref, s)
    return mine


def slice_layers(plan: Plan, s: Slice) -> tuple[PlanLayer, ...]:
    return plan.metaops[s.metaop].layers[s.layer_start:s.layer_end]


class _NameCache:
    """``parameter_names`` per operator, asked once per distinct PlanLayer."""

    def __init__(self, workload: Workload) -> None:
        self.workload = workload
        self._names: dict[PlanLayer, tuple[str, ...]] = {}

    def __call__(self, ref: PlanLayer) -> tuple[str, ...]:
        names = self._names.get(ref)
        if names is None:
            names = tuple(parameter_names(self.workload, ref))
            self._names[ref] = names
        return names


def parameter_device_groups(workload: Workload, plan: Plan) -> dict[str, tuple[int, ...]]:
    """Logical parameter name -> sorted ranks that hold a replica (its device group ``D``)."""
    names_of = _NameCache(workload)
    holders: dict[str, set[int]] = defaultdict(set)
    for _, s in iter_slices(plan):
        ranks = executing_ranks(plan, s)
        for ref in slice_layers(plan, s):
            for name in names_of(ref):
                holders[name].update(ranks)
    return {name: tuple(sorted(ranks)) for name, ranks in sorted(holders.items())}


def parameter_ready_waves(workload: Workload, plan: Plan) -> dict[str, int]:
    """Logical parameter name -> the earliest wave with a slice that uses it: backward runs the
    waves in reverse, so after that wave's backward its gradient is final on every rank."""
    names_of = _NameCache(workload)
    ready: dict[str, int] = {}
    for ref, s in iter_slices(plan):
        for layer in slice_layers(plan, s):
            for name in names_of(layer):
                ready[name] = min(ready.get(name, ref.wave), ref.wave)
    return dict(sorted(ready.items()))


@dataclass
class LocalModel:
    """One rank's share of the model: its parameters, every parameter's device group and the
    wave after whose backward its gradient is final."""

    rank: int
    params: dict[str, torch.nn.Parameter]  # sorted by logical name
    device_groups: dict[str, tuple[int, ...]]  # every parameter of the plan, sorted by name
    ready_wave: dict[str, int] = field(default_factory=dict)  # every parameter of the plan

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
    groups = parameter_device_groups(workload, plan)
    params: dict[str, torch.nn.Parameter] = {}
    for name, ranks in groups.items():
        if rank not in ranks:
            continue
        shape = tuple(parameter_shape(workload, name))
        value = init_parameter(name, shape, seed, dtype)
        params[name] = torch.nn.Parameter(value.to(device=device, dtype=dtype))
    local = LocalModel(rank, params, groups, parameter_ready_waves(workload, plan))
    log.debug("rank %d holds %d of %d parameters (%d elements)", rank, len(params), len(groups),
              local.num_elements)
    return local
