"""Device placement: map each wave's device groups onto concrete devices (docs/method.md
section 7).

Two placements turn a planner's unplaced waves (:class:`spindle.plan.contract.Wave`) into
:class:`spindle.plan.contract.Wave` lists:

* :func:`place_naive` ("sequential placement", the comparison): within a wave, slices take
  consecutive device ids in order, except that a slice whose MetaOp ran in the previous wave on a
  group of the same size keeps those devices when they are free.

* :func:`place_greedy` (Spindle's rules), wave by wave, each wave's slices in priority order:

  1. a slice that continues its MetaOp on a group of the same size keeps the previous devices
     when they are free and have room (no transfer, parameters already there);
  2. then groups bigger than a node (they need whole nodes), then the slices with the most to
     gain from where they go;
  3. every other slice scores each free device and each node in *device-seconds saved* per
     iteration: input rows the device already holds (no transfer at all), input bytes already
     inside the node (intra- instead of inter-node link), parameters of the slice the device
     already holds (a shared component layer: no new gradient-sync load, smaller device
     groups, memory counted once) and held inside the node, and a node bonus where the slice's
     *flow partners* sit (the other producers of its consumers, so that the consumer can stay
     in one node); minus what the device is worth to the slices of the wave still waiting
     (regret).  It takes the best node with enough free devices (best fit on ties, so whole
     nodes stay free for big groups), else the fewest, best nodes; free memory breaks the
     remaining ties (the device with most free memory);
  4. inside the group, devices take the row positions (:func:`spindle.plan.layout.slice_rows`
     order) that overlap the rows they already hold, then those held inside their node.

  Memory (:class:`spindle.costs.memory.MemoryLedger`): a device is a candidate only if the slice's
  new parameters, saved activations and transient still fit.  When a slice cannot be placed,
  the placement backtracks: it redoes the failing wave, then ever more earlier waves (1, 2,
  4, ...) in *balance* mode, where free memory comes before locality.  If even the fully
  balanced placement overflows, :class:`PlacementError` names the device, the MetaOps it runs
  and the shortfall in GB, in one line.

* :func:`place` (the default): the greedy placement under three weightings of parameter
  co-location against data flows (:data:`VARIANTS`; which is best depends on the workload), and
  the sequential placement when it fits memory, each simulated
  (:func:`spindle.planner.simulator.communication`); the least send/recv + parameter-sync time wins.
  So Spindle's placement is never slower than the sequential one on the simulator's numbers.

Cost: numpy over devices per slice; a paper workload on 64 devices places in tens of
milliseconds, a 50-task workload on 1024 devices in about 1.5 s (all candidates, simulated).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from spindle.costs.cluster import Cluster
from spindle.costs.graph import MetaGraph
from spindle.costs.memory import (
    GB,
    MemoryLedger,
    MemoryModel,
    format_gb,
    memory_report,
)
from spindle.plan.contract import MetaOp, Plan, Slice, Wave
from spindle.plan.layout import (
    ParameterIndex,
    executing_devices,
    pieces,
    row_ranges,
    slice_inputs,
    value_elements,
)
from spindle.planner.baselines import place_naive
from spindle.planner.simulator import Communication, Links, communication, links_for_cluster

log = logging.getLogger(__name__)


class PlacementError(ValueError):
    """No placement fits: the message is one line naming the device, its MetaOps and the
    shortfall."""


# --- Spindle's placement ----------------------------------------------------------------------

LOCALITY, BALANCE = 0, 1
# tie-break weights, in seconds per unit: any real saving (>= ~1 ns) beats best fit, and best
# fit beats free memory in LOCALITY mode; in BALANCE mode free memory beats everything
_FIT_S = 1e-10  # per device a node would have left over
_FREE_S = {LOCALITY: 1e-22, BALANCE: 1e-6}  # per free byte (80 GB -> 1e-11 s / 8e4 s)


@dataclass
class _Overflow(Exception):
    wave: int
    spec: Slice
    device: int
    need: float
    free: float


@dataclass(frozen=True)
class _Source:
    """Rows of a slice's input held by a device group: member i holds [i*B/k, (i+1)*B/k)."""

    devices: tuple[int, ...]
    bytes_per_row: float  # forward bytes per sample


