"""Memory strategy search: which MetaOps recompute their activations and which ZeRO stage each
MetaOp's parameters are sharded at, chosen for the plan that fits with the shortest simulated
iteration.

A strategy costs time where it saves memory: recomputation runs a slice's forward again in
backward (the simulator charges ``1 - backward_share`` more of its compute); ZeRO replaces a
pool's all-reduce by a reduce-scatter (half the traffic, still overlapped with the backward) and
an all-gather of the updated shards after the step (exposed), while the optimizer steps only a
1/|D| share.  So the search is, for every planner alike (the baselines get the same one):

1. the uniform *ladder* ``none, zero-1, zero-2, recompute, recompute + zero-1, recompute +
   zero-2`` (those the user's
   ``--zero`` / ``--recompute`` overrides allow), in that order: the planner's waves are placed
   under each in turn, memory checked, until one fits (placing costs a search, so one that fits
   stops the ladder; when it is not ``none``, the most memory-saving strategy is placed too:
   less memory can admit a much shorter schedule);
2. on those placed waves, every ladder strategy that fits is simulated, and the fastest kept
   (ZeRO can be faster than none: a smaller optimizer step; Spindle's search already simulates
   every placement of every candidate schedule with ZeRO-1 too); when a baseline's choice is
   not the one its waves were placed under, they are placed again under it, and the faster of
   the two kept (placement weighs the sync, which ZeRO changes);
3. per MetaOp, greedily: each recomputing MetaOp (longest compute first) stops recomputing, and
   each sharded MetaOp stops sharding, wherever the plan still fits and simulates no slower.

The plan records the result (:attr:`spindle.plan.contract.Plan.recompute`,
:attr:`~spindle.plan.contract.Plan.zero`, ``choice["memory"]``), and the runtime executes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from spindle.costs.graph import MetaGraph
from spindle.costs.memory import MemoryModel, memory_report
from spindle.plan.contract import Plan, Wave
from spindle.planner.placement import PlacementError


@dataclass(frozen=True)
class Strategy:
    """A uniform memory strategy: every MetaOp but the losses recomputing, and one ZeRO stage."""

    recompute: bool
    zero: int

    @property
    def label(self) -> str:
        parts = (["recompute"] if self.recompute else []) + (
            [f"zero-{self.zero}"] if self.zero else [])
        return " + ".join(parts) or "none"


LADDER = (Strategy(False, 0), Strategy(False, 1), Strategy(False, 2), Strategy(True, 0),
          Strategy(True, 1), Strategy(True, 2))


def ladder(zero: int | None, recompute: bool) -> list[Strategy]:
    """The ladder under the user's overrides: ``zero`` a fixed stage (None: any), ``recompute``
    forced on."""
    return [s for s in LADDER if (zero is None or s.zero == zero) and (s.recompute or not
                                                                       recompute)]


def uniform_model(base: MemoryModel, strategy: Strategy) -> MemoryModel:
    return replace(base, recompute=strategy.recompute, zero=strategy.zero,
                   recompute_metaops=frozenset(), zero_metaops=())


@dataclass(frozen=True)
class Chosen:
    """The strategy a plan runs: its memory model and a label for people."""

    model: MemoryModel
    label: str
    uniform: Strategy | None = None  # the uniform strategy it is, when not refined per MetaOp


def choose(
    graph: MetaGraph, waves: list[Wave], fitted: Strategy, strategies: Sequence[Strategy],
    base: MemoryModel, capacity: float, time_of: Callable[[Plan], float],
    plan_of: Callable[[list[Wave], MemoryModel], Plan], refine_zero: bool,
    refine_recompute: bool, forced: bool = True,
) -> Chosen:
    """Steps 2 and 3 of the module docstring on ``waves`` (placed under ``fitted``):
    ``time_of`` simulates a plan, ``plan_of`` builds one; ``forced``: the memory forced
    ``fitted`` (only then is it refined per MetaOp: each move costs a report and a
    simulation)."""

    def fits(model: MemoryModel) -> bool:
        return math.isinf(capacity) or memory_report(plan_of(waves, model), graph, model,
                                                     capacity).fits()

    best_model = uniform_model(base, fitted)
    best_t = time_of(plan_of(waves, best_model))
    best = fitted
    for s in strategies:
        # recomputing only adds compute to what fits without; ZeRO-2 costs more traffic than
        # ZeRO-1 (a reduce-scatter per wave), so it is tried only where ZeRO-1 is not offered
        if s == fitted or (s.recompute and not fitted.recompute) or (
                s.zero == 2 and Strategy(s.recompute, 1) in strategies):
            continue
        model = uniform_model(base, s)
        if fits(model):
            t = time_of(plan_of(waves, model))
            if t < best_t * (1 - 1e-9):
                best, best_model, best_t = s, model, t
    # per MetaOp, from the uniform choice: undo what costs time wherever it still fits
    recompute, zero = best_model.strategy(graph.metaops)
    model = per_metaop(base, recompute, zero)
    undone = {"recompute": 0, "zero": 0}
    order = sorted(recompute, key=lambda m: -graph.metaops[m].cost.flops_per_layer
                   * graph.metaops[m].num_layers)
    # per MetaOp only where the memory forced a strategy (each move is a report + simulation)
    moves: list[tuple[str, int]] = ([("recompute", m) for m in order]
                                    if refine_recompute and forced else []) + (
        [("zero", m) for m in sorted(zero)] if refine_zero and forced else [])
    for kind, m in moves:
        rc = set(model.recompute_metaops)
        zs = dict(model.zero_metaops)
        if kind == "recompute":
            rc.discard(m)
        else:
            zs.pop(m, None)
        trial = per_metaop(base, tuple(rc), zs)
        if not fits(trial):
            continue
        t = time_of(plan_of(waves, trial))
        if t <= best_t * (1 + 1e-9):
            model, best_t = trial, t
            undone[kind] += 1
    label = best.label
    kept_rc, kept_zero = model.strategy(graph.metaops)
    if undone["recompute"] and kept_rc:
        label += f"; recompute on {len(kept_rc)} of {len(recompute)} MetaOps"
    if undone["zero"] and kept_zero:
        label += f"; ZeRO on {len(kept_zero)} of {len(zero)} MetaOps"
    if not kept_rc and not kept_zero:
        label = "none"
    elif not kept_rc and best.recompute:
        label = label.replace("recompute + ", "")
    return Chosen(model, label, None if any(undone.values()) else best)


def per_metaop(base: MemoryModel, recompute: Sequence[int], zero: dict[int, int]
               ) -> MemoryModel:
    """``base`` with exactly these MetaOps recomputing and these ZeRO stages (no overrides)."""
    return replace(base, recompute=False, zero=0, recompute_metaops=frozenset(recompute),
                   zero_metaops=tuple(sorted(zero.items())))


def ladder_error(last: PlacementError, strategies: Sequence[Strategy]) -> PlacementError:
    """The refusal once the whole ladder failed: the last strategy's device and MetaOps."""
    return PlacementError(f"{last} (with {strategies[-1].label}, the most memory-saving"
                          " strategy tried)")


__all__ = ["Strategy", "LADDER", "ladder", "choose", "Chosen", "uniform_model", "per_metaop",
           "ladder_error"]
