"""The plan: the versioned, validated, JSON contract between every planner and the runtime.

A plan lists the MetaOps it covers (so it can be read, replayed and hand-written without the
planner) and a sequence of *waves*.  A wave is a set of *slices* that run side by side on
disjoint device groups; a slice runs layers ``[layer_start, layer_end)`` of one MetaOp on an
ordered tuple of devices, data-parallel over the MetaOp's batch (device ``k`` of the group holds
samples ``[k*B/n, (k+1)*B/n)``).  Waves run in order, forward from first to last and backward
from last to first; data moves only between waves.

:func:`validate_plan` checks, on every load: every layer of every MetaOp is scheduled exactly
once; devices are within ``num_devices`` and disjoint within a wave; every group size divides
its MetaOp's batch; and every dependency (the previous layers of the same MetaOp, the last layer
of every producer MetaOp) is scheduled in an earlier wave.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence, TypeVar

from spindle.costs.graph import LOSS_KIND, MetaGraph

PLAN_VERSION = 1
K = TypeVar("K")

# How the runtime buckets gradients for the parameter sync (spindle.runtime.param_groups), here so
# that the simulator models the same buckets without importing torch: a bucket holds at most
# SYNC_BUCKET_BYTES (DDP's bucket_cap_mb), and ends where the ready wave changes once it holds
# SYNC_MIN_BUCKET_BYTES (DDP's first bucket), so that syncing starts early in backward.
SYNC_BUCKET_BYTES = 25 * 1024 * 1024
SYNC_MIN_BUCKET_BYTES = 1024 * 1024


def sync_bucket_runs(
    items: Sequence[tuple[K, int, float]],
    bucket_bytes: float = SYNC_BUCKET_BYTES,
    min_bucket_bytes: float = SYNC_MIN_BUCKET_BYTES,
) -> list[list[K]]:
    """The sync-bucket rule, for the runtime and the simulator alike: one pool's parameters
    ``(key, ready_wave, nbytes)`` in launch order (descending ready wave, then name) are cut
    into buckets; a bucket ends before a parameter that would take it past ``bucket_bytes``,
    or, once it holds ``min_bucket_bytes``, before one with another ready wave."""
    buckets: list[list[K]] = []
    current: list[K] = []
    size = 0.0
    previous = 0
    for key, wave, nbytes in items:
        if current and (size + nbytes > bucket_bytes
                        or (size >= min_bucket_bytes and wave != previous)):
            buckets.append(current)
            current, size = [], 0.0
        current.append(key)
        size += nbytes
        previous = wave
    if current:
        buckets.append(current)
    return buckets


class PlanError(ValueError):
    """A plan that is malformed or inconsistent; the message is one line."""


@dataclass(frozen=True)
class PlanLayer:
    """One operator of a MetaOp: ``layer`` of ``component`` in ``stage`` of ``task``
    (``component == ""`` and ``stage == "loss"`` for a contrastive loss)."""

    task: str
    stage: str
    component: str
    layer: int


@dataclass(frozen=True)
class PlanMetaOp:
    id: int
    name: str
    task: str
    kind: str
    batch: int
    level: int
    deps: tuple[int, ...]
    layers: tuple[PlanLayer, ...]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def is_loss(self) -> bool:
        return self.kind == LOSS_KIND


class _HasIsLoss(Protocol):
    @property
    def is_loss(self) -> bool: ...


def executing_devices(metaop: _HasIsLoss, devices: tuple[int, ...]) -> tuple[int, ...]:
    """The devices that run a slice of ``metaop`` on group ``devices``: all of them, data
    parallel over the batch; or, for a contrastive loss, only the first, with the whole batch
    (its similarity matrix couples every pair of samples).  Simulator, memory model, placement
    and runtime all read this one rule."""
    return devices[:1] if metaop.is_loss else devices


@dataclass(frozen=True)
class Slice:
    """An ASL tuple placed on devices: layers [layer_start, layer_end) of ``metaop``."""

    metaop: int
    layer_start: int
    layer_end: int
    devices: tuple[int, ...]
    time_s: float = 0.0  # estimated compute time of the slice (layers x T_m(n))

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start

    @property
    def n(self) -> int:
        return len(self.devices)


@dataclass(frozen=True)
class Wave:
    slices: tuple[Slice, ...]
    level: int | None = None  # the MetaLevel it was scheduled for, if any

    @property
    def duration_s(self) -> float:
        return max((s.time_s for s in self.slices), default=0.0)

    @property
    def devices_used(self) -> int:
        return sum(s.n for s in self.slices)


@dataclass
class Plan:
    planner: str
    workload: str
    workload_fingerprint: str
    num_devices: int
    devices_per_node: int
    hardware: str
    metaops: tuple[PlanMetaOp, ...]
    waves: tuple[Wave, ...]
    estimates: dict[str, float] = field(default_factory=dict)
    version: int = PLAN_VERSION

    @property
    def schedule_s(self) -> float:
        """Length of the wave schedule under the estimator (sum of wave durations)."""
        return sum(w.duration_s for w in self.waves)

    def metaop(self, i: int) -> PlanMetaOp:
        return self.metaops[i]

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | Path) -> None:
        """Write atomically: a temporary file in the same folder, then rename."""
        write_atomic(Path(path), self.to_json())

    @staticmethod
    def from_dict(d: dict[str, Any], source: str = "<plan>") -> "Plan":
        try:
            if d.get("version") != PLAN_VERSION:
                raise PlanError(
                    f"{source}: plan version {d.get('version')!r} is not supported"
                    f" (this Spindle reads version {PLAN_VERSION})"
                )
            metaops = tuple(
                PlanMetaOp(
                    id=int(m["id"]), name=str(m["name"]), task=str(m["task"]), kind=str(m["kind"]),
                    batch=int(m["batch"]), level=int(m["level"]),
                    deps=tuple(int(x) for x in m["deps"]),
                    layers=tuple(PlanLayer(str(l["task"]), str(l["stage"]), str(l["component"]),
                                           int(l["layer"])) for l in m["layers"]),
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
            )
        except PlanError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            what = f"missing field {err}" if isinstance(err, KeyError) else str(err)
            raise PlanError(f"{source}: malformed plan: {what}") from None
        validate_plan(plan, source=source)
        return plan

    @staticmethod
    def load(path: str | Path) -> "Plan":
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            raise PlanError(f"{p}: plan file not found") from None
        except OSError as err:
            raise PlanError(f"{p}: cannot read plan: {err.strerror}") from None
        except json.JSONDecodeError as err:
            raise PlanError(f"{p}: malformed JSON: {err.msg} at line {err.lineno}") from None
        if not isinstance(data, dict):
            raise PlanError(f"{p}: malformed plan: expected a JSON object")
        return Plan.from_dict(data, str(p))


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode() if isinstance(text, str) else text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def row_range(batch: int, n: int, k: int) -> tuple[int, int]:
    """Rows of a batch of ``batch`` samples held by member ``k`` of a group of ``n`` devices."""
    per = batch // n
    return k * per, (k + 1) * per


def transfer_rows(
    src: tuple[int, ...], dst: tuple[int, ...], batch: int
) -> list[tuple[int, int, int, int]]:
    """How rows move from a group ``src`` to a group ``dst`` (each data-parallel over ``batch``):
    ``(src_device, dst_device, row_start, row_end)`` for every overlap of row ranges, including
    the overlaps where ``src_device == dst_device`` (a local copy).  Runtime and simulator both use
    this, so the bytes the simulator predicts are the bytes the runtime sends."""
    out: list[tuple[int, int, int, int]] = []
    for i, sd in enumerate(src):
        a0, a1 = row_range(batch, len(src), i)
        for j, dd in enumerate(dst):
            b0, b1 = row_range(batch, len(dst), j)
            lo, hi = max(a0, b0), min(a1, b1)
            if lo < hi:
                out.append((sd, dd, lo, hi))
    return out


def plan_metaops(graph: MetaGraph) -> tuple[PlanMetaOp, ...]:
    """The plan's record of the MetaGraph."""
    return tuple(
        PlanMetaOp(
            id=m.id, name=m.name, task=m.task, kind=m.kind, batch=m.batch, level=m.level,
            deps=m.deps,
            layers=tuple(PlanLayer(r.task, r.stage, r.component, r.layer) for r in m.layers),
        )
        for m in graph.metaops
    )


