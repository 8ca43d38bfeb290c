"""Measuring the machine for ``spindle profile``: the runtime's gradient sync, the point-to-point
exchange of a wave boundary and the optimizer phase, each on spawned gloo processes and fitted
to a fixed plus a proportional cost (:mod:`spindle.costs.profile` holds the fitted models)."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy.optimize import nnls

from spindle.costs.profile import CollectiveFit, OptimizerFit, P2PFit, ring_factor
from spindle.declare.workload import Workload
from spindle.layers import provider_for
from spindle.layers.blocks import Block
from spindle.layers.provider import LayerError
from spindle.plan.contract import MetaOp
from spindle.runtime.param_groups import BucketSum

log = logging.getLogger(__name__)

COLLECTIVE_SIZES = (4 * 1024, 64 * 1024, 256 * 1024, 1024 * 1024, 4 * 1024 * 1024,
                    16 * 1024 * 1024)
SYNC_TENSORS = 8  # gradients per measured sync: the runtime flattens a pool's many tensors
P2P_SIZES = (4 * 1024, 64 * 1024, 256 * 1024, 1024 * 1024, 4 * 1024 * 1024)
OPTIMIZER_COPIES = (1, 2, 4, 8)  # parameter sets of 1, 2, 4, 8 copies of the workload's blocks


def run_workers(fn: Callable[..., None], args: tuple[object, ...], nprocs: int) -> None:
    """``fn(rank, *args)`` on ``nprocs`` spawned processes, waited for.  They ignore Ctrl-C (a
    terminal sends it to them too, and a process still importing torch would print a
    traceback): on Ctrl-C this process stops them and raises KeyboardInterrupt itself."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the new processes
    try:
        context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False,
                                     start_method="spawn")
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        while not context.join():
            pass
    except KeyboardInterrupt:
        for proc in context.processes:
            if proc.is_alive():
                proc.terminate()
        for proc in context.processes:
            proc.join(10)
        raise


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def across_ranks(seconds: float, slowest: bool, world: int) -> float:
    """``seconds`` of every rank combined (collective): their maximum, or their mean."""

    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if slowest else dist.ReduceOp.SUM)
    return float(t.item()) if slowest else float(t.item()) / world


def leave_group() -> None:
    """End a spawned gloo worker that finished its work: a barrier (rank 0 has written its
    results), then exit without the interpreter's teardown, where gloo's threads sometimes abort
    the process ('terminate called without an active exception': 3 of 8 profiles once the chain
    workers also ran the runtime; 0 of 14 since)."""

    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _collective_worker(
    rank: int, world: int, port: int, sizes: tuple[int, ...], repeats: int, out: str,
    p2p_sizes: tuple[int, ...] = (), optimizer_sets: tuple[tuple[tuple[int, ...], ...], ...] = (),
    threads: int = 1,
) -> None:
    """One of the spawned gloo processes: the runtime's gradient sync (a bucketed all-reduce)
    times for ``sizes``; P2P exchange times for ``p2p_sizes`` (ranks 0 and 1); the runtime's
    optimizer phase for each parameter set (a tuple of tensor shapes).  Rank 0 writes the *means* to
    ``out``: gloo over loopback has a heavy tail (a wake-up of its I/O thread can cost a scheduler
    tick, ~4 ms here, in 10-40% of
    the calls), and an iteration sums many such calls, so their expected time is what adds up."""

    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        results = [(nbytes, statistics.fmean(_time_sync(rank, world, nbytes, repeats)))
                   for nbytes in sizes]
        p2p = [(b, statistics.fmean(_time_p2p(rank, b, repeats))) for b in p2p_sizes] \
            if rank < 2 else []
        opt = [(sum(math.prod(sh) for sh in shapes),
                statistics.fmean(_time_optimizer(shapes, repeats, world)))
               for shapes in optimizer_sets]
        if rank == 0:
            Path(out).write_text(json.dumps({"allreduce": results, "p2p": p2p, "optimizer": opt}))
    except BaseException:
        dist.destroy_process_group()
        raise
    leave_group()


