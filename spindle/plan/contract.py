"""The plan: the versioned, validated, JSON contract between every planner and the runtime.

A plan lists the MetaOps it covers, each with the costs the planner priced it by (so it can be
read, replayed, re-simulated and hand-written without the planner), and a sequence of *waves*.
A wave is a set of *slices* that run side by side on disjoint device groups; a slice runs layers
``[layer_start, layer_end)`` of one MetaOp on an ordered tuple of devices, data-parallel over
the MetaOp's batch (the row layout is :mod:`spindle.plan.layout`'s).  Waves run in order,
forward from first to last and backward from last to first; data moves only between waves.

The same :class:`Slice` and :class:`Wave` types describe a planner's waves before placement
(a slice has a device count ``n`` and no devices yet) and after (its ``devices``).

Every plan read from a file is checked (:mod:`spindle.plan.checks`).

Version 2 (this one) records each MetaOp's component and costs;
version 1 plans are refused in one line (re-plan with ``spindle plan``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from spindle.declare.workload import LayerRef
from spindle.io import write_atomic

PLAN_VERSION = 2
LOSS_KIND = "contrastive"


class PlanError(ValueError):
    """A plan that is malformed or inconsistent; the message is one line."""


@dataclass(frozen=True)
class OpCost:
    """What the cost models know of one layer of a MetaOp (the graph computes it from the
    layer providers; the runtime never reads it).  Per sample unless said otherwise."""

    hidden: int  # the layer's shape: with the MetaOp's kind and batch, its profile signature
    heads: int
    ffn: int
    tokens: int  # sequence length entering the layer
    memory_tokens: int  # cross-attention memory length (decoder), else 0
    flops_per_layer: float  # forward + backward over the whole batch, light parts spread evenly
    params_per_layer: int  # the layer's own parameters
    extra_params: int  # parameters of the light parts fused into the chain (adapters, heads)
    act_elements_per_sample: float  # passed from one layer to the next (hidden states, memory)
    out_elements_per_sample: float  # handed to each consumer after the last layer
    saved_elements_per_sample_per_layer: float  # kept for backward by one layer
    attention_elements_per_sample: float = 0.0  # of those, the attention scores (s x s)
    input_elements_per_sample: float = 0.0  # raw features the stage's first layer keeps
    logit_elements_per_sample: float = 0.0  # LM logits of the last layer (kept in fp32)
    shared_by: int = 1  # MetaOps (this one included) that run the same component's parameters
    grad_share: float = 1.0  # of the parameters above, the share that trains (0: frozen)


@dataclass(frozen=True)
class MetaOp:
    """A chain of ``num_layers`` identical layers on one task's data, with one T_m(n)."""

    id: int
    name: str
    task: str
    kind: str
    component: str  # "" for a contrastive loss
    batch: int
    level: int  # MetaLevel: longest path from a source in the MetaGraph
    deps: tuple[int, ...]
    layers: tuple[LayerRef, ...]
    cost: OpCost
    backward: bool = True  # False: frozen, nothing trainable before it; forward only, and no
    # gradient is sent back to it

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def is_loss(self) -> bool:
        return self.kind == LOSS_KIND


@dataclass(frozen=True)
class Slice:
    """An ASL tuple <n, s, l>: layers ``[layer_start, layer_end)`` of ``metaop`` on ``n``
    devices, taking ``time_s`` (= layers x T_m(n)) from the start of its wave.  Before
    placement it has a device ``count`` and no devices; after it, its ``devices`` in row order
    (and ``n`` is their number)."""

    metaop: int
    layer_start: int
    layer_end: int
    devices: tuple[int, ...] = ()
    time_s: float = 0.0
    count: int = 0  # the device count of a slice not placed yet

    def __post_init__(self) -> None:
        if self.n < 1:
            raise PlanError(f"slice of MetaOp {self.metaop}: no devices")

    @property
    def n(self) -> int:
        return len(self.devices) or self.count

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start

    def placed_on(self, devices: Sequence[int]) -> "Slice":
        """This slice on ``devices``."""
        return dataclasses.replace(self, devices=tuple(int(d) for d in devices), count=0)


@dataclass(frozen=True)
class Wave:
    """Slices that start together and run side by side; their n sum to at most N."""

    slices: tuple[Slice, ...]
    level: int | None = None  # the MetaLevel it was scheduled for, if any

    @property
    def duration_s(self) -> float:
        return max((s.time_s for s in self.slices), default=0.0)

    @property
    def devices_used(self) -> int:
        return sum(s.n for s in self.slices)