def validate_plan(plan: Plan, graph: MetaGraph | None = None, source: str = "<plan>") -> None:
    """Raise :class:`PlanError` unless ``plan`` is internally consistent (and matches ``graph``,
    when given).  See the module docstring for the rules."""
    where = source
    if plan.num_devices < 1:
        raise PlanError(f"{where}: num_devices {plan.num_devices} is below 1")
    if plan.devices_per_node < 1:
        raise PlanError(f"{where}: devices_per_node {plan.devices_per_node} is below 1")
    ids = [m.id for m in plan.metaops]
    if ids != list(range(len(ids))):
        raise PlanError(f"{where}: metaop ids must be 0..{len(ids) - 1} in order")
    if graph is not None:
        expected = plan_metaops(graph)
        if len(expected) != len(plan.metaops):
            raise PlanError(
                f"{where}: plan has {len(plan.metaops)} MetaOps, workload has {len(expected)}"
            )
        for got, exp in zip(plan.metaops, expected):
            if got != exp:
                raise PlanError(f"{where}: MetaOp {got.id} ('{got.name}') does not match the workload")
    for m in plan.metaops:
        for d in m.deps:
            if not 0 <= d < m.id:
                raise PlanError(f"{where}: MetaOp {m.id} depends on {d}, not an earlier MetaOp")
    # when each layer (metaop, layer) is computed: wave index
    done: dict[tuple[int, int], int] = {}
    for wi, wave in enumerate(plan.waves):
        used: set[int] = set()
        for s in wave.slices:
            tag = f"{where}: wave {wi}, slice of MetaOp {s.metaop}"
            if not 0 <= s.metaop < len(plan.metaops):
                raise PlanError(f"{tag}: no such MetaOp")
            m = plan.metaops[s.metaop]
            if not 0 <= s.layer_start < s.layer_end <= m.num_layers:
                raise PlanError(
                    f"{tag}: layers [{s.layer_start}, {s.layer_end}) outside 0..{m.num_layers}"
                )
            if not s.devices:
                raise PlanError(f"{tag}: no devices")
            for dev in s.devices:
                if not 0 <= dev < plan.num_devices:
                    raise PlanError(f"{tag}: device {dev} outside 0..{plan.num_devices - 1}")
                if dev in used:
                    raise PlanError(f"{tag}: device {dev} is used twice in the wave")
                used.add(dev)
            if m.batch % s.n:
                raise PlanError(f"{tag}: {s.n} devices do not divide batch {m.batch}")
            if s.time_s < 0:
                raise PlanError(f"{tag}: negative time {s.time_s}")
            for layer in range(s.layer_start, s.layer_end):
                if (s.metaop, layer) in done:
                    raise PlanError(f"{tag}: layer {layer} is scheduled twice")
            # dependencies must be complete in an earlier wave
            needs = (
                [(s.metaop, s.layer_start - 1)]
                if s.layer_start > 0
                else [(d, plan.metaops[d].num_layers - 1) for d in m.deps]
            )
            for need in needs:
                if done.get(need, wi) >= wi:
                    raise PlanError(
                        f"{tag}: needs layer {need[1]} of MetaOp {need[0]} from an earlier wave"
                    )
        for s in wave.slices:
            for layer in range(s.layer_start, s.layer_end):
                done[(s.metaop, layer)] = wi
    for m in plan.metaops:
        for layer in range(m.num_layers):
            if (m.id, layer) not in done:
                raise PlanError(f"{where}: layer {layer} of MetaOp {m.id} ('{m.name}') is never scheduled")
