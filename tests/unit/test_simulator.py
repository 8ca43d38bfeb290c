"""Simulator: compute, transfer and gradient-sync accounting on hand-made plans."""

import pytest

from spindle.costs.estimator import TableEstimator
from spindle.costs.graph import contract
from spindle.declare.workload import load_workload
from spindle.plan.contract import Plan, Slice, Wave
from spindle.plan.layout import pool_sizes
from spindle.planner.simulator import Links, simulate


@pytest.fixture
def clip():
    w = load_workload("tiny-multitask-clip")
    g = contract(w)
    est = TableEstimator({m.id: {1: 1.0, 2: 0.6, 4: 0.4} for m in g.metaops})
    return w, g, est


def _plan(w, g, waves, n):
    return Plan("hand", w.name, w.fingerprint(), n, 2, "x", tuple(g.metaops), tuple(waves))


def test_single_device_has_no_communication(clip):
    w, g, est = clip
    waves = [Wave((Slice(m.id, 0, m.num_layers, (0,), m.num_layers * 1.0),)) for m in g.metaops]
    r = simulate(_plan(w, g, waves, 1), g, est, Links(2, 100.0, 10.0))
    assert r.send_recv_bytes == 0 and r.sync_s == 0
    assert r.compute_s == pytest.approx(sum(m.num_layers for m in g.metaops))
    assert r.makespan_s == pytest.approx(r.compute_s)


def test_transfer_bytes_and_links(clip):
    w, g, est = clip
    # vision-text: vision on devices 0,1 ; text on 2,3 ; loss on device 0
    vis, txt, loss = g.metaops[0], g.metaops[1], g.metaops[2]
    rest = [m for m in g.metaops[3:]]
    waves = [Wave((Slice(vis.id, 0, vis.num_layers, (0, 1), 1.0),
                   Slice(txt.id, 0, txt.num_layers, (2, 3), 1.0))),
             Wave((Slice(loss.id, 0, 1, (0,), 1.0),))]
    waves += [Wave((Slice(m.id, 0, m.num_layers, (0,), 1.0),)) for m in rest]
    links = Links(devices_per_node=2, intra_node_bw=100.0, inter_node_bw=10.0)
    r = simulate(_plan(w, g, waves, 4), g, est, links)
    d = vis.cost.out_elements_per_sample  # 16-d embeddings
    b = vis.batch
    # into the loss on device 0: vision rows from device 1 (intra), text rows from 2 and 3 (inter)
    fwd_intra = b / 2 * d * 2
    fwd_inter = b * d * 2
    assert r.send_recv_bytes_intra == pytest.approx(2 * fwd_intra)
    assert r.send_recv_bytes_inter == pytest.approx(2 * fwd_inter)
    assert r.send_recv_s > 0


def test_parameter_groups_merge_shared_layers(clip):
    w, g, est = clip
    by = {m.name: m for m in g.metaops}
    waves = []
    for m in g.metaops:
        devs = (1,) if m.name == "imu-text/text" else (0,)
        waves.append(Wave((Slice(m.id, 0, m.num_layers, devs, 1.0),)))
    p = _plan(w, g, waves, 2)
    pools = pool_sizes(p, g.parameter_index)
    assert (0, 1) in pools  # text layers live on both devices
    r = simulate(p, g, est, Links(2, 100.0, 10.0))
    assert r.sync_s > 0
    assert by["imu-text/text"].component == "text"


@pytest.mark.parametrize("name", ["tiny-multitask-clip", "tiny-ofasys", "tiny-qwen-val"])
def test_predicted_bytes_follow_the_runtime_transmission_schedule(name):
    """Every row range the runtime sends between ranks is a transfer the simulator charges, and
    nothing else: so ``predicted_send_bytes`` is what the runtime's counters must read."""
    from spindle.plan.layout import inter_wave_transfers, predicted_send_bytes
    from spindle.planner.pipeline import build_plan, make_context
    from spindle.runtime.edges import TransmissionSchedule

    moved = 0.0
    for placement, planner in (("spindle", "spindle"), ("naive", "spindle"),
                               ("naive", "distmm-mt"), ("naive", "uniform")):
        ctx = make_context(name, 4, hardware="cpu", devices_per_node=2, placement=placement)
        plan, _ = build_plan(ctx, planner)
        g = ctx.graph
        runtime = []
        for src, dst, rows, (metaop, layer) in TransmissionSchedule.build(plan).remote_rows():
            m = g.metaops[metaop]
            last = layer == m.num_layers - 1
            per = m.cost.out_elements_per_sample if last else m.cost.act_elements_per_sample
            runtime.append((src, dst, rows * per))
        sim = [mv for moves in inter_wave_transfers(plan) for mv in moves]
        assert sorted(runtime) == sorted(sim)
        assert predicted_send_bytes(plan, 4) == pytest.approx(8 * sum(e for *_, e in sim))
        moved += predicted_send_bytes(plan, 4)
    assert moved > 0


def _split_plan(w, g):
    """Every MetaOp on devices (0, 1) except the contrastive losses (device 0)."""
    waves = []
    for m in g.metaops:
        devs = (0,) if m.is_loss else (0, 1)
        waves.append(Wave((Slice(m.id, 0, m.num_layers, devs, 1.0),)))
    return _plan(w, g, waves, 2)


