"""Simulator: the iteration time of any placed plan, from the estimator and the cluster's links.

The simulated iteration is what the runtime does, in order:

* compute: every wave, forward then backward, lasts as long as its slowest slice, charged with
  the estimator's *compute* time (``compute_time``: no gradient all-reduce inside), plus the
  runtime's own cost per wave (``Links.wave_overhead_s``, from a measured profile's runtime
  calibration: making autograd leaves, visiting the boundary, timers);
* send/recv: before a slice starts, its inputs (:func:`spindle.plan.layout.slice_inputs`) move
  from the devices that produced them, re-split over its group in the runtime's pieces
  (:func:`spindle.plan.layout.pieces`; a contrastive loss runs on the first device of its group
  with the whole batch); in backward the gradients travel the same way back.  A transfer is
  charged to the link it crosses (intra-node or inter-node); per wave boundary the slowest
  device's traffic counts, plus one latency of the slowest link crossed.  With chunked
  transfers (``Links.transfer_chunks`` K, the runtime's ``--transfer-chunks``) all but the last
  chunk of a boundary's traffic run under the forward of the wave before it and under the
  backward of the wave after it, as far as those last, scaled by ``sync_overlap`` (how much
  communication really runs beside compute: 0 on the CPU preset, as gloo shares the cores);
* parameter sync: after backward, every parameter's gradient is all-reduced (ZeRO: reduce-scattered,
  and the updated shards all-gathered after the step, ``gather_s``) inside its device
  group (all devices that execute an operator using it: the runtime's pools,
  :func:`spindle.plan.layout.parameter_pools`); groups that share a device run one after another;
  disjoint groups run side by side.  With the hardware's ``sync_overlap``, the runtime's buckets
  (:func:`spindle.plan.layout.sync_buckets`) start under the remaining backward waves.

:class:`Links` is what the simulator needs of a cluster; :func:`links_for_cluster` builds it
from a :class:`spindle.costs.cluster.Cluster`, so the placement, the memory model and the simulator
see the same nodes and bandwidths.  :func:`~spindle.plan.layout.predicted_send_bytes` is the
bytes the runtime sends per iteration for a plan (forward + backward, between different
devices).

* optimizer: every device then clips its gradients by the global norm (one scalar all-reduce
  over all ranks) and steps AdamW over the parameters it holds; the slowest device counts.  Its
  cost is the hardware's memory-bound AdamW time (bytes per parameter / HBM bandwidth) or, with a
  measured ``cpu`` profile, the measured phase ``fixed + per_param * parameters``.

Send/recv latency: the runtime packs all rows between two ranks into one message each way and
posts a boundary's messages in one ``batch_isend_irecv``; a boundary is charged one exchange
latency per peer of its busiest device, in forward and again in backward.

``schedule_s`` is the planner's own view (sum of wave lengths under ``time``, which includes a
per-layer data-parallel all-reduce).  ``makespan_s`` is compute + send/recv + sync + optimizer.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Collection, Sequence

import numpy as np

from spindle.costs.cluster import Cluster
from spindle.costs.estimator import Estimator
from spindle.costs.graph import MetaGraph
from spindle.costs.profile import Profile
from spindle.plan.contract import Plan, Slice, Wave
from spindle.plan.layout import (
    SYNC_BUCKET_BYTES,
    SYNC_MIN_BUCKET_BYTES,
    ParameterIndex,
    RowRange,
    chunk_ranges,
    inter_wave_transfers,
    local_rows,
    parameter_pools,
    parameter_use,
    ready_fractions,
    scatter_waves,
    sync_buckets,
    wave_use,
    zero_stages,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Links:
    """What the simulator needs of a cluster: bandwidths (bytes/s), latencies (s), element
    sizes.  ``inter_node_latency_s`` defaults to ``latency_s`` (the intra-node latency)."""

    devices_per_node: int
    intra_node_bw: float
    inter_node_bw: float
    latency_s: float = 0.0
    activation_bytes: int = 2
    grad_bytes: int = 2
    param_bytes: int = 4  # the parameters' dtype (ZeRO's all-gather of updated weights)
    inter_node_latency_s: float | None = None
    # point-to-point exchange at a wave boundary (default: the all-reduce figures)
    p2p_latency_s: float | None = None
    p2p_bw: float | None = None
    # the optimizer phase on one device: fixed + per_param * parameters it holds
    optimizer_fixed_s: float = 0.0
    optimizer_per_param_s: float = 0.0
    # whether optimizer_fixed_s already holds the clip-norm all-reduce (a measured phase does)
    optimizer_includes_clip: bool = False
    # what the runtime spends per wave beyond the slices' chains (a measured profile's
    # runtime calibration; 0 for the GPU presets, where no runtime was timed)
    wave_overhead_s: float = 0.0
    # the share of the gradient sync started under the remaining backward waves that really
    # overlaps them (HardwareModel.sync_overlap), and backward's share of a wave's compute
    sync_overlap: float = 0.0
    backward_share: float = 2.0 / 3.0
    # the runtime's sync buckets (spindle.runtime.param_groups; --min-bucket-bytes), started as
    # soon as their gradients are final inside a wave ("layer") or after the wave ("wave")
    sync_bucket_bytes: float = SYNC_BUCKET_BYTES
    sync_min_bucket_bytes: float = SYNC_MIN_BUCKET_BYTES
    sync_start: str = "layer"
    # the runtime's --transfer-chunks: a slice's rows sent in this many chunks as computed;
    # each chunk more costs every layer of a slice one more call's fixed part (the hardware
    # model's compute time of a call doing no work)
    transfer_chunks: int = 1
    layer_call_s: float = 0.0
    # measured times (seconds) by message size, used instead of latency + bytes / bandwidth
    # inside a node: an all-reduce's ring traffic (t(bytes, n) = measured(bytes * 2(n-1)/n)),
    # and a P2P exchange of that many bytes each way
    allreduce_time_of: Callable[[float, int], float] | None = field(default=None, compare=False)
    p2p_time_of: Callable[[float], float] | None = field(default=None, compare=False)

    def node(self, device: int) -> int:
        return device // self.devices_per_node

    def bandwidth(self, a: int, b: int) -> float:
        return self.intra_node_bw if self.node(a) == self.node(b) else self.inter_node_bw

    def latency(self, inter_node: bool) -> float:
        if inter_node and self.inter_node_latency_s is not None:
            return self.inter_node_latency_s
        return self.latency_s

    def p2p_latency(self, inter_node: bool) -> float:
        """Fixed cost of one batched P2P exchange with one peer."""
        if self.p2p_latency_s is not None and not inter_node:
            return self.p2p_latency_s
        return self.latency(inter_node)

    def p2p_bandwidth(self, a: int, b: int) -> float:
        if self.p2p_bw is not None and self.node(a) == self.node(b):
            return self.p2p_bw
        return self.bandwidth(a, b)

    def optimizer_s(self, params: float, num_devices: int) -> float:
        """The optimizer phase of a device holding ``params`` parameters: zero_grad, clipping
        by the global norm (one scalar all-reduce over the ``num_devices`` ranks) and AdamW."""
        t = self.optimizer_fixed_s + self.optimizer_per_param_s * max(params, 0.0)
        if not self.optimizer_includes_clip and num_devices > 1:
            t += self.latency(num_devices > self.devices_per_node)
        return t

    def allreduce_s(self, nbytes: float, group: tuple[int, ...]) -> float:
        """Ring all-reduce, as :meth:`spindle.costs.hardware.HardwareModel.allreduce_time`:
        latency + 2 (n-1)/n of the bytes over the group's slowest link."""
        n = len(group)
        if n <= 1 or nbytes <= 0:
            return 0.0
        inter = self.node(min(group)) != self.node(max(group))
        if self.allreduce_time_of is not None and not inter:
            return self.allreduce_time_of(nbytes, n)
        bw = self.inter_node_bw if inter else self.intra_node_bw
        return self.latency(inter) + 2.0 * (n - 1) / n * nbytes / bw

    def reduce_scatter_s(self, nbytes: float, group: tuple[int, ...]) -> float:
        """Ring reduce-scatter (or all-gather) of ``nbytes`` in all: half a ring all-reduce's
        traffic, (n-1)/n of the bytes, and one latency."""
        n = len(group)
        if n <= 1 or nbytes <= 0:
            return 0.0
        inter = self.node(min(group)) != self.node(max(group))
        if self.allreduce_time_of is not None and not inter:
            return self.allreduce_time_of(nbytes / 2.0, n)
        bw = self.inter_node_bw if inter else self.intra_node_bw
        return self.latency(inter) + (n - 1) / n * nbytes / bw

    def sync_s(self, nbytes: float, group: tuple[int, ...], stage: int) -> float:
        """A bucket's gradient collective: an all-reduce, or with ZeRO a reduce-scatter."""
        return (self.reduce_scatter_s if stage else self.allreduce_s)(nbytes, group)