@dataclass
class _Pending:
    """A slice of the current wave waiting for its devices, with what devices are worth to it."""

    key: tuple[bool, int, float, int]
    s: Slice
    m: MetaOp
    n_exec: int
    srcs: list[_Source]
    dev: np.ndarray
    node: np.ndarray
    keep: bool


class _Placer:
    def __init__(self, graph: MetaGraph, cluster: Cluster, model: MemoryModel,
                 capacity: float, index: ParameterIndex, param_weight: float = 1.0) -> None:
        self.graph = graph
        self.n_dev = cluster.num_devices
        self.dpn = cluster.devices_per_node
        self.n_nodes = cluster.num_nodes
        self.node_of = np.arange(self.n_dev) // self.dpn
        hw = cluster.hardware
        # seconds saved per forward byte kept on the device / in the node (the same bytes go
        # back in backward), and per parameter already held on the device / in the node (a
        # ring all-reduce moves ~2x the gradient bytes through every member)
        gap = max(1.0 / hw.inter_node_bandwidth - 1.0 / hw.intra_node_bandwidth, 0.0)
        self.local_s = 2.0 / hw.intra_node_bandwidth
        self.node_s = 2.0 * gap
        self.param_dev_s = param_weight * 2.0 * hw.grad_bytes / hw.intra_node_bandwidth
        self.param_node_s = param_weight * 2.0 * hw.grad_bytes * gap
        self.capacity = capacity
        self.model = model
        self.ledger = MemoryLedger(graph, model, self.n_dev, index)
        self.last: dict[int, tuple[int, ...]] = {}
        self.consumers: dict[int, list[int]] = {m.id: [] for m in graph.metaops}
        for m in graph.metaops:
            for d in m.deps:
                self.consumers[d].append(m.id)

    # -- inputs of a slice ---------------------------------------------------------------------
    def sources(self, s: Slice) -> list[_Source]:
        ab = self.model.activation_bytes
        metaops = self.graph.metaops
        values = slice_inputs(metaops, s.metaop, s.layer_start)
        return [_Source(self.last[v[0]], value_elements(metaops, v) * ab)
                for v in values if value_elements(metaops, v) > 0]

    def values(self, s: Slice, m: MetaOp, n_exec: int, sources: list[_Source]
               ) -> tuple[np.ndarray, np.ndarray]:
        """What placing slice ``s`` on a device / in a node saves, in device-seconds per
        iteration: per device, its input rows it already holds (no transfer) and the slice's
        parameters it already holds (no new sync load on it); per node, the input bytes and
        the parameter holders already inside it (intra- instead of inter-node traffic)."""
        dev = np.zeros(self.n_dev)
        node = np.zeros(self.n_nodes)
        b = m.batch
        for src in sources:
            k = len(src.devices)
            idx = np.asarray(src.devices)
            dev[idx] += min(b / k, b / n_exec) * src.bytes_per_row * self.local_s
            np.add.at(node, self.node_of[idx], b / k * src.bytes_per_row * self.node_s)
        index = self.ledger.index
        assert index is not None
        ids = index.slice_ids(s.metaop, s.layer_start, s.layer_end)
        holds = self.ledger.holds[ids]
        if holds.any():
            sizes = index.grad_sizes[ids]  # what the devices holding them will all-reduce
            dev += (sizes @ holds) * self.param_dev_s
            pad = self.n_nodes * self.dpn - self.n_dev
            if pad:
                holds = np.concatenate([holds, np.zeros((len(ids), pad), dtype=bool)], axis=1)
            in_node = holds.reshape(len(ids), self.n_nodes, self.dpn).any(axis=2)
            node += (sizes @ in_node) * self.param_node_s * n_exec
        return dev, node

    def partner_bonus(self, m: MetaOp, s: Slice, placed_now: dict[int, tuple[int, ...]]
                      ) -> np.ndarray:
        """Node bonus where the other producers of this MetaOp's consumers are (the flows meet
        at the consumer, which can then stay inside one node)."""
        bonus = np.zeros(self.n_nodes)
        if s.layer_end != m.num_layers or m.cost.out_elements_per_sample <= 0:
            return bonus
        mine = m.batch * m.cost.out_elements_per_sample * self.model.activation_bytes
        for c in self.consumers[m.id]:
            for p in self.graph.metaops[c].deps:
                where = placed_now.get(p) or self.last.get(p)
                if p == m.id or not where:
                    continue
                pm = self.graph.metaops[p]
                theirs = pm.batch * pm.cost.out_elements_per_sample * self.model.activation_bytes
                w = min(mine, theirs) * self.node_s / len(where)
                np.add.at(bonus, self.node_of[np.asarray(where)], w)
        return bonus

    # -- choosing a group ----------------------------------------------------------------------
    def choose(self, avail: np.ndarray, score: np.ndarray, node_bonus: np.ndarray, n: int
               ) -> np.ndarray:
        """``n`` available devices: the best single node that has room (best fit on ties), else
        the fewest, best nodes."""
        pad = self.n_nodes * self.dpn - self.n_dev
        s = np.where(avail, score, -np.inf)
        if pad:
            s = np.concatenate([s, np.full(pad, -np.inf)])
        grid = s.reshape(self.n_nodes, self.dpn)
        order = np.argsort(-grid, axis=1, kind="stable")
        ranked = np.take_along_axis(grid, order, axis=1)
        counts = np.isfinite(ranked).sum(axis=1)
        if n <= self.dpn and (counts >= n).any():
            top = np.where(counts >= n, ranked[:, :n].sum(axis=1, where=counts[:, None] >= n,
                                                       initial=0.0), -np.inf)
            total = top + node_bonus - _FIT_S * (counts - n)
            total[counts < n] = -np.inf
            x = int(np.argmax(total))
            return x * self.dpn + order[x, :n]
        finite = np.where(np.isfinite(ranked), ranked, 0.0)
        node_value = finite.sum(axis=1) + node_bonus
        chosen: list[np.ndarray] = []
        left = n
        for x in np.lexsort((-node_value, -counts)):  # most free devices first, then value
            if counts[x] == 0 or left == 0:
                break
            take = min(left, int(counts[x]))
            chosen.append(x * self.dpn + order[x, :take])
            left -= take
        return np.concatenate(chosen)

    def order_group(self, group: np.ndarray, m: MetaOp, n_exec: int, sources: list[_Source]
                    ) -> list[int]:
        """Assign the group's devices to row positions: own rows first, then rows in the node."""
        members = set(int(d) for d in group)
        own: dict[tuple[int, int], float] = {}  # (device, position) -> bytes it holds already
        node_pos: dict[tuple[int, int], float] = {}  # (node, position) -> bytes held in node
        positions = tuple(enumerate(row_ranges(m.batch, n_exec)))
        for src in sources:
            held = tuple(zip(src.devices, row_ranges(m.batch, len(src.devices))))
            # producer-major, as the sums were always taken
            for p in sorted(pieces(held, positions), key=lambda p: (p.src_rows.start, p.dst)):
                d, j, ov = p.src, p.dst, p.rows.size * src.bytes_per_row
                if d in members:
                    own[(d, j)] = own.get((d, j), 0.0) + ov
                key = (int(self.node_of[d]), j)
                node_pos[key] = node_pos.get(key, 0.0) + ov
        pos: dict[int, int] = {}
        used: set[int] = set()
        for (d, j), _ in sorted(own.items(), key=lambda kv: (-kv[1], kv[0])):
            if j not in pos and d not in used:
                pos[j] = d
                used.add(d)
        rest = [int(d) for d in group if int(d) not in used]
        if node_pos and rest:
            by_node: dict[int, list[int]] = {}
            for d in rest:
                by_node.setdefault(int(self.node_of[d]), []).append(d)
            for (x, j), _ in sorted(node_pos.items(), key=lambda kv: (-kv[1], kv[0])):
                if j not in pos and by_node.get(x):
                    d = by_node[x].pop(0)
                    pos[j] = d
                    used.add(d)
            rest = [d for d in rest if d not in used]
        out = [pos.get(j, -1) for j in range(n_exec)]
        it = iter(rest)
        out = [d if d >= 0 else next(it) for d in out]
        return out + list(it)  # a loss slice's idle devices last

    # -- one wave ------------------------------------------------------------------------------
    def place_wave(self, wi: int, spec: Wave, mode: int) -> Wave:
        if spec.devices_used > self.n_dev:
            raise PlacementError(
                f"wave {wi} uses {spec.devices_used} devices, only {self.n_dev} exist")
        free = np.ones(self.n_dev, dtype=bool)
        chosen: dict[int, tuple[int, ...]] = {}
        pending: dict[int, _Pending] = {}
        for i, s in enumerate(spec.slices):
            m = self.graph.metaops[s.metaop]
            n_exec = len(executing_devices(m, tuple(range(s.n))))
            srcs = self.sources(s)
            dev, node = self.values(s, m, n_exec, srcs)
            prev = self.last.get(m.id) if s.layer_start > 0 else None
            keep = prev is not None and len(prev) == s.n
            gain = float(np.sort(dev)[-n_exec:].sum() + node.max())
            # slices that stay put, then groups bigger than a node, then the most to gain
            key = (not keep, -s.n if s.n > self.dpn else 0, -gain, i)
            pending[i] = _Pending(key, s, m, n_exec, srcs, dev, node, keep)
        placed_now: dict[int, tuple[int, ...]] = {}
        for p in sorted(pending.values(), key=lambda p: p.key):
            i, s, m, n_exec = p.key[-1], p.s, p.m, p.n_exec
            del pending[i]
            room = self.capacity - self.ledger.total
            add = self.ledger.added_bytes(s.metaop, s.layer_start, s.layer_end, s.n)
            fits = add <= room
            if p.keep and mode == LOCALITY:
                kept = np.asarray(self.last[m.id])
                if free[kept].all() and fits[kept[:n_exec]].all():
                    self._commit(chosen, placed_now, free, i, s, tuple(int(d) for d in kept))
                    continue
            avail = free & fits
            if int(avail.sum()) < n_exec:
                cand = np.flatnonzero(free)
                d = int(cand[np.argmin(add[cand] - room[cand])])
                raise _Overflow(wi, s, d, float(self.ledger.total[d] + add[d]),
                                float(self.capacity))
            # what a device is worth to the slices still waiting in this wave (regret)
            reserve = np.max([q.dev for q in pending.values()], axis=0) if pending else 0.0
            # free memory after the slice (capacity - used - add), without the constant capacity
            score = p.dev - reserve - _FREE_S[mode] * (self.ledger.total + add)
            bonus = p.node + self.partner_bonus(m, s, placed_now)
            group = self.choose(avail, score, bonus, n_exec)
            ordered = self.order_group(group, m, n_exec, p.srcs)
            if n_exec < s.n:  # a loss slice: idle companions, near the executing device
                others = free.copy()
                others[ordered] = False
                near = np.where(np.arange(self.n_nodes) == self.node_of[ordered[0]], 1.0, 0.0)
                extra = self.choose(others, -reserve * np.ones(self.n_dev), near, s.n - n_exec)
                ordered = ordered + [int(d) for d in extra]
            self._commit(chosen, placed_now, free, i, s, tuple(ordered))
        slices = tuple(
            s.placed_on(chosen[i]) for i, s in enumerate(spec.slices)
        )
        for sl in slices:
            self.last[sl.metaop] = sl.devices
        return Wave(slices=slices, level=spec.level)

    def _commit(self, chosen: dict[int, tuple[int, ...]], placed_now: dict[int, tuple[int, ...]],
                free: np.ndarray, i: int, s: Slice, devices: tuple[int, ...]) -> None:
        chosen[i] = devices
        placed_now[s.metaop] = devices
        free[list(devices)] = False
        self.ledger.add(s.placed_on(devices))


