"""``spindle profile``: measure T_m(n) points of a workload's MetaOps with PyTorch on this machine.

For every distinct MetaOp signature (kind, hidden, heads, ffn, tokens, memory_tokens, batch) and
every valid device count n up to ``--devices``, one MetaOp of that signature runs forward +
backward at the per-device batch ``batch / n`` exactly as the runtime computes it (schema version
3, ``measurement: chain``): its whole chain of :func:`spindle.runtime.model.run_operator` calls,
with the runtime's parameters, raw input rows and random stand-ins for the producers' outputs
(:func:`time_chain`); a few warm-up runs, then the median of ``--repeats`` timed runs divided by
the chain's layers is the point's per-layer ``compute_s``, light parts included.  Torch runs
with the threads one torchrun rank gets (:func:`default_threads`).  A workload the runtime
cannot compute falls back to a bare block of the signature (``measurement: block``, as in
versions 1 and 2, which the estimator scales by the layer's FLOPs).  The gradient synchronisation is measured
once: gloo all-reduce over 2 local processes for a few message sizes, fitted as
``latency + bytes / bandwidth``; each point's ``sync_s`` is that model's ring all-reduce of the
block's own gradients over n devices (the estimator re-applies the measured collective model
to the layer's full gradient volume, light parts included).  The same spawned processes also
measure (schema version 2) the point-to-point exchange of a wave boundary (one
``batch_isend_irecv`` of an isend and an irecv per rank, fitted as ``latency + bytes /
bandwidth``) and the runtime's optimizer phase (zero_grad, clipping by the global norm with its
scalar all-reduce, ``AdamW(foreach=True)``) over parameter sets made of the runtime's own
parameter tensors of the workload, fitted as ``fixed + per_param * parameters``; the simulator
uses them (:func:`spindle.planner.simulator.links_for_cluster`) when planning for the ``cpu`` preset.  The result is a versioned JSON profile, written atomically,
that :func:`spindle.costs.scalability.make_estimator` fits instead of the hardware model.

Only this module imports torch (lazily), so loading a profile stays cheap.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from spindle.costs.estimator import data_parallel_counts
from spindle.costs.graph import contract
from spindle.costs.profile import (
    CollectiveFit,
    OptimizerFit,
    P2PFit,
    Profile,
    ProfileEntry,
    ProfileError,
    ProfilePoint,
    RuntimeCalibration,
    Signature,
    ring_factor,
    write_profile,
)
from spindle.costs.scalability import signature
from spindle.layers import costmodel
from spindle.plan.contract import MetaOp

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

COLLECTIVE_SIZES = (4 * 1024, 64 * 1024, 256 * 1024, 1024 * 1024, 4 * 1024 * 1024,
                    16 * 1024 * 1024)
SYNC_TENSORS = 8  # gradients per measured sync: the runtime flattens a pool's many tensors
P2P_SIZES = (4 * 1024, 64 * 1024, 256 * 1024, 1024 * 1024, 4 * 1024 * 1024)
OPTIMIZER_COPIES = (1, 2, 4, 8)  # parameter sets of 1, 2, 4, 8 copies of the workload's blocks
DEFAULT_REPEATS = 11  # per point, 3 profiles of small-ofasys spread by 7% (median); 5 repeats: ~15%
DEFAULT_WARMUP = 3
DEFAULT_MAX_SECONDS = 300.0  # the paper profiles a model in under 5 minutes


# --- the measured layers -----------------------------------------------------------------------


def build_block(kind: str, hidden: int, heads: int, ffn: int) -> "torch.nn.Module":
    """One block of the given shape, parameter-for-parameter the one
    :func:`spindle.layers.costmodel.layer_parameters` counts: ``encoder`` (pre-LN self-attention +
    GELU MLP), ``decoder`` (causal self-attention + cross-attention + GELU MLP), ``llm`` (causal
    self-attention + SwiGLU, RMSNorm)."""
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kind, self.heads = kind, heads
            norm = (lambda: nn.RMSNorm(hidden)) if kind == "llm" else (lambda: nn.LayerNorm(hidden))
            self.norm1, self.norm2 = norm(), norm()
            self.qkv = nn.Linear(hidden, 3 * hidden)
            self.proj = nn.Linear(hidden, hidden)
            if kind == "decoder":
                self.norm_c = nn.LayerNorm(hidden)
                self.q_c = nn.Linear(hidden, hidden)
                self.kv_c = nn.Linear(hidden, 2 * hidden)
                self.proj_c = nn.Linear(hidden, hidden)
            if kind == "llm":
                self.gate = nn.Linear(hidden, ffn, bias=False)
                self.up = nn.Linear(hidden, ffn, bias=False)
                self.down = nn.Linear(ffn, hidden, bias=False)
            else:
                self.fc1 = nn.Linear(hidden, ffn)
                self.fc2 = nn.Linear(ffn, hidden)

        def _split(self, t: torch.Tensor) -> torch.Tensor:
            b, s, h = t.shape
            return t.view(b, s, self.heads, h // self.heads).transpose(1, 2)

        def _merge(self, t: torch.Tensor) -> torch.Tensor:
            b, nh, s, d = t.shape
            return t.transpose(1, 2).reshape(b, s, nh * d)

        def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
            q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
            causal = self.kind in ("decoder", "llm")
            a = F.scaled_dot_product_attention(
                self._split(q), self._split(k), self._split(v), is_causal=causal
            )
            x = x + self.proj(self._merge(a))
            if self.kind == "decoder":
                assert memory is not None
                qc = self._split(self.q_c(self.norm_c(x)))
                kc, vc = self.kv_c(memory).chunk(2, dim=-1)
                a = F.scaled_dot_product_attention(qc, self._split(kc), self._split(vc))
                x = x + self.proj_c(self._merge(a))
            y = self.norm2(x)
            if self.kind == "llm":
                y = self.down(F.silu(self.gate(y)) * self.up(y))
            else:
                y = self.fc2(F.gelu(self.fc1(y)))
            return x + y

    return Block()


def _time_call(
    fn: Any, warmup: int, repeats: int, combine: Callable[[float], float] | None = None
) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after ``warmup`` untimed ones.  With
    ``combine``, each run's time first goes through it (outside the timed region): the chain
    workers combine the concurrent processes' times of a run there, so that the median is taken
    over runs of the combined time (for a data-parallel slice: the slowest device of each
    iteration, as the wave waits for it)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt if combine is None else combine(dt))
    return statistics.median(times)


def time_metaop(op: MetaOp, n: int, warmup: int = 2, repeats: int = 5) -> float:
    """Median seconds of forward + backward of one layer of ``op`` at per-device batch
    ``op.batch / n`` on this process (float32)."""
    import torch
    import torch.nn.functional as F

    b = max(op.batch // n, 1)
    gen = torch.Generator().manual_seed(0)
    if op.is_loss:
        za = torch.randn(b, op.cost.hidden, generator=gen, requires_grad=True)
        zb = torch.randn(b, op.cost.hidden, generator=gen, requires_grad=True)
        log_temp = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        labels = torch.arange(b)

        def step() -> None:
            za.grad = zb.grad = log_temp.grad = None
            logits = F.normalize(za, dim=-1) @ F.normalize(zb, dim=-1).T * log_temp.exp()
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            loss.backward()

        return _time_call(step, warmup, repeats)

    block = build_block(op.kind, op.cost.hidden, op.cost.heads, op.cost.ffn)
    x = torch.randn(b, op.cost.tokens, op.cost.hidden, generator=gen, requires_grad=True)
    mem = (
        torch.randn(b, op.cost.memory_tokens, op.cost.hidden, generator=gen, requires_grad=True)
        if op.kind == "decoder" else None
    )
    grad_out = torch.randn(b, op.cost.tokens, op.cost.hidden, generator=gen)
    params = list(block.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        if mem is not None:
            mem.grad = None
        block(x, mem).backward(grad_out)

    return _time_call(step, warmup, repeats)


# --- the measured chains: the runtime's own operators ------------------------------------------


def _stage_output(workload: Any, task: Any, stage: str, rows: int, gen: "torch.Generator"
                  ) -> tuple["torch.Tensor", ...]:
    """A random stand-in for the output of ``stage`` of ``task`` on ``rows`` rows, shaped as
    :func:`spindle.runtime.model.run_operator` returns it: the contrastive embedding
    [rows, output_dim] of a loss input, else the final hidden states [rows, tokens, hidden]."""
    import torch

    from spindle.runtime.model import find_stage, is_contrastive_input

    st = find_stage(task, stage)
    comp = workload.components[st.component]
    if is_contrastive_input(task, stage):
        shape: tuple[int, ...] = (rows, int(comp.output_dim or 0))
    else:
        shape = (rows, workload.stage_output_tokens(task)[stage], comp.hidden)
    return (torch.randn(shape, generator=gen).requires_grad_(True),)


def time_chain(workload: Any, op: MetaOp, n: int, warmup: int = 2, repeats: int = 5,
               seed: int = 0, combine: Callable[[float], float] | None = None) -> float:
    """Median seconds of forward + backward of the WHOLE chain of ``op`` as the runtime computes
    it (:func:`spindle.runtime.model.run_operator` per layer, fed as
    :meth:`spindle.runtime.executor.WaveExecutor._run_slice` feeds a slice: the carry, the
    stage inputs of the producers, the raw input rows, the task's global batch), on the
    ``op.batch / n`` rows of one device (a contrastive loss: the whole batch), divided by the
    chain's number of layers: the per-layer compute time at n, light parts included."""
    import torch

    from spindle.runtime.data import make_raw
    from spindle.runtime.model import (
        LOSS_STAGE,
        init_parameter,
        is_loss_operator,
        needs_raw,
        operator_input_stages,
        parameter_names,
        parameter_shape,
        run_operator,
        stage_context,
    )

    rows = op.batch if op.is_loss else max(op.batch // n, 1)
    task = workload.task(op.task)
    gen = torch.Generator().manual_seed(seed)
    names = sorted({name for ref in op.layers for name in parameter_names(workload, ref)})
    params = {name: init_parameter(name, tuple(parameter_shape(workload, name)), seed)
              .requires_grad_(True) for name in names}
    raws: dict[str, torch.Tensor | None] = {}
    for ref in op.layers:
        if ref.stage not in raws and not is_loss_operator(ref) and needs_raw(workload, ref):
            full = make_raw(workload, ref.task, ref.stage, 0, seed)
            raws[ref.stage] = None if full is None else full[:rows].contiguous()
    first = op.layers[0]
    leaves: dict[str, tuple[torch.Tensor, ...]] = {}
    carry0: tuple[torch.Tensor, ...] | None = None
    if is_loss_operator(first) or first.layer == 0:
        leaves = {s: _stage_output(workload, task, s, rows, gen)
                  for s in operator_input_stages(workload, first)}
    else:  # a chain starting inside a stage: the previous layer's (x[, memory]) as the carry
        _, st, comp = stage_context(workload, first)
        x = torch.randn(rows, workload.stage_tokens(task)[st.name], comp.hidden, generator=gen)
        carry0 = (x,) if st.memory is None else (x, torch.randn(
            rows, workload.stage_output_tokens(task)[st.memory], comp.hidden, generator=gen))
        carry0 = tuple(t.requires_grad_(True) for t in carry0)
    inputs = [t for act in leaves.values() for t in act] + list(carry0 or ())
    grads: list[torch.Tensor] = []

    def forward() -> Any:
        prev: Any = carry0
        for j, ref in enumerate(op.layers):
            carry, stage_inputs = None, {}
            if ref.stage == LOSS_STAGE or ref.layer == 0:
                stage_inputs = leaves if j == 0 else {op.layers[j - 1].stage: prev}
            else:
                carry = prev
            raw = raws.get(ref.stage) if not is_loss_operator(ref) and needs_raw(workload, ref) \
                else None
            prev = run_operator(workload, ref, params, carry, stage_inputs, raw, op.batch)
        return prev

    def step() -> None:
        for t in (*params.values(), *inputs):
            t.grad = None
        out = forward()
        roots = [out] if isinstance(out, torch.Tensor) else [t for t in out if t.requires_grad]
        if not grads:
            grads.extend(torch.randn(r.shape, generator=gen) if r.dim() else torch.ones_like(r)
                         for r in roots)
        torch.autograd.backward(roots, grads)

    return _time_call(step, warmup, repeats, combine) / op.num_layers


def calibration_plan(workload: Any) -> Any:
    """The plan the runtime is calibrated on: every MetaOp of ``workload``, one after another,
    on one device (the ``sequential`` planner at one device)."""
    from spindle.planner.pipeline import make_plan  # local: planning reads profiles

    return make_plan(workload, "sequential", 1, 1, "cpu", check_memory=False)


def time_runtime_phases(workload: Any, plan: Any, warmup: int, repeats: int) -> float:
    """Median seconds of the compute + send/recv phases of one iteration of the runtime
    (:class:`spindle.runtime.executor.TrainingRun`) running the one-device ``plan`` in this
    process: everything the waves cost, the gradient sync and the optimizer left out."""
    import torch

    from spindle.runtime.executor import TrainingRun

    run = TrainingRun(workload, plan, 0, 1, torch.device("cpu"))
    times = []
    for step in range(warmup + repeats):
        run.prepare_data(step)
        phases = run.step(step).rank_iteration.phases
        if step >= warmup:
            times.append(phases["compute"] + phases["send_recv"])
    return statistics.median(times)


def runtime_calibration(
    ops: list[MetaOp], plan: Any, entries: dict[Signature, ProfileEntry], measured_s: float
) -> RuntimeCalibration:
    """:class:`RuntimeCalibration` from the measured phases ``measured_s`` of the one-device
    ``plan`` of the MetaOps ``ops`` and the chain times of its slices in ``entries``."""
    by_id = {o.id: o for o in ops}
    chains = 0.0
    for wave in plan.waves:
        for sl in wave.slices:
            op = by_id[sl.metaop]
            entry = entries[signature(op)]
            at_one = next(pt for pt in entry.points if pt.n == 1)
            chains += at_one.compute_s * (sl.layer_end - sl.layer_start)
    waves = len(plan.waves)
    overhead = (measured_s - chains) / waves
    if overhead < 0:
        log.info("runtime calibration: the runtime ran its plan %.1f%% faster than the chains"
                 " add up to (timing noise); wave overhead set to 0",
                 100 * (chains - measured_s) / chains)
    return RuntimeCalibration(max(overhead, 0.0), measured_s, chains, waves)


def chain_workload(workload: Any) -> Any | None:
    """``workload`` if the runtime model can compute it (then the profiler times the runtime's
    own operators), else None (the bare blocks are timed instead)."""
    if workload is None:
        return None
    try:
        from spindle.runtime.model import check_supported

        check_supported(workload)
    except Exception as err:  # noqa: BLE001 - any reason the runtime cannot build it
        log.warning("timing bare blocks (the runtime cannot compute the workload: %s)", err)
        return None
    return workload


# --- the collective ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _across_ranks(seconds: float, slowest: bool, world: int) -> float:
    """``seconds`` of every rank combined (collective): their maximum, or their mean."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if slowest else dist.ReduceOp.SUM)
    return float(t.item()) if slowest else float(t.item()) / world


def _leave_group() -> None:
    """End a spawned gloo worker that finished its work: a barrier (rank 0 has written its
    results), then exit without the interpreter's teardown, where gloo's threads sometimes abort
    the process ('terminate called without an active exception': 3 of 8 profiles once the chain
    workers also ran the runtime; 0 of 14 since)."""
    import torch.distributed as dist

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
    optimizer phase for each parameter set (a tuple of tensor shapes).  Rank 0 writes the *means* to ``out``: gloo over loopback has a
    heavy tail (a wake-up of its I/O thread can cost a scheduler tick, ~4 ms here, in 10-40% of
    the calls), and an iteration sums many such calls, so their expected time is what adds up."""
    import torch
    import torch.distributed as dist

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
    _leave_group()


def _time_sync(rank: int, world: int, nbytes: int, repeats: int) -> list[float]:
    """The runtime's gradient sync of one bucket (:class:`spindle.runtime.param_groups.
    BucketSum`: flatten, all-reduce, copy back) of ``nbytes`` of float32 gradients in
    :data:`SYNC_TENSORS` tensors, on every process; each starts it after a barrier."""
    import torch
    import torch.distributed as dist

    from spindle.runtime.param_groups import BucketSum

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
    import torch
    import torch.distributed as dist

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
    import torch
    import torch.distributed as dist

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
    import numpy as np
    from scipy.optimize import nnls

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


def runtime_parameter_sets(workload: Any) -> tuple[tuple[tuple[int, ...], ...], ...] | None:
    """Parameter sets for the optimizer measurement made of the runtime's own parameter tensors
    of ``workload`` (:mod:`spindle.runtime.model`): every 4th, every 2nd, all, and all twice;
    None when the runtime does not support the workload."""
    try:
        from spindle.runtime.model import (
            all_parameter_names,
            check_supported,
            parameter_shape,
        )

        check_supported(workload)
        shapes = [tuple(parameter_shape(workload, n)) for n in all_parameter_names(workload)]
    except Exception as err:  # noqa: BLE001 - any reason the runtime cannot build it
        log.info("optimizer sets from block shapes (runtime parameters unavailable: %s)", err)
        return None
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
        shapes += [tuple(p.shape) for p in build_block(*key).parameters()]
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
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "collective.json")
        mp.spawn(
            _collective_worker,
            args=(processes, _free_port(), sizes, repeats, out, p2p_sizes, optimizer_sets,
                  threads),
            nprocs=processes, join=True,
        )
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


def measure_collective(
    sizes: tuple[int, ...] = COLLECTIVE_SIZES, repeats: int = 20, processes: int = 2
) -> CollectiveFit:
    """All-reduce times over ``processes`` local gloo processes, fitted to latency + bandwidth."""
    return measure_machine(sizes, repeats, processes, p2p_sizes=()).collective


# --- profiling a workload ----------------------------------------------------------------------


def machine_description(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(), "machine": platform.machine(), "cpu": cpu,
        "cpu_count": os.cpu_count() or 1, "threads_per_device": threads,
        "python": platform.python_version(),
        # other work on the machine inflates the timings: record how busy it was
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def block_flops(op: MetaOp) -> float:
    """FLOPs (fwd + bwd, whole batch) of what :func:`time_metaop` runs: the bare block, without
    the light parts ``op.cost.flops_per_layer`` spreads over the chain."""
    if op.is_loss:
        return op.cost.flops_per_layer
    return op.batch * costmodel.layer_train_flops(
        op.kind, op.cost.hidden, op.cost.ffn, op.cost.tokens, op.cost.memory_tokens
    )


def _distinct_metaops(ops: list[MetaOp]) -> dict[Signature, list[MetaOp]]:
    out: dict[Signature, list[MetaOp]] = {}
    for op in ops:
        out.setdefault(signature(op), []).append(op)
    return out


def _calibrate_flops() -> float:
    """This process's float32 matmul rate (FLOP/s), for the time guard only."""
    import torch

    a = torch.randn(256, 256)
    dt = _time_call(lambda: a @ a, 2, 5)
    return 2 * 256**3 / max(dt, 1e-9)


def estimate_profile_seconds(
    jobs: list[tuple[MetaOp, int]], flops_rate: float, warmup: int, repeats: int,
    chain: bool = False,
) -> float:
    """A lower-bound guess of the profiling time: FLOPs at the measured matmul rate (of the
    bare blocks, or with ``chain`` of the MetaOps' whole chains, light parts included)."""
    flops = (lambda op: op.cost.flops_per_layer * op.num_layers) if chain else block_flops
    return sum(flops(op) / (1 if op.is_loss else n) for op, n in jobs) \
        * (warmup + repeats) / flops_rate


def profile_metaops(
    ops: list[MetaOp],
    devices: int,
    repeats: int = 5,
    warmup: int = 2,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    threads: int | None = None,
    collective: CollectiveFit | None = None,
    progress: bool = True,
    workload: str = "",
    workload_fingerprint: str = "",
    optimizer_sets: tuple[tuple[tuple[int, ...], ...], ...] | None = None,
    runtime_workload: Any = None,
) -> Profile:
    """Measure every distinct signature of ``ops`` at every valid n <= ``devices``: with
    ``runtime_workload`` (the :class:`spindle.declare.workload.Workload` of ``ops``, when the runtime
    can compute it) each MetaOp's whole chain of runtime operators (:func:`time_chain`), else
    the bare block (:func:`time_metaop`).  ``threads``: torch threads while measuring, by
    default what one rank gets under torchrun (:func:`default_threads`)."""
    import torch
    from tqdm import tqdm

    if devices < 1:
        raise ProfileError(f"--devices must be >= 1 (got {devices})")
    if repeats < 1:
        raise ProfileError(f"--repeats must be >= 1 (got {repeats})")
    threads = threads or default_threads(devices)
    chain_w = chain_workload(runtime_workload)
    groups = _distinct_metaops(ops)
    if chain_w is not None:
        for group in groups.values():
            if len({o.cost.flops_per_layer for o in group}) > 1:
                log.info("MetaOps %s share a signature but not their light parts; timing the"
                         " chain of %s", [o.name for o in group], group[0].name)
    jobs = [
        (group[0], n)
        for group in groups.values()
        for n in ([1] if group[0].is_loss else data_parallel_counts(group[0].batch, devices))
    ]
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        guess = estimate_profile_seconds(jobs, _calibrate_flops(), warmup, repeats,
                                         chain=chain_w is not None)
        if guess > max_seconds:
            raise ProfileError(
                f"profiling {len(jobs)} points would take at least ~{guess:.0f} s on this machine"
                f" (> --max-seconds {max_seconds:g}); profile a tiny workload or raise the limit"
            )
        start = time.perf_counter()
        p2p: P2PFit | None = None
        opt: OptimizerFit | None = None
        if collective is None:
            costs = measure_machine(
                processes=2, threads=threads,
                optimizer_sets=optimizer_sets or optimizer_parameter_sets(ops))
            coll, p2p, opt = costs.collective, costs.p2p, costs.optimizer
        else:
            coll = collective
        measured: dict[Signature, list[ProfilePoint]] = {s: [] for s in groups}
        ranks = concurrent_ranks(devices, threads)
        plan = calibration_plan(chain_w) if chain_w is not None else None
        runtime_phases: float | None = None
        if chain_w is not None and ranks > 1:
            # every point timed on `ranks` processes at once, as the ranks of a run compute
            budget = max_seconds - (time.perf_counter() - start)
            times, runtime_phases = measure_chains(chain_w, jobs, warmup, repeats, threads,
                                                   ranks, budget, plan)
            if len(times) < len(jobs):
                elapsed = time.perf_counter() - start
                raise ProfileError(
                    f"profiling stopped after {elapsed:.0f} s (> --max-seconds {max_seconds:g})"
                    f" with {len(times)}/{len(jobs)} points done"
                )
            for (op, n), compute in zip(jobs, times):
                sync = coll.allreduce_time(op.cost.params_per_layer * 4, n)
                measured[signature(op)].append(ProfilePoint(n, compute, sync))
            jobs_left: list[tuple[MetaOp, int]] = []
        else:
            jobs_left = jobs
        with tqdm(total=len(jobs_left), desc="profiling", unit="point",
                  disable=not progress or not jobs_left) as bar:
            for op, n in jobs_left:
                elapsed = time.perf_counter() - start
                if elapsed > max_seconds:
                    raise ProfileError(
                        f"profiling stopped after {elapsed:.0f} s (> --max-seconds {max_seconds:g})"
                        f" with {bar.n}/{len(jobs)} points done"
                    )
                bar.set_postfix_str(f"{op.name} n={n}", refresh=False)
                compute = (time_metaop(op, n, warmup, repeats) if chain_w is None
                           else time_chain(chain_w, op, n, warmup, repeats))
                sync = coll.allreduce_time(op.cost.params_per_layer * 4, n)
                measured[signature(op)].append(ProfilePoint(n, compute, sync))
                bar.update()
        if plan is not None and runtime_phases is None:
            runtime_phases = time_runtime_phases(chain_w, plan, warmup, repeats)
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(old_threads)
    entries = {
        sig: ProfileEntry(
            sig, tuple(o.name for o in group), group[0].cost.params_per_layer,
            block_flops(group[0]) if chain_w is None else group[0].cost.flops_per_layer,
            tuple(measured[sig]), "block" if chain_w is None else "chain",
        )
        for sig, group in groups.items()
    }
    calibration = None
    if plan is not None and runtime_phases is not None:
        calibration = runtime_calibration(ops, plan, entries, runtime_phases)
        log.info("runtime calibration: %.1f ms of waves against %.1f ms of chains: %.0f us per"
                 " wave", 1e3 * calibration.iteration_s, 1e3 * calibration.chains_s,
                 1e6 * calibration.wave_overhead_s)
    return Profile(
        workload=workload, workload_fingerprint=workload_fingerprint, devices=devices,
        repeats=repeats, threads_per_device=threads, dtype="float32", grad_bytes=4,
        torch_version=torch.__version__, machine=machine_description(threads),
        collective=coll, entries=entries, elapsed_s=elapsed, p2p=p2p, optimizer=opt,
        runtime=calibration,
    )


def concurrent_ranks(devices: int, threads: int) -> int:
    """How many ranks of a ``devices``-rank run on this machine compute at once: the chains are
    timed on that many processes simultaneously (they share the cores' caches and memory
    bandwidth as the ranks do)."""
    return max(1, min(devices, (os.cpu_count() or 1) // max(threads, 1)))


def _chain_worker(
    rank: int, world: int, port: int, workload: Any, jobs: list[tuple[MetaOp, int]],
    warmup: int, repeats: int, threads: int, budget_s: float, out: str, plan: Any = None,
) -> None:
    """One of ``world`` processes timing every chain job at the same time as the others; rank 0
    writes each job's time, stopping once ``budget_s`` is spent.  Every timed run is combined
    over the ranks before the median is taken (:func:`_time_call`): at n > 1 the slowest rank's
    time (the ranks are the devices of one data-parallel slice, which ends with the slowest of
    them in every iteration), at n = 1 the ranks' mean (independent samples of a one-device
    slice; their maximum would be biased upwards).  Then, with a one-device ``plan``, every rank
    runs it on the runtime at once (:func:`time_runtime_phases`; the ranks' mean)."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        start = time.perf_counter()
        times: list[float] = []
        for op, n in jobs:
            stop = torch.tensor([float(time.perf_counter() - start > budget_s)])
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
            if stop.item() > 0:
                break
            # per run: at n > 1 the ranks are the devices of one data-parallel slice, which ends
            # with the slowest of them; at n = 1 each rank runs an independent one-device slice
            slowest = n > 1 and not op.is_loss
            times.append(time_chain(workload, op, n, warmup, repeats,
                                    combine=lambda dt, s=slowest: _across_ranks(dt, s, world)))
        phases: float | None = None
        if plan is not None and len(times) == len(jobs):
            dist.barrier()
            t = torch.tensor([time_runtime_phases(workload, plan, warmup, repeats)],
                             dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            phases = float(t.item()) / world
        if rank == 0:
            Path(out).write_text(json.dumps({"chains": times, "runtime_phases": phases}))
    except BaseException:
        dist.destroy_process_group()
        raise
    _leave_group()


def measure_chains(
    workload: Any, jobs: list[tuple[MetaOp, int]], warmup: int, repeats: int, threads: int,
    ranks: int, budget_s: float, plan: Any = None,
) -> tuple[list[float], float | None]:
    """:func:`time_chain` of every job on ``ranks`` local processes at once (see
    :func:`_chain_worker`); fewer times than jobs when ``budget_s`` ran out.  With a one-device
    ``plan``, also the runtime's compute + send/recv phases of it (:func:`time_runtime_phases`),
    else None."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "chains.json")
        mp.spawn(_chain_worker, args=(ranks, _free_port(), workload, jobs, warmup, repeats,
                                      threads, budget_s, out, plan), nprocs=ranks, join=True)
        raw = json.loads(Path(out).read_text())
        phases = raw["runtime_phases"]
        return [float(t) for t in raw["chains"]], None if phases is None else float(phases)


def default_threads(devices: int, environ: Any = None) -> int:
    """Torch threads of one rank as ``torchrun`` starts them: ``OMP_NUM_THREADS`` when set,
    else 1 with several ranks on the machine (torchrun then sets ``OMP_NUM_THREADS=1``), else
    every core."""
    env = os.environ if environ is None else environ
    try:
        if int(env.get("OMP_NUM_THREADS", "")) >= 1:
            return int(env["OMP_NUM_THREADS"])
    except ValueError:
        pass
    return 1 if devices > 1 else max(1, os.cpu_count() or 1)


# --- CLI ---------------------------------------------------------------------------------------


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``spindle profile WORKLOAD [--devices N] [--out PATH] [--repeats R] ...``."""
    parser.add_argument("workload", help="shipped workload name or a YAML/TOML path")
    parser.add_argument("--devices", type=int, default=2,
                        help="profile every valid device count up to N (default 2)")
    parser.add_argument("--out", type=Path, default=Path("profile.json"),
                        help="where to write the profile (default profile.json)")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                        help=f"timed runs per point (median; default {DEFAULT_REPEATS})")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                        help=f"untimed runs per point first (default {DEFAULT_WARMUP})")
    parser.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS,
                        help="refuse or stop when profiling would take longer (default 300)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per simulated device (default: what a torchrun"
                             " rank gets: $OMP_NUM_THREADS, else 1 when --devices > 1)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run_profile_command(args: argparse.Namespace) -> int:
    """Run ``spindle profile``; 0 on success, 2 on a bad workload or a refused profile."""
    from spindle.declare.workload import WorkloadError, load_workload

    try:
        w = load_workload(args.workload)
        graph = contract(w)
        prof = profile_metaops(
            graph.metaops, args.devices, repeats=args.repeats, warmup=args.warmup,
            max_seconds=args.max_seconds, threads=args.threads,
            progress=not args.no_progress, workload=w.name,
            workload_fingerprint=w.fingerprint(), optimizer_sets=runtime_parameter_sets(w),
            runtime_workload=w,
        )
        write_profile(prof, args.out)
    except (WorkloadError, ProfileError) as err:
        sys.stderr.write(f"spindle profile: error: {err}\n")
        return 2
    npts = sum(len(e.points) for e in prof.entries.values())
    sys.stdout.write(
        f"wrote {args.out}: {len(prof.entries)} signatures, {npts} points, devices <= {prof.devices},"
        f" {prof.elapsed_s:.1f} s (gloo latency {prof.collective.latency_s * 1e6:.0f} us,"
        f" {prof.collective.bandwidth / 1e9:.2f} GB/s"
        + (f"; P2P {prof.p2p.latency_s * 1e6:.0f} us, {prof.p2p.bandwidth / 1e9:.2f} GB/s"
           if prof.p2p else "")
        + (f"; optimizer {prof.optimizer.fixed_s * 1e3:.2f} ms"
           f" + {prof.optimizer.per_param_s * 1e9:.1f} ns/param" if prof.optimizer else "")
        + (f"; runtime {prof.runtime.wave_overhead_s * 1e6:.0f} us/wave" if prof.runtime
           else "")
        + ")\n"
    )
    return 0
