"""Timing the runtime's own computation for ``spindle profile``: operator chains, bare blocks and
the runtime's per-wave cost.

* :func:`time_chain` times a MetaOp's whole chain of operators exactly as the runtime runs a
  slice (the layer provider's modules through :func:`spindle.layers.chain.run_chain`, with raw
  input rows and random stand-ins for the producers' outputs), on the rows one device holds;
* :func:`time_metaop` times one bare built-in block of a MetaOp's shape, for a workload the
  runtime cannot run (``measurement: block``);
* :func:`measure_chains` runs the chain timings on as many processes at once as the ranks of a
  run would compute at once, combining every timed run over them, and then the runtime itself on
  the one-device sequential plan, for the runtime calibration (:func:`runtime_calibration`).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from spindle.costs.profile import ProfileEntry, RuntimeCalibration, Signature
from spindle.costs.scalability import signature
from spindle.declare.workload import Workload
from spindle.layers import provider_for
from spindle.layers.blocks import LOGIT_SCALE_INIT, Block
from spindle.layers.chain import run_chain
from spindle.layers.provider import LayerError, LayerProvider, materialise
from spindle.plan.contract import MetaOp, Plan
from spindle.planner.pipeline import make_plan
from spindle.runtime.data import task_data
from spindle.runtime.executor import TrainingRun
from spindle.tools.machine import across_ranks, free_port, leave_group, run_workers

log = logging.getLogger(__name__)


def time_call(
    fn: Callable[[], object], warmup: int, repeats: int,
    combine: Callable[[float], float] | None = None,
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
    """Median seconds of forward + backward of one bare built-in layer of ``op``'s shape at
    per-device batch ``op.batch / n`` on this process (float32)."""
    b = max(op.batch // n, 1)
    c = op.cost
    gen = torch.Generator().manual_seed(0)
    if op.is_loss:
        za = torch.randn(b, c.hidden, generator=gen, requires_grad=True)
        zb = torch.randn(b, c.hidden, generator=gen, requires_grad=True)
        log_temp = torch.nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        labels = torch.arange(b)

        def loss_step() -> None:
            za.grad = zb.grad = log_temp.grad = None
            logits = F.normalize(za, dim=-1) @ F.normalize(zb, dim=-1).T * log_temp.exp()
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            loss.backward()

        return time_call(loss_step, warmup, repeats)

    block = Block(op.kind, c.hidden, c.heads, c.ffn)
    x = torch.randn(b, c.tokens, c.hidden, generator=gen, requires_grad=True)
    mem = (torch.randn(b, c.memory_tokens, c.hidden, generator=gen, requires_grad=True)
           if op.kind == "decoder" else None)
    grad_out = torch.randn(b, c.tokens, c.hidden, generator=gen)
    params = list(block.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        if mem is not None:
            mem.grad = None
        block(x, mem).backward(grad_out)

    return time_call(step, warmup, repeats)


def time_chain(provider: LayerProvider, op: MetaOp, n: int, warmup: int = 2, repeats: int = 5,
               seed: int = 0, combine: Callable[[float], float] | None = None) -> float:
    """Median seconds of forward + backward of the WHOLE chain of ``op`` as the runtime computes
    it (:func:`spindle.layers.chain.run_chain` over the provider's modules, fed as the executor
    feeds a slice: the producers' outputs, the raw input rows, the task's global batch), on the
    ``op.batch / n`` rows of one device (a contrastive loss: the whole batch), divided by the
    chain's number of layers: the per-layer compute time at n, light parts included."""
    first = op.layers[0]
    if not (first.is_loss or first.layer == 0):
        raise LayerError(f"MetaOp {op.name} does not start a stage: no inputs to time it on")
    rows = op.batch if op.is_loss else max(op.batch // n, 1)
    gen = torch.Generator().manual_seed(seed)
    paths = {p for ref in op.layers for p in provider.operator_modules(ref)}
    modules = materialise(provider, paths, seed, torch.float32)
    raws = {f: t.contiguous()
            for f, t in task_data(provider.workload, op.task, seed).rows(0, 0, rows).items()}
    leaves = {s: tuple(torch.randn((rows, *shape), generator=gen).requires_grad_(True)
                       for shape in provider.output_shapes(first.task, s))
              for s in provider.input_stages(first)}
    inputs = [t for act in leaves.values() for t in act]
    params = [p for m in modules.values() for p in m.parameters()]
    grads: list[torch.Tensor] = []

    def step() -> None:
        for t in (*params, *inputs):
            t.grad = None
        out = run_chain(provider, modules, op.layers, leaves, None, raws, op.batch)
        roots = [out] if isinstance(out, torch.Tensor) else [t for t in out if t.requires_grad]
        if not grads:
            grads.extend(torch.randn(r.shape, generator=gen) if r.dim() else torch.ones_like(r)
                         for r in roots)
        torch.autograd.backward(roots, grads)

    return time_call(step, warmup, repeats, combine) / op.num_layers


# --- the runtime calibration ----------------------------------------------------------------------


def calibration_plan(workload: Workload) -> Plan:
    """The plan the runtime is calibrated on: every MetaOp of ``workload``, one after another,
    on one device (the ``sequential`` planner at one device)."""
    return make_plan(workload, "sequential", 1, 1, "cpu", check_memory=False)


def time_runtime_phases(workload: Workload, plan: Plan, warmup: int, repeats: int) -> float:
    """Median seconds of the compute + send/recv phases of one iteration of the runtime
    (:class:`spindle.runtime.executor.TrainingRun`) running the one-device ``plan`` in this
    process: everything the waves cost, the gradient sync and the optimizer left out."""
    run = TrainingRun(workload, plan, 0, 1, torch.device("cpu"))
    times = []
    for step in range(warmup + repeats):
        run.prepare_data(step)
        phases = run.step(step).rank_iteration.phases
        if step >= warmup:
            times.append(phases["compute"] + phases["send_recv"])
    return statistics.median(times)


def runtime_calibration(
    ops: list[MetaOp], plan: Plan, entries: dict[Signature, ProfileEntry], measured_s: float
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


def runnable_workload(workload: Workload | None) -> Workload | None:
    """``workload`` if the runtime can run it (then the profiler times the runtime's own
    operators), else None (the bare blocks are timed instead)."""
    if workload is None:
        return None
    try:
        provider_for(workload).check_runnable()
    except LayerError as err:
        log.warning("timing bare blocks (the runtime cannot run the workload: %s)", err)
        return None
    return workload


# --- many ranks at once ---------------------------------------------------------------------------


def concurrent_ranks(devices: int, threads: int) -> int:
    """How many ranks of a ``devices``-rank run on this machine compute at once: the chains are
    timed on that many processes simultaneously (they share the cores' caches and memory
    bandwidth as the ranks do)."""
    return max(1, min(devices, (os.cpu_count() or 1) // max(threads, 1)))


def _chain_worker(
    rank: int, world: int, port: int, workload: Workload, jobs: list[tuple[MetaOp, int]],
    warmup: int, repeats: int, threads: int, budget_s: float, out: str,
    plan: Plan | None = None,
) -> None:
    """One of ``world`` processes timing every chain job at the same time as the others; rank 0
    writes each job's time, stopping once ``budget_s`` is spent.  Every timed run is combined
    over the ranks before the median is taken (:func:`time_call`): at n > 1 the slowest rank's
    time (the ranks are the devices of one data-parallel slice, which ends with the slowest of
    them in every iteration), at n = 1 the ranks' mean (independent samples of a one-device
    slice; their maximum would be biased upwards).  Then, with a one-device ``plan``, every rank
    runs it on the runtime at once (:func:`time_runtime_phases`; the ranks' mean)."""
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    provider = provider_for(workload)
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

            def combine(dt: float, slowest: bool = slowest) -> float:
                return across_ranks(dt, slowest, world)

            times.append(time_chain(provider, op, n, warmup, repeats, combine=combine))
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
    leave_group()


def measure_chains(
    workload: Workload, jobs: list[tuple[MetaOp, int]], warmup: int, repeats: int,
    threads: int, ranks: int, budget_s: float, plan: Plan | None = None,
) -> tuple[list[float], float | None]:
    """:func:`time_chain` of every job on ``ranks`` local processes at once (see
    :func:`_chain_worker`); fewer times than jobs when ``budget_s`` ran out.  With a one-device
    ``plan``, also the runtime's compute + send/recv phases of it (:func:`time_runtime_phases`),
    else None."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "chains.json")
        run_workers(_chain_worker, (ranks, free_port(), workload, jobs, warmup, repeats,
                                    threads, budget_s, out, plan), ranks)
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