# the heuristic's weightings tried by :func:`place`: (name, weight of parameter co-location)
VARIANTS: tuple[tuple[str, float], ...] = (("spindle", 1.0), ("spindle-flows", 0.1),
                                           ("spindle-flows-only", 0.0))


@dataclass
class PlacementCandidate:
    """One placement :func:`place` considered, with its simulated communication."""

    name: str
    waves: list[Wave]
    communication: Communication


def place_greedy(
    graph: MetaGraph,
    waves: list[Wave],
    cluster: Cluster,
    memory_model: MemoryModel | None = None,
    capacity_bytes: float | None = None,
    index: ParameterIndex | None = None,
    param_weight: float = 1.0,
) -> list[Wave]:
    """One run of the greedy placement (module docstring), with backtracking on overflow."""
    model = memory_model or cluster.memory_model()
    capacity = float(cluster.memory_bytes if capacity_bytes is None else capacity_bytes)
    index = index or graph.parameter_index
    if not math.isinf(capacity):
        _check_alone(graph, waves, model, capacity, index)
    modes = [LOCALITY] * len(waves)
    span = 1
    while True:
        placer = _Placer(graph, cluster, model, capacity, index, param_weight)
        try:
            return [placer.place_wave(i, w, modes[i]) for i, w in enumerate(waves)]
        except _Overflow as ov:
            if all(x == BALANCE for x in modes[: ov.wave + 1]):
                raise _error(graph, placer, ov) from None
            first = max(ov.wave + 1 - span, 0)
            log.info("placement: wave %d overflows; backtracking to wave %d in balance mode",
                     ov.wave, first)
            for k in range(first, ov.wave + 1):
                modes[k] = BALANCE
            span *= 2


