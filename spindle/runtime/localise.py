"""Localisation: which layers each rank runs, which rows it holds, and which parameters it builds.

Everything here is read off the plan (docs/method.md section 8.1); nothing is re-planned.

* Which rows of a slice a rank holds is :mod:`spindle.plan.layout`'s rule (a contrastive loss
  runs on the first device of its group with the whole batch).
* :func:`localise` builds, on one rank, exactly the modules of the operators that rank runs (on
  the meta device, then materialised), every parameter initialised from ``(seed, logical name)``
  by the layer provider, so any plan on any world size starts from the same values as the
  single-process reference model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from spindle.layers.provider import LayerProvider, materialise, parameter_index
from spindle.plan.contract import Plan, Slice
from spindle.plan.layout import (
    ParameterIndex,
    RowRange,
    SliceRef,
    executing_devices,
    iter_slices,
    slice_layers,
    slice_rows,
)

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


@dataclass
class LocalModel:
    """One rank's share of the model: the modules it runs (by path, materialised), their
    parameters by logical name, and the plan's parameter index (every module of every
    operator, keyed by path, with every parameter's name and shape)."""

    rank: int
    provider: LayerProvider
    modules: dict[str, nn.Module]  # sorted by path
    params: dict[str, nn.Parameter]  # sorted by logical name
    index: ParameterIndex
    members: dict[str, dict[str, tuple[int, ...]]]  # every module of the plan: name -> shape

    @property
    def num_elements(self) -> int:
        return sum(p.numel() for p in self.params.values())


def localise(
    provider: LayerProvider,
    plan: Plan,
    rank: int,
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> LocalModel:
    """Build, on the meta device, only the modules of the operators ``rank`` runs, and
    materialise them on ``device`` with every parameter initialised by (seed, logical name)."""
    index = parameter_index(provider, plan.metaops)
    mine: set[str] = set()
    for _, s in iter_slices(plan.waves):
        if rank in executing_devices(plan.metaops[s.metaop], s.devices):
            for ref in slice_layers(plan.metaops, s):
                mine.update(provider.operator_modules(ref))
    modules = materialise(provider, mine, seed, dtype, device)
    params = {f"{path}.{n}": p for path, m in modules.items() for n, p in m.named_parameters()}
    local = LocalModel(rank, provider, modules, dict(sorted(params.items())), index,
                       {path: provider.parameter_shapes(path) for path in index.names})
    log.debug("rank %d runs %d of %d modules (%d elements)", rank, len(modules), len(index),
              local.num_elements)
    return local
