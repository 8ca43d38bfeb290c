"""``spindle profile``: measure T_m(n) points of a workload's MetaOps with PyTorch on this machine.

For every distinct MetaOp signature (kind, hidden, heads, ffn, tokens, memory_tokens, batch) and
every valid device count n up to ``--devices``, one MetaOp of that signature runs forward + backward
at the per-device batch ``batch / n`` exactly as the runtime computes it (schema version 3,
``measurement: chain``): its whole chain of operators through the layer provider's modules
(:func:`spindle.tools.measure.time_chain`), with raw input rows and random stand-ins for the
producers' outputs; a few warm-up runs, then the median of ``--repeats`` timed runs divided by the
chain's layers is the point's per-layer ``compute_s``, light parts included.  Torch runs with the
threads one torchrun rank gets (:func:`spindle.tools.measure.default_threads`).  A workload the
runtime cannot compute falls back to a bare block of the signature (``measurement: block``, as in
versions 1 and 2, which the estimator scales by the layer's FLOPs).  The machine is measured once
(:mod:`spindle.tools.machine`): gloo all-reduce over 2 local processes for a few message sizes,
fitted as ``latency + bytes / bandwidth``; each point's ``sync_s`` is that model's ring all-reduce
of the block's own gradients over n devices (the estimator re-applies the measured collective model
to the layer's full gradient volume, light parts included).  The same spawned processes also measure
(schema version 2) the point-to-point exchange of a wave boundary (one ``batch_isend_irecv`` of an
isend and an irecv per rank, fitted as ``latency + bytes / bandwidth``) and the runtime's optimizer
phase (zero_grad, clipping by the global norm with its scalar all-reduce, ``AdamW(foreach=True)``)
over parameter sets made of the runtime's own parameter tensors of the workload, fitted as ``fixed +
per_param * parameters``; the simulator uses them
(:func:`spindle.planner.simulator.links_for_cluster`) when planning for the ``cpu`` preset.  The
result is a versioned JSON profile, written atomically, that
:func:`spindle.costs.scalability.make_estimator` fits instead of the hardware model.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

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
    Signature,
    write_profile,
)
from spindle.costs.scalability import signature
from spindle.declare.workload import Workload, WorkloadError, load_workload
from spindle.layers import costmodel, provider_for
from spindle.plan.contract import MetaOp
from spindle.tools.machine import (
    measure_machine,
    optimizer_parameter_sets,
    runtime_parameter_sets,
)
from spindle.tools.measure import (
    calibration_plan,
    concurrent_ranks,
    default_threads,
    measure_chains,
    runnable_workload,
    runtime_calibration,
    time_call,
    time_chain,
    time_metaop,
    time_runtime_phases,
)

log = logging.getLogger(__name__)

DEFAULT_REPEATS = 11  # per point, 3 profiles of small-ofasys spread by 7% (median); 5 repeats: ~15%
DEFAULT_WARMUP = 3
DEFAULT_MAX_SECONDS = 300.0  # the paper profiles a model in under 5 minutes


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
    a = torch.randn(256, 256)
    dt = time_call(lambda: a @ a, 2, 5)
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
    runtime_workload: Workload | None = None,
) -> Profile:
    """Measure every distinct signature of ``ops`` at every valid n <= ``devices``: with
    ``runtime_workload`` (the :class:`spindle.declare.workload.Workload` of ``ops``, when the
    runtime can run it) each MetaOp's whole chain of runtime operators (:func:`time_chain`),
    else the bare block (:func:`time_metaop`).  ``threads``: torch threads while measuring, by
    default what one rank gets under torchrun (:func:`default_threads`)."""
    if devices < 1:
        raise ProfileError(f"--devices must be >= 1 (got {devices})")
    if repeats < 1:
        raise ProfileError(f"--repeats must be >= 1 (got {repeats})")
    threads = threads or default_threads(devices)
    chain_w = runnable_workload(runtime_workload)
    provider = provider_for(chain_w) if chain_w is not None else None
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
                compute = (time_metaop(op, n, warmup, repeats) if provider is None
                           else time_chain(provider, op, n, warmup, repeats))
                sync = coll.allreduce_time(op.cost.params_per_layer * 4, n)
                measured[signature(op)].append(ProfilePoint(n, compute, sync))
                bar.update()
        if plan is not None and chain_w is not None and runtime_phases is None:
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
        f"wrote {args.out}: {len(prof.entries)} signatures, {npts} points,"
        f" devices <= {prof.devices},"
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