def links_for_cluster(
    cluster: Cluster, activation_bytes: int | None = None, profile: Profile | None = None
) -> Links:
    """The simulator's view of ``cluster``: its nodes, bandwidths and latencies; activations in
    the cluster precision's element size (2 for bf16, 4 for fp32) unless given.

    The optimizer phase is the hardware's memory-bound AdamW step
    (:meth:`spindle.costs.hardware.HardwareModel.optimizer_time`).  With a measured ``profile`` of
    the ``cpu`` preset (gloo processes on this machine), the profile's measurements replace the
    preset's placeholders: the all-reduce latency and bus bandwidth, the P2P exchange latency
    and bandwidth, and the optimizer phase (``fixed + per_param * parameters``)."""
    hw = cluster.hardware
    links = Links(
        devices_per_node=cluster.devices_per_node,
        intra_node_bw=hw.intra_node_bandwidth,
        inter_node_bw=hw.inter_node_bandwidth,
        latency_s=hw.intra_node_latency_s,
        activation_bytes=activation_bytes or cluster.memory_model().activation_bytes,
        grad_bytes=hw.grad_bytes, param_bytes=cluster.memory_model().weight_bytes,
        inter_node_latency_s=hw.inter_node_latency_s,
        optimizer_per_param_s=hw.optimizer_time(1.0), sync_overlap=hw.sync_overlap,
        layer_call_s=hw.compute_time(0.0),
    )
    if profile is None:
        return links
    if hw.name != "cpu":
        log.info("profile %s: its gloo/optimizer measurements are of this machine, not of %s;"
                 " the simulator keeps the %s preset's links", profile.source, hw.name, hw.name)
        return links
    c = profile.collective
    updates: dict[str, object] = dict(
        intra_node_bw=c.bandwidth, inter_node_bw=c.bandwidth, latency_s=c.latency_s,
        inter_node_latency_s=c.latency_s, grad_bytes=profile.grad_bytes,
        sync_start="wave",  # the runtime's default on CPU (RunConfig.sync_start "auto")
    )
    if profile.p2p is not None:
        updates.update(p2p_latency_s=profile.p2p.latency_s, p2p_bw=profile.p2p.bandwidth,
                       p2p_time_of=profile.p2p.exchange_time)
    updates["allreduce_time_of"] = c.measured_allreduce_time
    if profile.optimizer is not None:
        updates.update(optimizer_fixed_s=profile.optimizer.fixed_s,
                       optimizer_per_param_s=profile.optimizer.per_param_s,
                       optimizer_includes_clip=True)
    if profile.runtime is not None:
        updates["wave_overhead_s"] = profile.runtime.wave_overhead_s
    return dataclasses.replace(links, **updates)  # type: ignore[arg-type]