def schedule_length(waves: Sequence[Wave]) -> float:
    """Length of a wave schedule under the estimator: the sum of its wave durations."""
    return sum(w.duration_s for w in waves)


ZERO_STAGES = (0, 1, 2)  # none; AdamW state sharded; AdamW state and gradients sharded


@dataclass
class Plan:
    planner: str
    workload: str
    workload_fingerprint: str
    num_devices: int
    devices_per_node: int
    hardware: str
    metaops: tuple[MetaOp, ...]
    waves: tuple[Wave, ...]
    estimates: dict[str, float] = field(default_factory=dict)
    version: int = PLAN_VERSION
    # what the planner chose among its candidates (e.g. schedule, placement), for people to read;
    # the runtime executes the waves and never reads it
    choice: dict[str, str] = field(default_factory=dict)
    # the memory strategy: MetaOps whose activations the runtime recomputes in backward, and
    # MetaOp -> ZeRO stage (1: AdamW state sharded over each parameter's device group, 2: the
    # gradients too; :func:`spindle.plan.layout.zero_stages` says which parameters that shards)
    recompute: tuple[int, ...] = ()
    zero: dict[int, int] = field(default_factory=dict)

    @property
    def schedule_s(self) -> float:
        """Length of the wave schedule under the estimator (sum of wave durations)."""
        return schedule_length(self.waves)

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["zero"] = {str(k): v for k, v in sorted(self.zero.items())}  # JSON keys are strings
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | Path) -> None:
        """Write atomically: a temporary file in the same folder, then rename."""
        write_atomic(Path(path), self.to_json())

    @staticmethod
    def from_dict(d: dict[str, Any], source: str = "<plan>") -> "Plan":
        """Parse (not check: :func:`spindle.plan.checks.plan_from_dict` does both)."""
        try:
            if d.get("version") != PLAN_VERSION:
                raise PlanError(
                    f"{source}: plan version {d.get('version')!r} is not supported (this Spindle"
                    f" reads version {PLAN_VERSION}; make the plan again with `spindle plan`)"
                )
            metaops = tuple(
                MetaOp(
                    id=int(m["id"]), name=str(m["name"]), task=str(m["task"]),
                    kind=str(m["kind"]), component=str(m["component"]), batch=int(m["batch"]),
                    level=int(m["level"]), deps=tuple(int(x) for x in m["deps"]),
                    layers=tuple(LayerRef(str(r["task"]), str(r["stage"]), str(r["component"]),
                                          int(r["layer"])) for r in m["layers"]),
                    cost=_cost_from_dict(dict(m["cost"])),
                    backward=_strict_bool(m.get("backward", True), "backward"),
                )
                for m in d["metaops"]
            )
            waves = tuple(
                Wave(
                    slices=tuple(
                        Slice(int(s["metaop"]), int(s["layer_start"]), int(s["layer_end"]),
                              tuple(int(x) for x in s["devices"]), float(s.get("time_s", 0.0)))
                        for s in w["slices"]
                    ),
                    level=None if w.get("level") is None else int(w["level"]),
                )
                for w in d["waves"]
            )
            plan = Plan(
                planner=str(d["planner"]), workload=str(d["workload"]),
                workload_fingerprint=str(d["workload_fingerprint"]),
                num_devices=int(d["num_devices"]), devices_per_node=int(d["devices_per_node"]),
                hardware=str(d.get("hardware", "")), metaops=metaops, waves=waves,
                estimates={str(k): float(v) for k, v in dict(d.get("estimates", {})).items()},
                choice={str(k): str(v) for k, v in dict(d.get("choice", {})).items()},
                recompute=tuple(int(x) for x in d.get("recompute", ())),
                zero={int(k): int(v) for k, v in dict(d.get("zero", {})).items()},
            )
        except PlanError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            what = f"missing field {err}" if isinstance(err, KeyError) else str(err)
            raise PlanError(f"{source}: malformed plan: {what}") from None
        return plan


def _strict_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise PlanError(f"MetaOp field '{name}' is {value!r}, not true or false")
    return value


def _cost_from_dict(d: dict[str, Any]) -> OpCost:
    """An :class:`OpCost` from its JSON object (each field cast to its declared type)."""
    kinds = {f.name: (int if f.type == "int" else float) for f in dataclasses.fields(OpCost)}
    unknown = sorted(set(d) - set(kinds))
    if unknown:
        raise PlanError(f"unknown MetaOp cost field '{unknown[0]}'")
    return OpCost(**{k: kinds[k](v) for k, v in d.items()})  # type: ignore[arg-type]
