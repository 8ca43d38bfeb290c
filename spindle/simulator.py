"""Simulator: the iteration time of any placed plan, from the estimator and the cluster's links.

The simulated iteration is what the runtime does, in order:

* compute: every wave, forward then backward, lasts as long as its slowest slice, charged with
  the estimator's *compute* time (``compute_time``: no gradient all-reduce inside);
* send/recv: before a slice starts, its inputs move from the devices that produced them (the
  previous slice of its MetaOp, or the last slice of each producer MetaOp), re-split over its
  group; in backward the gradients travel the same way back.  A transfer is charged to the link it
  crosses (intra-node or inter-node); per wave boundary the slowest device's traffic counts;
* parameter sync: after backward, every parameter's gradient is all-reduced inside its device
  group (all devices that hold a replica); groups that share a device run one after another;
  disjoint groups run side by side.

``schedule_s`` is the planner's own view (sum of wave lengths under ``time``, which includes a
per-layer data-parallel all-reduce).  ``makespan_s`` is compute + send/recv + sync.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from spindle.estimator import Estimator
from spindle.graph import MetaGraph
from spindle.plan import Plan, transfer_rows


@dataclass(frozen=True)
class Links:
    """What the simulator needs of a cluster: bandwidths (bytes/s), latency (s), element sizes."""

    devices_per_node: int
    intra_node_bw: float
    inter_node_bw: float
    latency_s: float = 0.0
    activation_bytes: int = 2
    grad_bytes: int = 2

    def node(self, device: int) -> int:
        return device // self.devices_per_node

    def bandwidth(self, a: int, b: int) -> float:
        return self.intra_node_bw if self.node(a) == self.node(b) else self.inter_node_bw

    def allreduce_s(self, nbytes: float, group: tuple[int, ...]) -> float:
        """Ring all-reduce: 2 (n-1)/n of the bytes over the group's slowest link."""
        n = len(group)
        if n <= 1 or nbytes <= 0:
            return 0.0
        bw = self.intra_node_bw if len({self.node(d) for d in group}) == 1 else self.inter_node_bw
        return 2 * (n - 1) * self.latency_s + 2.0 * (n - 1) / n * nbytes / bw


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

    @property
    def makespan_s(self) -> float:
        return self.compute_s + self.send_recv_s + self.sync_s

    def as_dict(self) -> dict[str, float]:
        return {
            "schedule_s": self.schedule_s,
            "makespan_s": self.makespan_s,
            "compute_s": self.compute_s,
            "send_recv_s": self.send_recv_s,
            "send_recv_bytes": self.send_recv_bytes,
            "param_sync_s": self.sync_s,
        }


def inter_wave_transfers(plan: Plan, graph: MetaGraph) -> list[list[tuple[int, int, float]]]:
    """For each wave, the forward transfers into it: ``(src_device, dst_device, elements)`` for
    every row range that moves between two different devices."""
    last_slice_devices: dict[int, tuple[int, ...]] = {}
    out: list[list[tuple[int, int, float]]] = []
    for wave in plan.waves:
        moves: list[tuple[int, int, float]] = []
        for s in wave.slices:
            m = graph.metaops[s.metaop]
            if s.layer_start > 0:
                sources = [(last_slice_devices[m.id], m.act_elements_per_sample)]
            else:
                sources = [
                    (last_slice_devices[d], graph.metaops[d].out_elements_per_sample)
                    for d in m.deps
                ]
            for src, per_sample in sources:
                for sd, dd, r0, r1 in transfer_rows(src, s.devices, m.batch):
                    if sd != dd and per_sample > 0:
                        moves.append((sd, dd, (r1 - r0) * per_sample))
        for s in wave.slices:
            last_slice_devices[s.metaop] = s.devices
        out.append(moves)
    return out


def parameter_groups(plan: Plan, graph: MetaGraph) -> dict[tuple[int, ...], float]:
    """Device group -> parameters replicated on exactly those devices (the runtime's pool)."""
    holders: dict[tuple[str, int], set[int]] = defaultdict(set)
    size: dict[tuple[str, int], float] = {}
    for wave in plan.waves:
        for s in wave.slices:
            m = graph.metaops[s.metaop]
            for layer in range(s.layer_start, s.layer_end):
                ref = m.layers[layer]
                key = (ref.component or f"loss:{ref.task}", ref.layer)
                holders[key].update(s.devices)
                # light parts (adapters, heads) are charged to the chain's layers evenly
                size[key] = max(size.get(key, 0.0), m.params_per_layer + m.extra_params / m.num_layers)
    pools: dict[tuple[int, ...], float] = defaultdict(float)
    for key, devs in holders.items():
        pools[tuple(sorted(devs))] += size[key]
    return dict(pools)


def simulate(plan: Plan, graph: MetaGraph, estimator: Estimator, links: Links) -> SimulationResult:
    schedule = 0.0
    compute = 0.0
    wave_compute: list[float] = []
    busy = [0.0] * plan.num_devices
    for wave in plan.waves:
        sched_w = 0.0
        comp_w = 0.0
        for s in wave.slices:
            m = graph.metaops[s.metaop]
            sched_w = max(sched_w, s.num_layers * estimator.time(m, s.n))
            t = s.num_layers * estimator.compute_time(m, s.n)
            comp_w = max(comp_w, t)
            for d in s.devices:
                busy[d] += t
        schedule += sched_w
        compute += comp_w
        wave_compute.append(comp_w)

    send_recv = 0.0
    total = intra = inter = 0.0
    for moves in inter_wave_transfers(plan, graph):
        if not moves:
            continue
        out_t: dict[int, float] = defaultdict(float)
        in_t: dict[int, float] = defaultdict(float)
        for sd, dd, elems in moves:
            nbytes = elems * links.activation_bytes
            total += nbytes
            if links.node(sd) == links.node(dd):
                intra += nbytes
            else:
                inter += nbytes
            t = nbytes / links.bandwidth(sd, dd)
            out_t[sd] += t
            in_t[dd] += t
        boundary = links.latency_s + max(max(out_t.values()), max(in_t.values()))
        send_recv += 2 * boundary  # forward activations, then the same volume of gradients back

    per_device_sync: dict[int, float] = defaultdict(float)
    for group, nparams in parameter_groups(plan, graph).items():
        t = links.allreduce_s(nparams * links.grad_bytes, group)
        for d in group:
            per_device_sync[d] += t
    sync = max(per_device_sync.values(), default=0.0)
    return SimulationResult(
        schedule_s=schedule, compute_s=compute, send_recv_s=send_recv, sync_s=sync,
        send_recv_bytes=2 * total, send_recv_bytes_intra=2 * intra,
        send_recv_bytes_inter=2 * inter, wave_compute_s=wave_compute, device_busy_s=busy,
    )