@dataclass
class SimulationResult:
    schedule_s: float
    compute_s: float
    send_recv_s: float
    sync_s: float
    send_recv_bytes: float  # forward + backward, between different devices
    send_recv_bytes_intra: float
    send_recv_bytes_inter: float
    wave_compute_s: list[float] = field(default_factory=list)
    device_busy_s: list[float] = field(default_factory=list)
    optimizer_s: float = 0.0  # the slowest device's optimizer phase (clip + AdamW step)
    send_recv_latency_s: float = 0.0  # the part of send_recv_s that is per-exchange latency
    device_params: list[float] = field(default_factory=list)
    sync_serial_s: float = 0.0  # param sync were none of it overlapped with backward
    gather_s: float = 0.0  # ZeRO: the all-gather of updated shards after the step

    @property
    def hidden_share(self) -> float:
        """Share of the communication hidden under compute, as docs/method.md section 11 defines
        it: (compute + communication - overlapped total) / communication, with communication =
        send/recv + the whole sync, and the overlapped total what the iteration pays (0 when
        there is no communication)."""
        comm = self.send_recv_s + self.sync_serial_s + self.gather_s
        return (self.sync_serial_s - self.sync_s) / comm if comm > 0 else 0.0

    @property
    def makespan_s(self) -> float:
        return self.compute_s + self.send_recv_s + self.sync_s + self.optimizer_s + self.gather_s

    def as_dict(self) -> dict[str, float]:
        return {
            "schedule_s": self.schedule_s,
            "makespan_s": self.makespan_s,
            "compute_s": self.compute_s,
            "send_recv_s": self.send_recv_s,
            "send_recv_bytes": self.send_recv_bytes,
            "param_sync_s": self.sync_s,
            "optimizer_s": self.optimizer_s,
            "param_gather_s": self.gather_s,
        }