def test_optimizer_term_grows_with_the_parameters_a_device_holds(clip):
    from spindle.planner.simulator import device_parameters

    w, g, est = clip
    links = Links(2, 100.0, 10.0, optimizer_fixed_s=1e-3, optimizer_per_param_s=1e-8,
                  optimizer_includes_clip=True)
    waves = [Wave((Slice(m.id, 0, m.num_layers, (0,), 1.0),)) for m in g.metaops]
    one = _plan(w, g, waves, 2)  # device 0 holds everything, device 1 nothing
    index = g.parameter_index
    held = device_parameters(one, index)
    assert held[1] == 0 and held[0] == pytest.approx(sum(pool_sizes(one, index).values()))
    r = simulate(one, g, est, links)
    assert r.optimizer_s == pytest.approx(1e-3 + 1e-8 * held[0])
    assert r.makespan_s == pytest.approx(r.compute_s + r.send_recv_s + r.sync_s + r.optimizer_s)
    # half the MetaOps on device 1: the busiest device holds fewer parameters, a shorter step
    waves2 = [Wave((Slice(m.id, 0, m.num_layers, (i % 2,), 1.0),))
              for i, m in enumerate(g.metaops)]
    two = _plan(w, g, waves2, 2)
    assert max(device_parameters(two, index)) < held[0]
    assert simulate(two, g, est, links).optimizer_s < r.optimizer_s
    # without a measured phase the clip all-reduce latency is added (2 devices)
    plain = Links(2, 100.0, 10.0, latency_s=5e-4, optimizer_per_param_s=1e-8)
    assert simulate(one, g, est, plain).optimizer_s == pytest.approx(5e-4 + 1e-8 * held[0])


def test_p2p_latency_counts_one_exchange_per_peer_per_boundary_and_direction(clip):
    from spindle.planner.simulator import communication
    from spindle.runtime.edges import TransmissionSchedule

    w, g, est = clip
    p = _split_plan(w, g)
    # boundaries with a message between two ranks, as the runtime's schedule has them
    sched = TransmissionSchedule.build(p)
    boundaries = {e.consumer.wave for e in sched.edges if any(not q.is_local for q in e.pieces)}
    lat = 1e-3
    links = Links(2, 1e30, 1e30, p2p_latency_s=lat, p2p_bw=1e30)
    c = communication(p, g, links)
    # 2 ranks: one peer; forward and backward each pay one exchange per boundary
    assert c.exchanges == 2 * len(boundaries) > 0
    assert c.latency_s == pytest.approx(lat * c.exchanges)
    assert c.send_recv_s == pytest.approx(lat * c.exchanges)


def test_links_use_the_measured_profile_on_cpu_only():
    from spindle.costs.cluster import load_cluster
    from spindle.costs.profile import CollectiveFit, OptimizerFit, P2PFit, Profile
    from spindle.planner.simulator import links_for_cluster

    prof = Profile("w", "", 2, 3, 1, "float32", 4, "2.x", {},
                   CollectiveFit("gloo", 2, 3e-4, 2e9, ((4096, 3e-4), (1 << 20, 9e-4))), {},
                   p2p=P2PFit("gloo", 1.5e-4, 2.5e9), optimizer=OptimizerFit(1e-3, 3e-8))
    cpu = links_for_cluster(load_cluster("cpu", num_devices=2), profile=prof)
    assert cpu.latency_s == 3e-4 and cpu.intra_node_bw == 2e9
    assert cpu.p2p_latency_s == 1.5e-4 and cpu.p2p_bw == 2.5e9
    assert cpu.optimizer_s(1e5, 2) == pytest.approx(1e-3 + 3e-8 * 1e5)  # clip all-reduce inside
    # the all-reduce is read off the measured samples (2 processes: the bytes themselves)
    assert cpu.allreduce_s(4096, (0, 1)) == pytest.approx(3e-4)
    a800 = links_for_cluster(load_cluster("a800", num_devices=8), profile=prof)
    assert a800.p2p_latency_s is None and a800.optimizer_fixed_s == 0.0
    # the GPU preset's AdamW: 28 bytes per parameter over the HBM bandwidth (2.039 TB/s)
    assert a800.optimizer_per_param_s == pytest.approx(28 / 2.039e12)


def test_paper_scale_optimizer_term_stays_small():
    from spindle.planner.pipeline import evaluate, make_context

    r = evaluate(make_context("multitask-clip-4", 8, 8, "a800"), "spindle")
    assert 0 < r.simulation.optimizer_s < 0.25 * r.simulation.makespan_s
    assert r.plan.estimates["optimizer_s"] == r.simulation.optimizer_s


