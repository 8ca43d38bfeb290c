"""Device placement: map each wave's device groups onto concrete devices (SPINDLE.md section 7).

Two placements turn a planner's unplaced waves (:class:`spindle.schedule.WaveSpec`) into
:class:`spindle.plan.Wave` lists:

* :func:`place_naive` ("sequential placement", the comparison): within a wave, slices take
  consecutive device ids in order, except that a slice whose MetaOp ran in the previous wave on a
  group of the same size keeps those devices when they are free.

* :func:`place` (Spindle's placement), wave by wave, each wave's slices in priority order:

  1. a slice that continues its MetaOp on a group of the same size keeps the previous devices
     when they are free and have room (no transfer, parameters already there);
  2. bigger groups next (they need whole nodes), then by the bytes the slice receives;
  3. every other slice scores each free device and each node, in *seconds saved* per iteration
     on that device: input rows it already holds (no transfer at all), input bytes that are
     already inside the node (intra- instead of inter-node link), parameters of the slice it
     already holds (a shared component layer: smaller parameter-sync groups, and its memory is
     counted once), and a node bonus where the slice's *flow partners* sit (the other producers
     of its consumer MetaOps, so that the consumer can stay inside one node); then it takes the
     best node that has enough free devices (best fit on ties, so whole nodes stay free for big
     groups), or the fewest, best nodes when no node has room; free memory breaks the remaining
     ties (balance: the device with most free memory);
  4. inside the chosen group, devices take the row positions (``transfer_rows`` order) that
     overlap the rows they already hold, then those held inside their node.

  Memory (:class:`spindle.memory.MemoryLedger`): a device is a candidate only if the slice's new
  parameters, saved activations and transient still fit.  When a slice cannot be placed, the
  placement backtracks: it redoes the failing wave and then ever more earlier waves (1, 2, 4, ...)
  in *balance* mode, where free memory comes before locality.  If even the fully balanced
  placement overflows, :class:`PlacementError` names the device, the MetaOps it runs and the
  shortfall in GB, in one line.

Cost: numpy over devices per slice; 64 devices take milliseconds, 1024 devices well under a
second per hundred slices.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from spindle.cluster import Cluster
from spindle.graph import MetaGraph, MetaOp
from spindle.memory import GB, MemoryLedger, MemoryModel, ParameterIndex, executing_devices
from spindle.plan import Slice, Wave
from spindle.schedule import SliceSpec, WaveSpec

log = logging.getLogger(__name__)


class PlacementError(ValueError):
    """No placement fits: the message is one line naming the device, its MetaOps and the
    shortfall."""


def place_naive(waves: list[WaveSpec], num_devices: int) -> list[Wave]:
    placed: list[Wave] = []
    last_devices: dict[int, tuple[int, ...]] = {}
    for spec in waves:
        if spec.devices_used > num_devices:
            raise PlacementError(
                f"wave uses {spec.devices_used} devices, only {num_devices} exist")
        free = list(range(num_devices))
        chosen: dict[int, tuple[int, ...]] = {}
        # first, slices that can stay where their MetaOp already is
        for i, s in enumerate(spec.slices):
            prev = last_devices.get(s.metaop)
            if prev is not None and len(prev) == s.n and all(d in free for d in prev):
                chosen[i] = prev
                for d in prev:
                    free.remove(d)
        for i, s in enumerate(spec.slices):
            if i not in chosen:
                chosen[i] = tuple(free[: s.n])
                del free[: s.n]
        slices = tuple(
            Slice(s.metaop, s.layer_start, s.layer_end, chosen[i], s.time_s)
            for i, s in enumerate(spec.slices)
        )
        for s in slices:
            last_devices[s.metaop] = s.devices
        placed.append(Wave(slices=slices, level=spec.level))
    return placed


# --- Spindle's placement ----------------------------------------------------------------------

LOCALITY, BALANCE = 0, 1
# tie-break weights, in seconds per unit: any real saving (>= ~1 ns) beats best fit, and best
# fit beats free memory in LOCALITY mode; in BALANCE mode free memory beats everything
_FIT_S = 1e-10  # per device a node would have left over
_FREE_S = {LOCALITY: 1e-22, BALANCE: 1e-6}  # per free byte (80 GB -> 1e-11 s / 8e4 s)


@dataclass
class _Overflow(Exception):
    wave: int
    spec: SliceSpec
    device: int
    need: float
    free: float


@dataclass(frozen=True)
class _Source:
    """Rows of a slice's input held by a device group: member i holds [i*B/k, (i+1)*B/k)."""

    devices: tuple[int, ...]
    bytes_per_row: float  # forward bytes per sample