@dataclass(frozen=True)
class Communication:
    """The placement-dependent part of an iteration: inter-wave send/recv and parameter sync."""

    send_recv_s: float
    sync_s: float
    bytes_total: float  # forward + backward, between different devices
    bytes_intra: float
    bytes_inter: float
    latency_s: float = 0.0  # the per-exchange latency part of send_recv_s
    exchanges: int = 0  # forward + backward: boundary x peer-exchanges of the busiest device
    sync_serial_s: float = 0.0  # the sync were none of it overlapped (the busiest device's)
    gather_s: float = 0.0  # ZeRO's all-gather after the step (the busiest device's)

    @property
    def time_s(self) -> float:
        return self.send_recv_s + self.sync_s + self.gather_s


def wave_compute_times(waves: Sequence[Wave], graph: MetaGraph, estimator: Estimator,
                       links: Links, recompute: Collection[int] = ()) -> list[float]:
    """Every wave's compute (forward + backward): its slowest slice under the estimator's
    compute time, plus the runtime's per-wave cost.  A slice of a MetaOp in ``recompute`` runs
    its forward once more in backward (``1 - backward_share`` of its compute)."""
    again = 2.0 - links.backward_share
    k = links.transfer_chunks

    def chunked(s: Slice) -> float:  # a device's rows, cut as the runtime cuts them
        m = graph.metaops[s.metaop]
        cut = chunk_ranges(m, RowRange(0, local_rows(m, s.n)), k)
        return (k - 1) * s.num_layers * links.layer_call_s if cut else 0.0

    return [
        max((s.num_layers * estimator.compute_time(graph.metaops[s.metaop], s.n)
             * (again if s.metaop in recompute else 1.0) + chunked(s)
             for s in wave.slices), default=0.0) + links.wave_overhead_s
        for wave in waves
    ]