def place_candidates(
    graph: MetaGraph,
    waves: list[Wave],
    cluster: Cluster,
    memory_model: MemoryModel | None = None,
    capacity_bytes: float | None = None,
    index: ParameterIndex | None = None,
    wave_compute: Sequence[float] | None = None,
    links: Links | None = None,
    only: str | None = None,
) -> list[PlacementCandidate]:
    """Every placement :func:`place` chooses from: the greedy placement under each weighting of
    :data:`VARIANTS`, and the sequential placement when it fits memory; each with its simulated
    send/recv and parameter-sync time on ``links`` (default: ``cluster``'s; with the waves'
    compute times, the sync overlapped with backward as the simulator has it).  ``only``: just
    the candidate of that name."""
    model = memory_model or cluster.memory_model()
    capacity = float(cluster.memory_bytes if capacity_bytes is None else capacity_bytes)
    index = index or graph.parameter_index
    links = links or links_for_cluster(cluster, model.activation_bytes)

    def candidate(name: str, placed: list[Wave]) -> PlacementCandidate:
        plan = placed_plan(graph, cluster, name, placed, model)
        return PlacementCandidate(name, placed,
                                  communication(plan, graph, links, wave_compute, index))

    out: list[PlacementCandidate] = []
    errors: list[PlacementError] = []
    for name, weight in [v for v in VARIANTS if only in (None, v[0])]:
        try:
            placed = place_greedy(graph, waves, cluster, model, capacity, index, weight)
        except PlacementError as err:
            errors.append(err)
            continue
        out.append(candidate(name, placed))
    naive = place_naive(waves, cluster.num_devices)
    if only in (None, "sequential") and (math.isinf(capacity) or memory_report(
            placed_plan(graph, cluster, "sequential", naive), graph, model, capacity,
            index).fits()):
        out.append(candidate("sequential", naive))
    if not out:
        raise errors[0] if errors else PlacementError("sequential placement: out of memory")
    return out