class _Placer:
    def __init__(self, graph: MetaGraph, cluster: Cluster, model: MemoryModel,
                 capacity: float, index: ParameterIndex) -> None:
        self.graph = graph
        self.n_dev = cluster.num_devices
        self.dpn = cluster.devices_per_node
        self.n_nodes = cluster.num_nodes
        self.node_of = np.arange(self.n_dev) // self.dpn
        hw = cluster.hardware
        # seconds saved per forward byte (the same bytes go back in backward)
        self.local_s = 2.0 / hw.intra_node_bandwidth
        self.node_s = 2.0 * max(1.0 / hw.inter_node_bandwidth - 1.0 / hw.intra_node_bandwidth, 0.0)
        self.param_s = 2.0 * hw.grad_bytes / hw.inter_node_bandwidth
        self.capacity = capacity
        self.model = model
        self.ledger = MemoryLedger(graph, model, self.n_dev, index)
        self.last: dict[int, tuple[int, ...]] = {}
        self.consumers: dict[int, list[int]] = {m.id: [] for m in graph.metaops}
        for m in graph.metaops:
            for d in m.deps:
                self.consumers[d].append(m.id)

    # -- inputs of a slice ---------------------------------------------------------------------
    def sources(self, s: SliceSpec) -> list[_Source]:
        m = self.graph.metaops[s.metaop]
        ab = self.model.activation_bytes
        if s.layer_start > 0:
            return [_Source(self.last[m.id], m.act_elements_per_sample * ab)]
        return [_Source(self.last[d], self.graph.metaops[d].out_elements_per_sample * ab)
                for d in m.deps if self.graph.metaops[d].out_elements_per_sample > 0]

    def input_scores(self, m: MetaOp, n_exec: int, sources: list[_Source]
                     ) -> tuple[np.ndarray, np.ndarray, float]:
        """Per device: seconds saved by rows it holds; per node: seconds saved (per executing
        device) by input bytes inside it; and the slice's total forward input bytes."""
        dev = np.zeros(self.n_dev)
        node = np.zeros(self.n_nodes)
        total = 0.0
        b = m.batch
        for src in sources:
            k = len(src.devices)
            held = b / k * src.bytes_per_row
            total += b * src.bytes_per_row
            idx = np.asarray(src.devices)
            dev[idx] += min(b / k, b / n_exec) * src.bytes_per_row * self.local_s
            np.add.at(node, self.node_of[idx], held * self.node_s / n_exec)
        return dev, node, total

    def partner_bonus(self, m: MetaOp, s: SliceSpec, placed_now: dict[int, tuple[int, ...]]
                      ) -> np.ndarray:
        """Node bonus for the other producers of this MetaOp's consumers (flows meet there)."""
        bonus = np.zeros(self.n_nodes)
        if s.layer_end != m.num_layers or m.out_elements_per_sample <= 0:
            return bonus
        mine = m.batch * m.out_elements_per_sample * self.model.activation_bytes
        for c in self.consumers[m.id]:
            for p in self.graph.metaops[c].deps:
                where = placed_now.get(p) or self.last.get(p)
                if p == m.id or not where:
                    continue
                pm = self.graph.metaops[p]
                theirs = pm.batch * pm.out_elements_per_sample * self.model.activation_bytes
                w = min(mine, theirs) * self.node_s / len(where) / max(s.n, 1)
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
        b = m.batch
        r = b / n_exec
        members = set(int(d) for d in group)
        pairs: list[tuple[float, int, int]] = []
        node_pos: dict[tuple[int, int], float] = {}
        for src in sources:
            k = len(src.devices)
            for i, d in enumerate(src.devices):
                lo, hi = i * b / k, (i + 1) * b / k
                for j in range(int(lo // r), min(int(math.ceil(hi / r)), n_exec)):
                    ov = (min(hi, (j + 1) * r) - max(lo, j * r)) * src.bytes_per_row
                    if ov <= 0:
                        continue
                    if d in members:
                        pairs.append((ov, d, j))
                    key = (int(self.node_of[d]), j)
                    node_pos[key] = node_pos.get(key, 0.0) + ov
        pos: dict[int, int] = {}
        used: set[int] = set()
        for _, d, j in sorted(pairs, key=lambda p: (-p[0], p[1], p[2])):
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
    def place_wave(self, wi: int, spec: WaveSpec, mode: int) -> Wave:
        if spec.devices_used > self.n_dev:
            raise PlacementError(
                f"wave {wi} uses {spec.devices_used} devices, only {self.n_dev} exist")
        free = np.ones(self.n_dev, dtype=bool)
        chosen: dict[int, tuple[int, ...]] = {}
        info = []
        for i, s in enumerate(spec.slices):
            m = self.graph.metaops[s.metaop]
            srcs = self.sources(s)
            volume = sum(m.batch * x.bytes_per_row for x in srcs)
            prev = self.last.get(m.id) if s.layer_start > 0 else None
            keep = prev is not None and len(prev) == s.n
            # slices that stay put, then groups bigger than a node, then by bytes received
            info.append(((not keep, -s.n if s.n > self.dpn else 0, -volume, i), m, srcs, keep))
        info.sort(key=lambda t: t[0])
        placed_now: dict[int, tuple[int, ...]] = {}
        room = self.capacity - self.ledger.total
        for key, m, srcs, keep in info:
            i = key[-1]
            s = spec.slices[i]
            add = self.ledger.added_bytes((s.metaop, s.layer_start, s.layer_end, s.n))
            fits = add <= room
            n_exec = len(executing_devices(m, tuple(range(s.n))))
            if keep and mode == LOCALITY:
                prev = np.asarray(self.last[m.id])
                if free[prev].all() and fits[prev[:n_exec]].all():
                    devices = tuple(int(d) for d in prev)
                    self._commit(chosen, placed_now, free, i, s, devices)
                    room = self.capacity - self.ledger.total
                    continue
            avail = free & fits
            if int(avail.sum()) < n_exec:
                cand = np.flatnonzero(free)
                d = int(cand[np.argmin(add[cand] - room[cand])])
                raise _Overflow(wi, s, d, float(self.ledger.total[d] + add[d]),
                                float(self.capacity))
            dev_in, node_in, _ = self.input_scores(m, n_exec, srcs)
            ids = self.ledger.index.slice_ids(s.metaop, s.layer_start, s.layer_end)  # type: ignore[union-attr]
            sizes = self.ledger.index.sizes[ids]  # type: ignore[union-attr]
            held = sizes @ self.ledger.holds[ids] if len(ids) else np.zeros(self.n_dev)
            score = dev_in + held * self.param_s / max(n_exec, 1) + _FREE_S[mode] * (room - add)
            bonus = node_in + self.partner_bonus(m, s, placed_now)
            group = self.choose(avail, score, bonus, n_exec)
            ordered = self.order_group(group, m, n_exec, srcs)
            if n_exec < s.n:  # a loss slice: idle companions, near the executing device
                others = free.copy()
                others[ordered] = False
                extra = self.choose(others, np.zeros(self.n_dev), np.where(
                    np.arange(self.n_nodes) == self.node_of[ordered[0]], 1.0, 0.0), s.n - n_exec)
                ordered = ordered + [int(d) for d in extra]
            self._commit(chosen, placed_now, free, i, s, tuple(ordered))
            room = self.capacity - self.ledger.total
        slices = tuple(
            Slice(s.metaop, s.layer_start, s.layer_end, chosen[i], s.time_s)
            for i, s in enumerate(spec.slices)
        )
        for sl in slices:
            self.last[sl.metaop] = sl.devices
        return Wave(slices=slices, level=spec.level)

    def _commit(self, chosen: dict[int, tuple[int, ...]], placed_now: dict[int, tuple[int, ...]],
                free: np.ndarray, i: int, s: SliceSpec, devices: tuple[int, ...]) -> None:
        chosen[i] = devices
        placed_now[s.metaop] = devices
        free[list(devices)] = False
        self.ledger.add(Slice(s.metaop, s.layer_start, s.layer_end, devices, s.time_s))


def place(
    graph: MetaGraph,
    waves: list[WaveSpec],
    cluster: Cluster,
    memory_model: MemoryModel | None = None,
    capacity_bytes: float | None = None,
    index: ParameterIndex | None = None,
) -> list[Wave]:
    """Spindle's topology- and memory-aware placement of ``waves`` on ``cluster`` (see the module
    docstring).  ``memory_model`` defaults to the cluster's precision; ``capacity_bytes`` to the
    cluster's device memory (``math.inf`` turns the memory check off)."""
    model = memory_model or cluster.memory_model()
    capacity = float(cluster.memory_bytes if capacity_bytes is None else capacity_bytes)
    index = index or ParameterIndex(graph)
    _check_alone(graph, waves, model, capacity, index)
    modes = [LOCALITY] * len(waves)
    span = 1
    while True:
        placer = _Placer(graph, cluster, model, capacity, index)
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


def _check_alone(graph: MetaGraph, waves: list[WaveSpec], model: MemoryModel,
                 capacity: float, index: ParameterIndex) -> None:
    """A slice that does not fit even on an empty device: no placement can help."""
    index_free = MemoryLedger(graph, model, 1, index)
    for wi, w in enumerate(waves):
        for s in w.slices:
            need = float(index_free.added_bytes((s.metaop, s.layer_start, s.layer_end, s.n))[0])
            if need > capacity:
                m = graph.metaops[s.metaop]
                raise PlacementError(
                    f"out of memory: wave {wi}, {m.name} layers [{s.layer_start}, {s.layer_end})"
                    f" on {s.n} device(s) needs {need / GB:.1f} GB per device even alone; any"
                    f" device has {capacity / GB:.1f} GB (short by {(need - capacity) / GB:.1f} GB)"
                )


def _error(graph: MetaGraph, placer: _Placer, ov: _Overflow) -> PlacementError:
    m = graph.metaops[ov.spec.metaop]
    names = [graph.metaops[i].name for i in dict.fromkeys(placer.ledger.metaops_on[ov.device])]
    names.append(f"+ {m.name}[{ov.spec.layer_start}:{ov.spec.layer_end}]")
    return PlacementError(
        f"out of memory: wave {ov.wave}, placing {m.name} layers [{ov.spec.layer_start},"
        f" {ov.spec.layer_end}) on {ov.spec.n} device(s): device {ov.device} would need"
        f" {ov.need / GB:.1f} GB of {ov.free / GB:.1f} GB (short by"
        f" {(ov.need - ov.free) / GB:.1f} GB); it runs {', '.join(names)}"
    )


__all__ = ["place", "place_naive", "PlacementError"]