def communication(plan: Plan, graph: MetaGraph, links: Links,
                  wave_compute: Sequence[float] | None = None,
                  index: ParameterIndex | None = None) -> Communication:
    """Send/recv time and bytes of every wave boundary (forward, then the same volume of
    gradients back) and the parameter-sync time of the plan's device groups.  With the waves'
    compute times and ``links.sync_overlap > 0``, the sync is what is left after backward when
    buckets start under the remaining backward waves (:func:`overlapped_sync_s`), blended with
    the serial sync by ``sync_overlap``."""
    send_recv = latency = 0.0
    exchanges = 0
    total = intra = inter = 0.0
    for w, moves in enumerate(inter_wave_transfers(plan)):
        if not moves:
            continue
        out_t: dict[int, float] = defaultdict(float)
        in_t: dict[int, float] = defaultdict(float)
        peers: dict[int, set[int]] = defaultdict(set)
        directed: dict[tuple[int, int], float] = defaultdict(float)
        crosses = False
        for sd, dd, elems in moves:
            nbytes = elems * links.activation_bytes
            total += nbytes
            if links.node(sd) == links.node(dd):
                intra += nbytes
            else:
                inter += nbytes
                crosses = True
            t = nbytes / links.p2p_bandwidth(sd, dd)
            out_t[sd] += t
            in_t[dd] += t
            peers[sd].add(dd)
            peers[dd].add(sd)
            directed[(sd, dd)] += nbytes
        # the runtime packs everything between two ranks into one message each way and posts a
        # boundary's messages in one batch_isend_irecv: one exchange latency per peer
        n_peer = max(len(p) for p in peers.values())
        lat = links.p2p_latency(crosses) * n_peer
        boundary = lat + max(max(out_t.values()), max(in_t.values()))
        if links.p2p_time_of is not None and not crosses:
            # measured exchanges: each pair's larger direction, a device's pairs one after another
            per_device: dict[int, float] = defaultdict(float)
            for a, b in {tuple(sorted(k)) for k in directed}:
                t = links.p2p_time_of(max(directed.get((a, b), 0.0), directed.get((b, a), 0.0)))
                per_device[a] += t
                per_device[b] += t
            boundary = max(per_device.values())
        if links.transfer_chunks > 1 and wave_compute is not None:
            # chunked transfers: all but the last chunk travel under the producers' forward
            # (the wave before) and the consumers' backward (this wave), as far as they overlap
            k, x = links.transfer_chunks, links.sync_overlap
            share = 1.0 - links.backward_share
            for window in (share * wave_compute[w - 1] if w else 0.0,
                           links.backward_share * wave_compute[w]):
                t = boundary - lat
                send_recv += lat + t - x * min(t, window) * (k - 1) / k
        else:  # forward activations, then the same volume of gradients back
            send_recv += 2 * boundary
        latency += 2 * lat
        exchanges += 2 * n_peer

    per_device_sync: dict[int, float] = defaultdict(float)
    per_device_gather: dict[int, float] = defaultdict(float)
    index = index or graph.parameter_index
    use = parameter_use(plan, index)
    stage = zero_stages(index, plan.zero, use[0])
    waves = wave_use(plan, index) if (stage >= 2).any() else None
    for group, ids in parameter_pools(use[0]).items():
        nbytes = float(index.grad_sizes[ids].sum()) * links.grad_bytes
        st = int(stage[ids[0]])
        if st >= 2 and waves is not None:
            # ZeRO-2: a bucket (one per ready point) is reduce-scattered after every wave using
            # its keys: each key's bytes as often as waves use it
            nbytes = float(index.grad_sizes[ids] @ waves[ids].sum(axis=1)) * links.grad_bytes
        t = links.sync_s(nbytes, group, st)
        # ZeRO: the updated shards travel back after the step, in the parameters' dtype
        weights = float(index.grad_sizes[ids].sum()) * links.param_bytes
        g = links.reduce_scatter_s(weights, group) if st else 0.0
        for d in group:
            per_device_sync[d] += t
            per_device_gather[d] += g
    serial = sync = max(per_device_sync.values(), default=0.0)
    if wave_compute is not None and links.sync_overlap > 0:
        exposed = overlapped_sync_s(plan, graph, links, wave_compute, index, use)
        sync = (1.0 - links.sync_overlap) * sync + links.sync_overlap * exposed
    return Communication(send_recv, sync, 2 * total, 2 * intra, 2 * inter, latency, exchanges,
                         serial, max(per_device_gather.values(), default=0.0))