def test_sync_buckets_cover_every_replicated_parameter_in_launch_order(clip):
    from spindle.plan.layout import parameter_use, sync_buckets

    w, g, est = clip
    waves = [Wave((Slice(m.id, 0, m.num_layers, (0, 1), m.num_layers * 0.6),))
             for m in g.metaops]
    plan = _plan(w, g, waves, 2)
    links = Links(2, 100.0, 10.0, grad_bytes=4)
    index = g.parameter_index
    buckets = sync_buckets(index, *parameter_use(plan, index), links.grad_bytes)
    pools = {grp: n for grp, n in pool_sizes(plan, index).items() if len(grp) > 1}
    for grp, n in pools.items():
        assert sum(b.nbytes for b in buckets if b.group == grp) == pytest.approx(4 * n)
    ready = [b.ready_wave for b in buckets]
    assert ready == sorted(ready, reverse=True)


def test_overlapped_sync_hides_under_backward_only_when_the_hardware_overlaps(clip):
    """A bucket starts when the backward waves have made it final: with a long backward after
    it, its all-reduce is hidden (``sync_overlap`` 1); with ``sync_overlap`` 0 (gloo on CPU)
    the sync is the serial one; anything between is their blend."""
    import dataclasses

    w, g, est = clip
    waves = [Wave((Slice(m.id, 0, m.num_layers, (0, 1), m.num_layers * 0.6),))
             for m in g.metaops]
    plan = _plan(w, g, waves, 2)
    # 1 GB/s, 10 us latency: syncing the tiny model takes well under one wave's compute; one
    # bucket per ready wave (the runtime's --min-bucket-bytes 0), as the tiny model is < 1 MB
    links = Links(2, 1e9, 1e9, latency_s=1e-5, grad_bytes=4, sync_min_bucket_bytes=0)
    serial = simulate(plan, g, est, links).sync_s
    hidden = simulate(plan, g, est, dataclasses.replace(links, sync_overlap=1.0)).sync_s
    half = simulate(plan, g, est, dataclasses.replace(links, sync_overlap=0.5)).sync_s
    assert serial > 0
    assert 0 <= hidden < serial
    assert half == pytest.approx((serial + hidden) / 2)
    # with compute too short to hide anything, the last buckets are exposed in full
    fast = TableEstimator({m.id: {1: 1e-9, 2: 1e-9, 4: 1e-9} for m in g.metaops})
    exposed = simulate(plan, g, fast, dataclasses.replace(links, sync_overlap=1.0)).sync_s
    assert exposed >= hidden and exposed > 0


def test_chunked_transfers_hide_all_but_the_last_chunk_under_the_neighbouring_compute() -> None:
    """K chunks: a boundary's transfer time less (K-1)/K of it, as far as the producers'
    forward and the consumers' backward last, scaled by the overlap; nothing without overlap."""
    import dataclasses

    from spindle.planner.pipeline import make_context
    from spindle.planner.simulator import communication, wave_compute_times
    from tests.plans import all_plans

    ctx = make_context("tiny-ofasys", 4, 2, "a800", check_memory=False)
    plan = all_plans(load_workload("tiny-ofasys"), 4)["mixed"]
    compute = wave_compute_times(plan.waves, ctx.graph, ctx.estimator, ctx.links)
    base = communication(plan, ctx.graph, ctx.links, compute).send_recv_s
    assert base > 0
    links = dataclasses.replace(ctx.links, transfer_chunks=4, sync_overlap=1.0)
    chunked = communication(plan, ctx.graph, links, compute).send_recv_s
    huge = communication(plan, ctx.graph, links, [1e9] * len(compute)).send_recv_s
    assert huge <= chunked < base
    lat = communication(plan, ctx.graph, ctx.links, compute).latency_s
    # with all the compute in the world, a quarter of the bandwidth part is left, latency whole
    assert huge == pytest.approx(lat + (base - lat) / 4)
    none = dataclasses.replace(links, sync_overlap=0.0)
    assert communication(plan, ctx.graph, none, compute).send_recv_s == pytest.approx(base)


def test_each_chunk_costs_every_layer_of_a_slice_one_more_call() -> None:
    """The compute side of chunked transfers: K chunks run every layer of a (non-loss) slice K
    times on a K-th of its rows, K - 1 more calls' fixed part (the hardware model's
    ``compute_time(0)``); a loss slice is never chunked."""
    import dataclasses

    from spindle.plan.layout import local_rows
    from spindle.planner.pipeline import make_context
    from spindle.planner.simulator import wave_compute_times
    from tests.plans import all_plans

    ctx = make_context("tiny-ofasys", 2, 2, "a800", check_memory=False)
    plan = all_plans(load_workload("tiny-ofasys"), 2)["sequential"]
    assert ctx.links.layer_call_s == pytest.approx(ctx.hardware.compute_time(0.0))
    base = wave_compute_times(plan.waves, ctx.graph, ctx.estimator, ctx.links)
    links = dataclasses.replace(ctx.links, transfer_chunks=2)
    got = wave_compute_times(plan.waves, ctx.graph, ctx.estimator, links)
    chunked = 0
    for wave, b, g in zip(plan.waves, base, got):
        (s,) = wave.slices
        m = ctx.graph.metaops[s.metaop]
        extra = 0 if m.is_loss or local_rows(m, s.n) < 2 else s.num_layers
        chunked += extra > 0
        assert g == pytest.approx(b + extra * ctx.links.layer_call_s)
    assert chunked > 0