def placed_plan(graph: MetaGraph, cluster: Cluster, name: str, waves: Sequence[Wave],
                model: MemoryModel | None = None) -> Plan:
    """``graph`` on ``cluster`` in the placed ``waves``, with ``model``'s memory strategy."""
    recompute, zero = model.strategy(graph.metaops) if model else ((), {})
    return Plan(name, graph.workload.name, graph.workload.fingerprint(), cluster.num_devices,
                cluster.devices_per_node, cluster.hardware.name, tuple(graph.metaops),
                tuple(waves), recompute=recompute, zero=zero)


def best_candidate(candidates: list[PlacementCandidate]) -> PlacementCandidate:
    """Least simulated send/recv + sync time; then fewer inter-node bytes; then list order."""
    return min(candidates, key=lambda c: (round(c.communication.time_s, 9),
                                          c.communication.bytes_inter))


def place(
    graph: MetaGraph,
    waves: list[Wave],
    cluster: Cluster,
    memory_model: MemoryModel | None = None,
    capacity_bytes: float | None = None,
    index: ParameterIndex | None = None,
    wave_compute: Sequence[float] | None = None,
    links: Links | None = None,
) -> list[Wave]:
    """Spindle's topology- and memory-aware placement of ``waves`` on ``cluster``: the best of
    :func:`place_candidates` by simulated communication time (module docstring).
    ``memory_model`` defaults to the cluster's precision; ``capacity_bytes`` to the cluster's
    device memory (``math.inf`` turns the memory check off).  Raises :class:`PlacementError`
    when no candidate fits."""
    best = best_candidate(place_candidates(graph, waves, cluster, memory_model, capacity_bytes,
                                           index, wave_compute, links))
    log.info("placement: %s (send/recv %.3g s, sync %.3g s, %.3g GB inter-node)", best.name,
             best.communication.send_recv_s, best.communication.sync_s,
             best.communication.bytes_inter / GB)
    return best.waves