def _time_sync(rank: int, world: int, nbytes: int, repeats: int) -> list[float]:
    """The runtime's gradient sync of one bucket (:class:`spindle.runtime.param_groups.
    BucketSum`: flatten, all-reduce, copy back) of ``nbytes`` of float32 gradients in
    :data:`SYNC_TENSORS` tensors, on every process; each starts it after a barrier."""

    numel = max(nbytes // 4, 1)
    sizes = [numel // SYNC_TENSORS + (1 if i < numel % SYNC_TENSORS else 0)
             for i in range(SYNC_TENSORS)]
    grads = [torch.zeros(n) for n in sizes if n]
    for _ in range(2):
        BucketSum(grads, None).wait()
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        BucketSum(grads, None).wait()
        times.append(time.perf_counter() - t0)
    return times


def _time_p2p(rank: int, nbytes: int, repeats: int) -> list[float]:
    """Ranks 0 and 1 exchange ``nbytes`` each way with one ``batch_isend_irecv`` (one isend and
    one irecv per rank, as :class:`spindle.runtime.transmission.Transmitter` packs a boundary
    between two ranks); the other ranks only join the barriers."""

    peer = 1 - rank
    send = torch.ones(max(nbytes // 4, 1), dtype=torch.float32)
    recv = torch.empty_like(send)

    def exchange() -> None:
        ops = [dist.P2POp(dist.isend, send, peer), dist.P2POp(dist.irecv, recv, peer)]
        for req in dist.batch_isend_irecv(ops):
            req.wait()

    for _ in range(2):
        exchange()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        exchange()
        times.append(time.perf_counter() - t0)
    return times


def _time_optimizer(shapes: tuple[tuple[int, ...], ...], repeats: int, world: int) -> list[float]:
    """The runtime's optimizer phase (:meth:`spindle.runtime.executor.TrainingRun.step`) on a
    parameter set of ``shapes``: ``zero_grad``, the global gradient norm (a squared norm per
    gradient, one scalar all-reduce over the world), the clip scaling of every gradient and the
    ``AdamW(foreach=True)`` step; every process runs it at once, after a barrier."""

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(sh, generator=gen)) for sh in shapes]
    grads = [torch.randn(sh, generator=gen) * 1e-3 for sh in shapes]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, foreach=True)
    max_norm = 1e30  # clip coefficient 1: the same work, gradients keep their scale

    def phase() -> None:
        opt.zero_grad(set_to_none=True)
        for p, g in zip(params, grads):
            p.grad = g
        total = torch.stack([torch.linalg.vector_norm(g).pow(2) for g in grads]).sum().reshape(1)
        if world > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        coef = torch.clamp(max_norm / (total.sqrt()[0] + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef)
        opt.step()

    for _ in range(2):
        phase()
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        phase()
        times.append(time.perf_counter() - t0)
    return times


def _fit_affine(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Non-negative ``y = a + b x`` minimising the relative error (NNLS on scaled columns)."""

    X = np.array([[1.0, x] for x in xs])
    y = np.array(ys)
    w = 1.0 / y
    scale = np.abs(X * w[:, None]).max(axis=0)
    sol, _ = nnls(X * w[:, None] / scale, y * w)
    a, b = (sol / scale).tolist()
    return float(a), float(b)


def fit_collective(
    samples: list[tuple[int, float]], processes: int, backend: str = "gloo"
) -> CollectiveFit:
    """Fit ``t = latency + 2 (p - 1) / p * bytes / bandwidth`` (non-negative, relative error)."""
    rf = ring_factor(processes)
    lat, inv_bw = _fit_affine([rf * b for b, _ in samples], [t for _, t in samples])
    if inv_bw <= 0:  # no size dependence seen: bound the bandwidth by the largest sample
        b, t = max(samples)
        inv_bw = t / (rf * b)
    return CollectiveFit(backend, processes, lat, 1.0 / inv_bw, tuple(samples))


def fit_p2p(samples: list[tuple[int, float]], backend: str = "gloo") -> P2PFit:
    """Fit ``t = latency + bytes / bandwidth`` to exchange times (non-negative, relative error)."""
    lat, inv_bw = _fit_affine([float(b) for b, _ in samples], [t for _, t in samples])
    if inv_bw <= 0:
        b, t = max(samples)
        inv_bw = t / b
    return P2PFit(backend, lat, 1.0 / inv_bw, tuple(samples))


def fit_optimizer(samples: list[tuple[int, float]]) -> OptimizerFit:
    """Fit ``t = fixed + per_param * parameters`` to optimizer-phase times."""
    fixed, per_param = _fit_affine([float(n) for n, _ in samples], [t for _, t in samples])
    return OptimizerFit(fixed, per_param, tuple(samples))


@dataclass(frozen=True)
class MachineCosts:
    """What ``spindle profile`` measures once per machine besides the layers."""

    collective: CollectiveFit
    p2p: P2PFit | None
    optimizer: OptimizerFit | None


def runtime_parameter_sets(workload: Workload) -> tuple[tuple[tuple[int, ...], ...], ...] | None:
    """Parameter sets for the optimizer measurement made of the runtime's own parameter tensors
    of ``workload`` (its layer provider's): every 4th, every 2nd, all, and all twice; None when
    the runtime cannot run the workload."""
    provider = provider_for(workload)
    try:
        provider.check_runnable()
    except LayerError as err:
        log.info("optimizer sets from block shapes (runtime parameters unavailable: %s)", err)
        return None
    shapes = list(provider.parameter_shapes_all().values())
    if not shapes:
        return None
    return (tuple(shapes[::4]), tuple(shapes[::2]), tuple(shapes), tuple(shapes * 2))


def optimizer_parameter_sets(
    ops: list[MetaOp], copies: tuple[int, ...] = OPTIMIZER_COPIES
) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Parameter sets (tensor shapes) for the optimizer measurement: ``k`` copies of one block
    of every distinct block shape of ``ops``, for each ``k`` in ``copies`` (so the sets have the
    workload's mix of tensor sizes: the per-tensor cost is part of the per-parameter slope)."""
    shapes: list[tuple[int, ...]] = []
    seen: set[tuple[str, int, int, int]] = set()
    for op in ops:
        key = (op.kind, op.cost.hidden, op.cost.heads, op.cost.ffn)
        if op.is_loss or key in seen:
            continue
        seen.add(key)
        with torch.device("meta"):
            block = Block(*key)
        shapes += [tuple(p.shape) for p in block.parameters()]
    if not shapes:
        shapes = [(256, 256), (256,)]
    return tuple(tuple(shapes * k) for k in copies)


def measure_machine(
    sizes: tuple[int, ...] = COLLECTIVE_SIZES, repeats: int = 30, processes: int = 2,
    p2p_sizes: tuple[int, ...] = P2P_SIZES,
    optimizer_sets: tuple[tuple[tuple[int, ...], ...], ...] = (), threads: int = 1,
) -> MachineCosts:
    """All-reduce, P2P exchange and optimizer-phase times over ``processes`` local gloo
    processes, each fitted to a fixed plus a proportional cost."""

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "collective.json")
        run_workers(_collective_worker, (processes, free_port(), sizes, repeats, out, p2p_sizes,
                                         optimizer_sets, threads), processes)
        raw = json.loads(Path(out).read_text())
    fit = fit_collective([(int(b), float(t)) for b, t in raw["allreduce"]], processes)
    log.info("gloo all-reduce: latency %.1f us, bus bandwidth %.2f GB/s",
             fit.latency_s * 1e6, fit.bandwidth / 1e9)
    p2p = fit_p2p([(int(b), float(t)) for b, t in raw["p2p"]]) if raw["p2p"] else None
    if p2p is not None:
        log.info("gloo P2P exchange: latency %.1f us, bandwidth %.2f GB/s",
                 p2p.latency_s * 1e6, p2p.bandwidth / 1e9)
    opt = fit_optimizer([(int(n), float(t)) for n, t in raw["optimizer"]]) \
        if raw["optimizer"] else None
    if opt is not None:
        log.info("optimizer phase: %.1f us + %.3f ns per parameter",
                 opt.fixed_s * 1e6, opt.per_param_s * 1e9)
    return MachineCosts(fit, p2p, opt)