def overlapped_sync_s(plan: Plan, graph: MetaGraph, links: Links,
                      wave_compute: Sequence[float], index: ParameterIndex | None = None,
                      use: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """The gradient sync left after backward when every bucket starts as soon as the backward
    has made it final (the runtime's overlap: inside its ready wave with ``sync_start`` "layer",
    after it with "wave"; the same buckets in the same order, :func:`sync_buckets`).  Forward
    takes ``1 - backward_share`` of every wave's compute, backward the rest, in reverse wave
    order; a device runs its buckets' all-reduces one after another, and a bucket starts when it
    is final and every device of its group is free.  Returns how far the last all-reduce ends
    after the backward.  ``use``: the plan's :func:`spindle.plan.layout.parameter_use`, when
    already known."""
    fwd = (1.0 - links.backward_share) * sum(wave_compute)
    done_after: dict[int, float] = {}
    t = fwd
    for w in reversed(range(len(wave_compute))):
        t += links.backward_share * wave_compute[w]
        done_after[w] = t
    backward_end = t
    free: dict[int, float] = defaultdict(float)
    finish = backward_end
    index = index or graph.parameter_index
    holds, ready = use if use is not None else parameter_use(plan, index)
    fraction = ready_fractions(plan, index, ready) if links.sync_start == "layer" else None
    buckets = sync_buckets(index, holds, ready, links.grad_bytes, links.sync_bucket_bytes,
                           links.sync_min_bucket_bytes, fraction,
                           zero_stages(index, plan.zero, holds) if plan.zero else None)
    waves = wave_use(plan, index) if any(b.stage >= 2 for b in buckets) else None
    for b in buckets:
        # final once the wave's backward has run b.ready_fraction of it (its slices start
        # together; a slice shorter than its wave makes this conservative)
        final = done_after.get(b.ready_wave, backward_end)
        if b.ready_wave in done_after:
            final -= (1.0 - b.ready_fraction) * links.backward_share * wave_compute[b.ready_wave]
        start = max([final] + [free[d] for d in b.group])
        # ZeRO-2's earlier reduce-scatters (one per wave computing it) are charged here too
        again = len(scatter_waves(plan, index, b.keys, waves)) if b.stage >= 2 else 1
        end = start + links.sync_s(b.nbytes, b.group, b.stage) * again
        for d in b.group:
            free[d] = end
        finish = max(finish, end)
    return finish - backward_end


def device_parameters(plan: Plan, index: ParameterIndex) -> list[float]:
    """Parameters each device steps in its optimizer: the sum of its pools (a sharded pool's
    1/|D| share)."""
    held = [0.0] * plan.num_devices
    holds, _ = parameter_use(plan, index)
    stage = zero_stages(index, plan.zero, holds)
    for group, ids in parameter_pools(holds).items():
        nparams = float(index.grad_sizes[ids].sum())
        if stage[ids[0]]:
            nparams /= len(group)
        for d in group:
            held[d] += nparams
    return held


def simulate(plan: Plan, graph: MetaGraph, estimator: Estimator, links: Links,
             index: ParameterIndex | None = None, comm: Communication | None = None
             ) -> SimulationResult:
    """The simulated iteration of ``plan`` (module docstring); ``comm``, when given, is the
    plan's :func:`communication` on ``links`` already computed (by the placement)."""
    index = index or graph.parameter_index
    schedule = 0.0
    busy = [0.0] * plan.num_devices
    for wave in plan.waves:
        sched_w = 0.0
        for s in wave.slices:
            m = graph.metaops[s.metaop]
            sched_w = max(sched_w, s.num_layers * estimator.time(m, s.n))
            t = s.num_layers * estimator.compute_time(m, s.n)
            for d in s.devices:
                busy[d] += t
        schedule += sched_w
    wave_compute = wave_compute_times(plan.waves, graph, estimator, links,
                                      frozenset(plan.recompute))
    compute = sum(wave_compute)
    comm = comm or communication(plan, graph, links, wave_compute, index)
    held = device_parameters(plan, index)
    return SimulationResult(
        schedule_s=schedule, compute_s=compute, send_recv_s=comm.send_recv_s, sync_s=comm.sync_s,
        send_recv_bytes=comm.bytes_total, send_recv_bytes_intra=comm.bytes_intra,
        send_recv_bytes_inter=comm.bytes_inter, wave_compute_s=wave_compute, device_busy_s=busy,
        optimizer_s=max((links.optimizer_s(p, plan.num_devices) for p in held if p > 0),
                        default=0.0),
        send_recv_latency_s=comm.latency_s, device_params=held,
        sync_serial_s=comm.sync_serial_s, gather_s=comm.gather_s,
    )
