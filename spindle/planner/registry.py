"""The planner registry: one name -> one function from (MetaGraph, Estimator, N) to waves.

:func:`plan_waves` is the single entry point: it checks the request, runs the planner and checks
its waves (:func:`check_waves`) before anyone places them, so a planner bug surfaces here as a
:class:`PlanningError` and not as a bad plan on a cluster.  Two generators of synthetic problems
sit beside it: :func:`random_workload` (multi-task workloads of any size, for planning-time
checks) and :func:`synthetic_graph` (a MetaGraph written directly as layer counts, batches and
dependencies, for hand-written problems, brute force and property tests), with
:func:`alpha_beta_estimator`, a stand-in T_m(n) when no fitted estimator is wanted.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from typing import Any

from spindle.costs.estimator import Estimator, TableEstimator, data_parallel_counts
from spindle.costs.graph import LayerRef, MetaGraph, MetaOp
from spindle.declare.workload import Workload, workload_from_dict
from spindle.planner import baselines
from spindle.planner.allocator import AllocationError
from spindle.planner.schedule import WaveSpec
from spindle.planner.scheduler import wavefront_schedule

log = logging.getLogger(__name__)

Planner = Callable[[MetaGraph, Estimator, int], list[WaveSpec]]

PLANNERS: dict[str, Planner] = {
    "spindle": wavefront_schedule,
    "sequential": baselines.sequential,
    "optimus": baselines.optimus,
    "distmm-mt": baselines.distmm_mt,
    "uniform": baselines.uniform,
}


class PlanningError(ValueError):
    """A planning request that cannot be served; the message is one line."""


def plan_waves(
    name: str, graph: MetaGraph, estimator: Estimator, num_devices: int
) -> list[WaveSpec]:
    """Run planner ``name`` and return its checked waves."""
    if name not in PLANNERS:
        raise PlanningError(f"unknown planner '{name}' (known: {', '.join(PLANNERS)})")
    if num_devices < 1:
        raise PlanningError(f"num_devices {num_devices}: the device count must be at least 1")
    for m in graph.metaops:
        if not estimator.valid_counts(m, num_devices):
            raise PlanningError(
                f"MetaOp {m.id} ('{m.name}', batch {m.batch}) has no valid device count within"
                f" {num_devices} devices"
            )
    try:
        waves = PLANNERS[name](graph, estimator, num_devices)
    except (AllocationError, baselines.BaselineError) as err:
        raise PlanningError(f"planner '{name}': {err}") from None
    check_waves(waves, graph, estimator, num_devices, source=f"planner '{name}'")
    log.info("planner %s: %d waves for %d MetaOps on %d devices", name, len(waves),
             len(graph.metaops), num_devices)
    return waves


def check_waves(
    waves: list[WaveSpec],
    graph: MetaGraph,
    estimator: Estimator,
    num_devices: int,
    source: str = "waves",
) -> None:
    """Raise :class:`PlanningError` unless ``waves`` is a valid unplaced schedule: at most N
    devices per wave, one slice per MetaOp per wave, every n valid for its MetaOp, every layer
    exactly once, a MetaOp's slices contiguous and in later waves than its previous slice and its
    producers' last slices, and ``time_s = layers x T_m(n)``."""
    ops = graph.metaops
    next_layer = {m.id: 0 for m in ops}
    last_wave: dict[int, int] = {}
    done_in: dict[int, int] = {}
    for wi, w in enumerate(waves):
        where = f"{source}: wave {wi}"
        if not w.slices:
            raise PlanningError(f"{where}: no slices")
        if w.devices_used > num_devices:
            raise PlanningError(f"{where}: uses {w.devices_used} devices, more than {num_devices}")
        seen: set[int] = set()
        for s in w.slices:
            tag = f"{where}, MetaOp {s.metaop}"
            if not 0 <= s.metaop < len(ops):
                raise PlanningError(f"{tag}: no such MetaOp")
            m = ops[s.metaop]
            if s.metaop in seen:
                raise PlanningError(f"{tag}: two slices in one wave")
            seen.add(s.metaop)
            if s.n not in estimator.valid_counts(m, num_devices):
                raise PlanningError(f"{tag}: n = {s.n} is not a valid device count")
            if s.layer_start != next_layer[m.id] or not s.layer_start < s.layer_end <= m.num_layers:
                raise PlanningError(
                    f"{tag}: layers [{s.layer_start}, {s.layer_end}) do not continue at layer"
                    f" {next_layer[m.id]} of {m.num_layers}"
                )
            if s.layer_start == 0:
                for d in m.deps:
                    if done_in.get(d, wi) >= wi:
                        raise PlanningError(f"{tag}: starts before producer MetaOp {d} finished")
            elif last_wave.get(m.id, wi) >= wi:
                raise PlanningError(f"{tag}: not after its previous slice")
            expect = s.num_layers * estimator.time(m, s.n)
            if not math.isclose(s.time_s, expect, rel_tol=1e-6, abs_tol=1e-12):
                raise PlanningError(f"{tag}: time {s.time_s} is not layers x T(n) = {expect}")
        for s in w.slices:
            next_layer[s.metaop] = s.layer_end
            last_wave[s.metaop] = wi
            if s.layer_end == ops[s.metaop].num_layers:
                done_in[s.metaop] = wi
    for m in ops:
        if next_layer[m.id] != m.num_layers:
            raise PlanningError(
                f"{source}: MetaOp {m.id} ('{m.name}') has only {next_layer[m.id]} of"
                f" {m.num_layers} layers scheduled"
            )


