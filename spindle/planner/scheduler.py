"""Wavefront scheduler: turn a MetaGraph into waves of MetaOp slices on disjoint device groups.

docs/method.md section 6.  Per MetaLevel, repeat until the level has no layers left:

1. *propose*: solve the level's relaxation on the layers still to schedule
   (:mod:`spindle.planner.allocator`) and take each MetaOp's bi-point pair ``n_lo <= n* <= n_hi``;
   every MetaOp starts at ``n_lo`` (time-shared MetaOps, ``n* < n_min``, at 0) and is upgraded
   to ``n_hi`` while devices remain, the most urgent first;
2. *extend*: hand still idle devices to the next valid n of the MetaOps with most remaining time;
3. *align*: pick the wave length D; every slice runs ``floor(D / T_m(n))`` layers (at least one,
   at most what is left); the rest returns to the pool;
4. *fix*: emit the wave and remove its layers.
Consecutive waves that can be merged are merged, and levels are concatenated.

Where we depart from the paper (each keeps every invariant of a valid plan):

* **Wave length by relaxed progress.**  The paper aligns D to the shortest candidate tuple.  We
  score a wave by how much it lowers the potential ``Phi`` = sum over the remaining levels of
  their C* on the layers still to schedule, per second of wave: ``(Phi_before - Phi_after) / D``.
  A wave that keeps every MetaOp on its relaxed course scores 1; cutting slices badly at a layer
  boundary, idling devices or over-extending a MetaOp scores less.  We score the candidate lengths
  (tuple ends and MetaOp completions) of the proposal with and without step 2 and keep the best.
* **Level rebalancing.**  BFS depth is only one valid levelling; a MetaOp may sit on any level
  between its producers' and its consumers'.  A local search moves MetaOps within that slack while
  the sum of per-level C* drops (e.g. a text-to-SQL decoder joins the level of the other decoders
  instead of the encoders').
* **Filling idle devices across levels.**  Devices the current level cannot use go to MetaOps of
  later levels whose producers all finished in earlier waves (as many layers as fit in the wave);
  the potential counts their progress too.  docs/method.md section 10 names the idle level boundary
  as open; this closes part of it without giving up the per-level relaxation.
* **Portfolio.**  The schedule is built with a few variants (with and without rebalancing, and
  the paper's shortest-tuple alignment) and the shortest is returned; planning takes milliseconds.
* **Merging.**  Consecutive waves merge when every MetaOp in both uses the same n, the union fits
  in N devices, and no slice of the second needs an output of the first; a MetaOp in both becomes
  one slice with the layers of both.  Merging never lengthens the schedule.

Invariants of the result: every wave uses at most N devices; every n is valid for its MetaOp;
every layer is scheduled exactly once; a MetaOp's slices are in strictly increasing waves with
contiguous layers; a MetaOp's first slice is in a later wave than its producers' last slices;
``time_s = layers * T_m(n)``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Literal

from spindle.costs.estimator import Estimator
from spindle.costs.graph import MetaGraph
from spindle.plan.contract import Slice, Wave, schedule_length
from spindle.planner.allocator import (
    ScalingCurve,
    bipoint,
    relaxed_optimum,
    scaling_curves,
)
from spindle.planner.levels import rebalance_levels

log = logging.getLogger(__name__)

_EPS = 1e-9


@dataclass(frozen=True)
class SchedulerOptions:
    """How the wavefront scheduler builds waves (the defaults are Spindle's planner)."""

    rebalance_levels: bool = True
    """Move MetaOps within their level slack to lower the sum of per-level C*."""
    fill_across_levels: bool = True
    """Give devices the current level leaves idle to ready MetaOps of later levels."""
    alignment: Literal["progress", "shortest"] = "progress"
    """``progress``: wave length by relaxed progress per second; ``shortest``: the paper's rule."""
    portfolio: bool = True
    """Also build the schedule with other variants and keep the shortest."""
    max_length_candidates: int = 16
    """Most wave lengths scored per proposal (bounds planning time on large levels)."""
    rollouts: int = 3
    """Pilot method: follow the greedy to the end of the level from this many best-scored
    candidates and take the one that ends the level soonest (0 or 1: plain greedy)."""


@dataclass
class _Progress:
    """Layers still to schedule and where each MetaOp stands."""

    remaining: dict[int, int]
    next_layer: dict[int, int]
    finished_in: dict[int, int] = field(default_factory=dict)  # MetaOp -> wave of its last layer


class _Potential:
    """Phi: the sum of per-level C* over the layers still to schedule, with a cache per level."""

    def __init__(self, levels: list[list[int]], curves: dict[int, ScalingCurve], n: int) -> None:
        self.levels = levels
        self.curves = curves
        self.n = n
        self.value: dict[int, float] = {}

    def level_cstar(self, level: int, remaining: dict[int, int]) -> float:
        ids = [i for i in self.levels[level] if remaining[i] > 0]
        if not ids:
            return 0.0
        c, _ = relaxed_optimum([self.curves[i] for i in ids], [remaining[i] for i in ids], self.n)
        return c

    def refresh(self, levels: set[int], remaining: dict[int, int]) -> None:
        for lv in levels:
            self.value[lv] = self.level_cstar(lv, remaining)

    def drop(
        self, remaining: dict[int, int], taken: dict[int, int], level_of: dict[int, int]
    ) -> float:
        """Phi(now) - Phi(after running ``taken`` layers)."""
        after = dict(remaining)
        for i, nl in taken.items():
            after[i] -= nl
        touched = {level_of[i] for i in taken}
        return sum(self.value[lv] - self.level_cstar(lv, after) for lv in touched)


def wavefront_schedule(
    graph: MetaGraph,
    estimator: Estimator,
    num_devices: int,
    options: SchedulerOptions | None = None,
) -> list[Wave]:
    """Spindle's plan for ``graph`` on ``num_devices`` devices, as unplaced waves: the shortest
    schedule of :func:`schedule_variants`."""
    best: list[Wave] | None = None
    for _, waves in schedule_variants(graph, estimator, num_devices, options):
        if best is None or schedule_length(waves) < schedule_length(best) * (1.0 - 1e-12):
            best = waves
    assert best is not None
    return best


def schedule_variants(
    graph: MetaGraph,
    estimator: Estimator,
    num_devices: int,
    options: SchedulerOptions | None = None,
) -> list[tuple[str, list[Wave]]]:
    """The wavefront schedule under ``options`` and, with ``options.portfolio``, under its
    variants (rebalancing flipped; the paper's shortest-tuple alignment), each with a label.
    The schedule alone picks among them in :func:`wavefront_schedule`; the sync-aware search of
    :mod:`spindle.planner.search` picks by the whole simulated iteration."""
    opts = options or SchedulerOptions()
    curves = scaling_curves(graph.metaops, estimator, num_devices)
    variants = [("wavefront", opts)]
    if opts.portfolio:
        variants += [
            ("wavefront-rebalance" if not opts.rebalance_levels else "wavefront-bfs-levels",
             replace(opts, rebalance_levels=not opts.rebalance_levels, portfolio=False)),
            ("wavefront-shortest", replace(opts, alignment="shortest", rollouts=0,
                                           portfolio=False)),
        ]
    return [(label, _schedule(graph, curves, num_devices, v)) for label, v in variants]


def _schedule(
    graph: MetaGraph, curves: dict[int, ScalingCurve], num_devices: int, opts: SchedulerOptions
) -> list[Wave]:
    level_of = (
        rebalance_levels(graph, curves, num_devices)
        if opts.rebalance_levels
        else {m.id: m.level for m in graph.metaops}
    )
    levels: list[list[int]] = [[] for _ in range(1 + max(level_of.values(), default=-1))]
    for m in graph.metaops:
        levels[level_of[m.id]].append(m.id)
    deps = {m.id: m.deps for m in graph.metaops}
    prog = _Progress(
        remaining={m.id: m.num_layers for m in graph.metaops},
        next_layer={m.id: 0 for m in graph.metaops},
    )
    ctx = _Context(levels, level_of, deps, curves, num_devices, opts)
    waves: list[Wave] = []
    for lv in range(len(levels)):
        ctx.phi.refresh(set(range(lv, len(levels))), prog.remaining)
        while any(prog.remaining[i] > 0 for i in levels[lv]):
            options = _candidate_waves(ctx, lv, prog)
            if opts.rollouts > 1 and len(options) > 1:
                chosen = min(options[: opts.rollouts],
                             key=lambda c: _rollout(ctx, lv, prog, c[2], len(waves)))
            else:
                chosen = options[0]
            wave = _slices(chosen[2], prog, curves)
            _commit(wave, prog, len(waves))
            waves.append(Wave(tuple(wave), lv))
            ctx.phi.refresh({level_of[s.metaop] for s in wave}, prog.remaining)
    return merge_waves(waves, graph, num_devices, across_levels=opts.fill_across_levels)


@dataclass
class _Context:
    """What stays fixed while one schedule is built."""

    levels: list[list[int]]
    level_of: dict[int, int]
    deps: dict[int, tuple[int, ...]]
    curves: dict[int, ScalingCurve]
    num_devices: int
    opts: SchedulerOptions
    phi: _Potential = field(init=False)

    def __post_init__(self) -> None:
        self.phi = _Potential(self.levels, self.curves, self.num_devices)

    def fillers(self, level: int, prog: _Progress) -> list[int]:
        """Ready MetaOps of later levels: every producer finished in an earlier wave."""
        if not self.opts.fill_across_levels:
            return []
        return [
            i for lj in self.levels[level + 1:] for i in lj
            if prog.remaining[i] > 0 and all(d in prog.finished_in for d in self.deps[i])
        ]


_Candidate = tuple[float, float, dict[int, tuple[int, int]]]
"""(score, wave length, MetaOp -> (n, layers))."""


def _rollout(
    ctx: _Context, level: int, prog: _Progress, first: dict[int, tuple[int, int]], index: int
) -> float:
    """Length of the rest of ``level`` if the next wave is ``first`` and the greedy choice follows,
    plus Phi of the later levels at that point (their layers run early by filling count)."""
    sim = _Progress(dict(prog.remaining), dict(prog.next_layer), dict(prog.finished_in))
    saved = dict(ctx.phi.value)
    total = 0.0
    wave_slices = first
    while True:
        wave = _slices(wave_slices, sim, ctx.curves)
        total += max(s.time_s for s in wave)
        _commit(wave, sim, index)
        index += 1
        ctx.phi.refresh({ctx.level_of[s.metaop] for s in wave}, sim.remaining)
        if not any(sim.remaining[i] > 0 for i in ctx.levels[level]):
            break
        wave_slices = _candidate_waves(ctx, level, sim)[0][2]
    later = sum(ctx.phi.value.get(lv, 0.0) for lv in range(level + 1, len(ctx.levels)))
    ctx.phi.value = saved
    return total + later


def _slices(
    chosen: dict[int, tuple[int, int]], prog: _Progress, curves: dict[int, ScalingCurve]
) -> list[Slice]:
    out = []
    for i, (n, nl) in sorted(chosen.items()):
        start = prog.next_layer[i]
        out.append(Slice(i, start, start + nl, count=n, time_s=nl * curves[i].at(n)))
    return out


def _commit(wave: list[Slice], prog: _Progress, index: int) -> None:
    for s in wave:
        prog.remaining[s.metaop] -= s.num_layers
        prog.next_layer[s.metaop] = s.layer_end
        if prog.remaining[s.metaop] == 0:
            prog.finished_in[s.metaop] = index


def _proposals(
    active: list[int], prog: _Progress, curves: dict[int, ScalingCurve], n_dev: int
) -> tuple[list[dict[int, int]], dict[tuple[int, int], int]]:
    """Device counts per MetaOp for the next wave (steps 1 and 2), and the layers of each
    bi-point tuple ``(MetaOp, n) -> l`` (where a tuple ends is a candidate wave length)."""
    rem = prog.remaining
    _, n_star = relaxed_optimum([curves[i] for i in active], [rem[i] for i in active], n_dev)
    lo: dict[int, int] = {}
    hi: dict[int, int] = {}
    tuple_layers: dict[tuple[int, int], int] = {}
    for i, ns in zip(active, n_star, strict=True):
        cv = curves[i]
        tup = bipoint(cv, ns, rem[i])
        for t in tup:
            tuple_layers[(i, t.n)] = t.layers
        hi[i] = tup[0].n
        lo[i] = tup[-1].n if len(tup) > 1 else (tup[0].n if ns >= cv.n_min * (1 - _EPS) else 0)

    def time_left(i: int, n: int) -> float:
        return rem[i] * curves[i].times[0] if n == 0 else rem[i] * curves[i].at(n)

    proposals: list[dict[int, int]] = []
    # two orders of the upgrades: most remaining time first (time-shared MetaOps count at n_min),
    # and time-shared MetaOps first (longest first), so they do not all pile up at the end
    orders = [
        sorted(active, key=lambda i: -time_left(i, lo[i] or curves[i].n_min)),
        sorted(active, key=lambda i: (lo[i] > 0, -time_left(i, lo[i] or curves[i].n_min))),
    ]
    for order in orders:
        choice = dict(lo)
        used = sum(choice.values())
        for i in sorted(active, key=lambda i: time_left(i, choice[i])):
            if used <= n_dev:
                break
            used -= choice[i]
            choice[i] = 0
        for i in order:
            if hi[i] > choice[i] and used - choice[i] + hi[i] <= n_dev:
                used += hi[i] - choice[i]
                choice[i] = hi[i]
        if not any(choice.values()):  # nothing fits at its bi-point count: run the most urgent
            i = order[0]
            choice[i] = curves[i].n_min
            used = choice[i]
        proposals.append(dict(choice))
        # step 2: extend to the next valid n while devices idle, most remaining time first
        while True:
            pick: tuple[float, int, int] | None = None
            for i in active:
                cv, n = curves[i], choice[i]
                if n == 0:
                    nxt = cv.n_min
                else:
                    k = cv.counts.index(n)
                    if k + 1 >= len(cv.counts):
                        continue
                    nxt = cv.counts[k + 1]
                if used - n + nxt <= n_dev:
                    key = time_left(i, n)
                    if pick is None or key > pick[0]:
                        pick = (key, i, nxt)
            if pick is None:
                break
            _, i, nxt = pick
            used += nxt - choice[i]
            choice[i] = nxt
        proposals.append(dict(choice))
    unique: list[dict[int, int]] = []
    for p in proposals:
        if p not in unique:
            unique.append(p)
    return unique, tuple_layers


def _candidate_waves(ctx: _Context, level: int, prog: _Progress) -> list[_Candidate]:
    """Scored candidates for the next wave of ``level``, best first."""
    curves, n_dev, opts = ctx.curves, ctx.num_devices, ctx.opts
    rem = prog.remaining
    active = [i for i in ctx.levels[level] if rem[i] > 0]
    proposals, tuple_len = _proposals(active, prog, curves, n_dev)
    fillers = sorted(ctx.fillers(level, prog),
                     key=lambda i: -rem[i] * curves[i].times[0] * curves[i].n_min)
    out: list[_Candidate] = []
    for choice in proposals:
        sel = {i: n for i, n in choice.items() if n > 0}
        one_layer = max(curves[i].at(n) for i, n in sel.items())
        if opts.alignment == "shortest":
            shortest = min(tuple_len.get((i, n), rem[i]) * curves[i].at(n)
                           for i, n in sel.items())
            cands = [max(shortest, one_layer)]
        else:
            cands = _length_candidates(sel, tuple_len, rem, curves, one_layer,
                                       opts.max_length_candidates)
        for d in cands:
            slices = {i: (n, _layers_within(d, curves[i].at(n), rem[i])) for i, n in sel.items()}
            length = max(nl * curves[i].at(n) for i, (n, nl) in slices.items())
            idle = n_dev - sum(sel.values())
            if fillers and idle > 0:
                slices.update(_fill(fillers, idle, length, rem, curves))
            if opts.alignment == "shortest":
                score = 0.0
            else:
                taken = {i: nl for i, (_, nl) in slices.items()}
                score = ctx.phi.drop(rem, taken, ctx.level_of) / length
            if all(c[2] != slices for c in out):
                out.append((score, length, slices))
    out.sort(key=lambda c: -c[0])  # stable: among equal scores the first proposal wins
    return out


def _layers_within(length: float, per_layer: float, remaining: int) -> int:
    return min(remaining, max(1, int(math.floor(length / per_layer * (1 + _EPS)))))


def _length_candidates(
    sel: dict[int, int],
    tuple_len: dict[tuple[int, int], int],
    rem: dict[int, int],
    curves: dict[int, ScalingCurve],
    one_layer: float,
    limit: int,
) -> list[float]:
    """Wave lengths worth scoring: where a slice's bi-point tuple or the whole MetaOp ends."""
    ends: set[float] = set()
    for i, n in sel.items():
        t = curves[i].at(n)
        ends.add(tuple_len.get((i, n), rem[i]) * t)
        ends.add(rem[i] * t)
    cands = sorted({max(e, one_layer) for e in ends})
    if len(cands) > limit:
        head = cands[: limit // 2]
        rest = cands[limit // 2:]
        step = len(rest) / (limit - len(head))
        cands = head + [rest[int(k * step)] for k in range(limit - len(head))]
    return cands


def _fill(
    fillers: list[int], idle: int, length: float, rem: dict[int, int],
    curves: dict[int, ScalingCurve],
) -> dict[int, tuple[int, int]]:
    """Ready MetaOps of later levels on the idle devices: each takes the count that fits the most
    layers into ``length`` (the fewest devices among equals), largest remaining work first."""
    out: dict[int, tuple[int, int]] = {}
    for i in fillers:
        if idle <= 0:
            break
        pick: tuple[int, int] | None = None
        for n, t in zip(curves[i].counts, curves[i].times, strict=True):
            if n > idle:
                break
            nl = min(rem[i], int(math.floor(length / t * (1 + _EPS))))
            if nl >= 1 and (pick is None or nl > pick[1]):
                pick = (n, nl)
        if pick is not None:
            out[i] = pick
            idle -= pick[0]
    return out


def merge_waves(
    waves: list[Wave], graph: MetaGraph, num_devices: int, across_levels: bool = True
) -> list[Wave]:
    """Merge consecutive waves A, B when every MetaOp in both has the same n, the union fits in
    ``num_devices``, and no slice of B starts a MetaOp whose producer ran in A (and, unless
    ``across_levels``, A and B belong to the same level; the merged wave keeps A's level)."""
    deps = {m.id: set(m.deps) for m in graph.metaops}
    out: list[Wave] = []
    for w in waves:
        same_level = across_levels or (out and out[-1].level == w.level)
        if out and same_level and _mergeable(out[-1], w, deps, num_devices):
            out[-1] = _merged(out[-1], w)
        else:
            out.append(w)
    return out


def _mergeable(a: Wave, b: Wave, deps: dict[int, set[int]], num_devices: int) -> bool:
    na = {s.metaop: s.n for s in a.slices}
    nb = {s.metaop: s.n for s in b.slices}
    if any(na[i] != nb[i] for i in na.keys() & nb.keys()):
        return False
    if sum(na.values()) + sum(n for i, n in nb.items() if i not in na) > num_devices:
        return False
    ran_in_a = set(na)
    for s in b.slices:
        if s.metaop not in na and s.layer_start == 0 and deps[s.metaop] & ran_in_a:
            return False
    return True


def _merged(a: Wave, b: Wave) -> Wave:
    bs = {s.metaop: s for s in b.slices}
    slices: list[Slice] = []
    for s in a.slices:
        t = bs.pop(s.metaop, None)
        if t is None:
            slices.append(s)
        else:
            slices.append(Slice(s.metaop, s.layer_start, t.layer_end, count=s.n,
                                time_s=s.time_s + t.time_s))
    slices.extend(bs.values())
    return Wave(tuple(sorted(slices, key=lambda s: s.metaop)), a.level)
