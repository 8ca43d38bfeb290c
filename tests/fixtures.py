"""Test fixtures: synthetic workloads, hand-written MetaGraphs and a stand-in estimator.

* :func:`random_workload`: multi-task workloads of any size (planning-time and placement
  checks; ``benchmarks/placement_bench.py`` uses it too);
* :func:`profile_args`: ``spindle profile``'s parsed arguments, :func:`valid_profile_dict` a
  profile file's content;
* :func:`synthetic_graph`: a MetaGraph written directly as layer counts, batches and
  dependencies (hand-written problems, brute force, property tests), with
  :func:`alpha_beta_estimator`, a T_m(n) that is not fitted to anything.
"""

from __future__ import annotations

import argparse
import random
from typing import Any

import torch

from spindle.costs.estimator import TableEstimator, data_parallel_counts
from spindle.costs.graph import MetaGraph
from spindle.costs.profile import PROFILE_SCHEMA_VERSION
from spindle.declare.workload import LayerRef, Workload, workload_from_dict
from spindle.layers import costmodel
from spindle.layers.blocks import Block
from spindle.plan.contract import MetaOp, OpCost
from spindle.tools.profile import add_profile_arguments

with torch.device("meta"):
    _LAYER_PARAMS = sum(p.numel() for p in Block("encoder", 64, 1, 256).parameters())


def _synthetic_cost(batch: int) -> OpCost:
    """One encoder layer of hidden 64, 1 head, ffn 256 on 16 tokens, over ``batch`` samples."""
    return OpCost(
        hidden=64, heads=1, ffn=256, tokens=16, memory_tokens=0,
        flops_per_layer=batch * costmodel.layer_train_flops("encoder", 64, 256, 16),
        params_per_layer=_LAYER_PARAMS, extra_params=0,
        act_elements_per_sample=16.0 * 64, out_elements_per_sample=16.0 * 64,
        saved_elements_per_sample_per_layer=costmodel.layer_activation_elements(
            "encoder", 64, 256, 1, 16),
    )


_ENCODER_SHAPES = ((384, 6), (512, 8), (768, 12), (1024, 16), (1280, 16))


def random_workload(num_tasks: int, seed: int = 0) -> Workload:
    """A synthetic multi-task workload of ``num_tasks`` tasks over shared components, mixing the
    three shapes of docs/method.md section 9: contrastive pairs of encoders (two levels), adaptor ->
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
    :func:`spindle.costs.graph.contract`.  The graph has no workload (``graph.workload is None``);
    pair
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
            batch=batches[i], level=level[i], deps=tuple(sorted(set(deps[i]))), layers=refs,
            cost=_synthetic_cost(batches[i]),
        ))
    return MetaGraph(None, None, metaops, [])  # type: ignore[arg-type]


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
        w = m.cost.flops_per_layer / (peak_flops * efficiency)
        c = 4.0 * m.cost.params_per_layer / allreduce_bytes_per_s
        counts = data_parallel_counts(m.batch, max_devices)
        tables[m.id] = {n: overhead_s + w / n + (c if n > 1 else 0.0) for n in counts}
        sync[m.id] = {n: (c if n > 1 else 0.0) for n in counts}
    return TableEstimator(tables, sync)


def profile_args(*argv: str) -> argparse.Namespace:
    """``spindle profile ARGV``'s parsed arguments."""
    parser = argparse.ArgumentParser()
    add_profile_arguments(parser)
    return parser.parse_args(list(argv))


def valid_profile_dict() -> dict[str, Any]:
    """A valid profile file's JSON object, of a workload "w" with one encoder signature."""
    return {
        "schema_version": PROFILE_SCHEMA_VERSION, "kind": "spindle-profile", "workload": "w",
        "devices": 2, "repeats": 3, "threads_per_device": 1, "dtype": "float32", "grad_bytes": 4,
        "torch_version": "2.x", "machine": {"cpu": "x"},
        "collective": {"backend": "gloo", "processes": 2, "latency_s": 1e-4, "bandwidth_Bps": 1e9},
        "entries": [{
            "signature": {"kind": "encoder", "hidden": 32, "heads": 4, "ffn": 128, "tokens": 9,
                          "memory_tokens": 0, "batch": 8},
            "params_per_layer": 12704, "flops_per_layer": 1e6,
            "points": [{"n": 1, "compute_s": 1e-3, "sync_s": 0.0},
                       {"n": 2, "compute_s": 6e-4, "sync_s": 2e-4}],
        }],
    }