# --- synthetic workloads ---------------------------------------------------------------------

_ENCODER_SHAPES = ((384, 6), (512, 8), (768, 12), (1024, 16), (1280, 16))


def random_workload(num_tasks: int, seed: int = 0) -> Workload:
    """A synthetic multi-task workload of ``num_tasks`` tasks over shared components, mixing the
    three shapes of SPINDLE.md section 9: contrastive pairs of encoders (two levels), adaptor ->
    encoder -> decoder tasks (three levels) and encoders feeding a decoder-only LLM (two levels).
    Layer counts, widths, batch sizes and sequence lengths are drawn from ``seed``."""
    if num_tasks < 1:
        raise ValueError(f"num_tasks {num_tasks} is below 1")
    rng = random.Random(seed)
    comps: dict[str, dict[str, Any]] = {}
    n_modalities = max(2, min(12, num_tasks // 2 + 2))
    for k in range(n_modalities):
        hidden, heads = rng.choice(_ENCODER_SHAPES)
        comps[f"mod{k}"] = {
            "kind": "encoder", "layers": rng.choice((2, 6, 12, 24, 32)), "hidden": hidden,
            "heads": heads, "input": {"type": "features", "dim": rng.choice((256, 588))},
            "output_dim": 512,
        }
    comps["lm_encoder"] = {"kind": "encoder", "layers": 12, "hidden": 1024, "heads": 16,
                           "input": {"type": "tokens", "vocab": 32000}}
    comps["lm_decoder"] = {"kind": "decoder", "layers": 12, "hidden": 1024, "heads": 16,
                           "input": {"type": "tokens", "vocab": 32000}, "vocab": 32000}
    comps["llm"] = {"kind": "llm", "layers": rng.choice((16, 24)), "hidden": 2048, "heads": 16,
                    "ffn": 5504, "input": {"type": "tokens", "vocab": 32000}, "vocab": 32000}
    mods = sorted(k for k in comps if k.startswith("mod"))
    tasks: list[dict[str, Any]] = []
    for t in range(num_tasks):
        stages: list[dict[str, Any]]
        loss: dict[str, Any]
        batch = rng.choice((32, 64, 128, 256))
        shape = rng.choice(("pair", "pair", "seq2seq", "llm"))
        if shape == "pair":
            a, b = rng.sample(mods, 2)
            stages = [{"name": "a", "component": a, "tokens": rng.choice((77, 197, 257))},
                      {"name": "b", "component": b, "tokens": rng.choice((77, 197, 257))}]
            loss = {"type": "contrastive", "inputs": ["a", "b"]}
        elif shape == "seq2seq":
            a = rng.choice(mods)
            stages = [
                {"name": "adaptor", "component": a, "tokens": rng.choice((64, 197, 257))},
                {"name": "encode", "component": "lm_encoder", "tokens": rng.choice((16, 64, 128)),
                 "inputs": ["adaptor"]},
                {"name": "decode", "component": "lm_decoder", "tokens": rng.choice((16, 32, 64)),
                 "memory": "encode"},
            ]
            loss = {"type": "lm", "stage": "decode"}
        else:
            picked = rng.sample(mods, rng.choice((1, 2)))
            stages = [{"name": f"enc{j}", "component": c, "tokens": rng.choice((197, 257, 512)),
                       "pool_to": 64} for j, c in enumerate(picked)]
            stages.append({"name": "lm", "component": "llm", "tokens": rng.choice((64, 128)),
                           "inputs": [s["name"] for s in stages]})
            loss = {"type": "lm", "stage": "lm"}
        tasks.append({"name": f"task{t}-{shape}", "batch_size": batch, "stages": stages,
                      "loss": loss})
    used = {s["component"] for task in tasks for s in task["stages"]}
    return workload_from_dict(
        {"name": f"random-{num_tasks}-{seed}", "description": "synthetic (random_workload)",
         "components": {k: v for k, v in comps.items() if k in used}, "tasks": tasks},
        source=f"random_workload({num_tasks}, {seed})",
    )


def synthetic_graph(
    layers: list[int],
    deps: list[tuple[int, ...]] | None = None,
    batches: list[int] | None = None,
    tasks: list[str] | None = None,
) -> MetaGraph:
    """A MetaGraph of ``len(layers)`` MetaOps written directly: MetaOp i has ``layers[i]`` layers,
    batch ``batches[i]`` (default 64), depends on the earlier MetaOps ``deps[i]`` and belongs to
    task ``tasks[i]`` (default: one task per MetaOp).  Levels are BFS depths, as in
    :func:`spindle.costs.graph.contract`.  The graph has no workload (``graph.workload is None``); pair
    it with a :class:`spindle.costs.estimator.TableEstimator`."""
    count = len(layers)
    deps = deps if deps is not None else [()] * count
    batches = batches if batches is not None else [64] * count
    tasks = tasks if tasks is not None else [f"t{i}" for i in range(count)]
    if not len(deps) == len(batches) == len(tasks) == count:
        raise ValueError("layers, deps, batches and tasks need one entry per MetaOp")
    level: list[int] = []
    metaops: list[MetaOp] = []
    for i in range(count):
        if any(not 0 <= d < i for d in deps[i]):
            raise ValueError(f"MetaOp {i}: dependencies {deps[i]} must be earlier MetaOps")
        if layers[i] < 1:
            raise ValueError(f"MetaOp {i}: needs at least one layer")
        level.append(1 + max((level[d] for d in deps[i]), default=-1))
        refs = tuple(LayerRef(tasks[i], f"s{i}", f"c{i}", k) for k in range(layers[i]))
        metaops.append(MetaOp(
            id=i, name=f"{tasks[i]}/s{i}", task=tasks[i], kind="encoder", component=f"c{i}",
            layers=refs, batch=batches[i], tokens=16, memory_tokens=0, hidden=64, heads=1,
            ffn=256, deps=tuple(sorted(set(deps[i]))), level=level[i],
            out_elements_per_sample=16 * 64,
        ))
    return MetaGraph(None, metaops, [])  # type: ignore[arg-type]


def alpha_beta_estimator(
    graph: MetaGraph,
    max_devices: int,
    peak_flops: float = 312e12,
    efficiency: float = 0.5,
    overhead_s: float = 3e-4,
    allreduce_bytes_per_s: float = 100e9,
) -> TableEstimator:
    """A synthetic T_m(n) = a + w_m / n + c_m [n > 1] over the data-parallel counts (divisors of
    the batch): a a fixed per-layer overhead, w_m the layer's FLOPs at ``efficiency`` of
    ``peak_flops``, c_m a ring all-reduce of its bf16 gradients.  Not fitted to anything."""
    tables: dict[int, dict[int, float]] = {}
    sync: dict[int, dict[int, float]] = {}
    for m in graph.metaops:
        w = m.flops_per_layer / (peak_flops * efficiency)
        c = 4.0 * m.params_per_layer / allreduce_bytes_per_s
        counts = data_parallel_counts(m.batch, max_devices)
        tables[m.id] = {n: overhead_s + w / n + (c if n > 1 else 0.0) for n in counts}
        sync[m.id] = {n: (c if n > 1 else 0.0) for n in counts}
    return TableEstimator(tables, sync)