def _check_alone(graph: MetaGraph, waves: list[Wave], model: MemoryModel,
                 capacity: float, index: ParameterIndex) -> None:
    """A slice that does not fit even on an empty device: no placement can help."""
    index_free = MemoryLedger(graph, model, 1, index)
    for wi, w in enumerate(waves):
        for s in w.slices:
            need = float(index_free.added_bytes(s.metaop, s.layer_start, s.layer_end, s.n)[0])
            if need > capacity:
                m = graph.metaops[s.metaop]
                raise PlacementError(
                    f"out of memory: wave {wi}, {m.name} layers [{s.layer_start}, {s.layer_end})"
                    f" on {s.n} device(s) needs {format_gb(need)} per device even on an empty"
                    f" device; every device has {format_gb(capacity)} (short by"
                    f" {format_gb(need - capacity)})"
                )


def _error(graph: MetaGraph, placer: _Placer, ov: _Overflow) -> PlacementError:
    m = graph.metaops[ov.spec.metaop]
    names = [graph.metaops[i].name for i in dict.fromkeys(placer.ledger.metaops_on[ov.device])]
    return PlacementError(
        f"out of memory: wave {ov.wave}, placing {m.name} layers [{ov.spec.layer_start},"
        f" {ov.spec.layer_end}) on {ov.spec.n} device(s): device {ov.device} would need"
        f" {format_gb(ov.need)} of {format_gb(ov.free)} (short by {format_gb(ov.need - ov.free)});"
        f" it already runs {', '.join(names) or 'nothing'}"
    )


__all__ = ["place", "place_greedy", "place_candidates", "best_candidate",
           "place_naive", "PlacementCandidate", "PlacementError", "VARIANTS"]
