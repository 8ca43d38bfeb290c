"""Fitted scalability estimator: the piecewise alpha-beta model T_m(n) of docs/method.md section 4.

For one layer of MetaOp m on n data-parallel devices:

    T_m(n) = a_k + b_k * c_m(n) + b'_k * w_m / n        for n in range k

with ``w_m`` the layer's forward + backward FLOPs over the whole batch (``op.cost.flops_per_layer``)
and ``c_m(n) = 2 (n - 1) / n * params * grad_bytes`` the bytes each device moves in the ring
all-reduce of the layer's gradients (0 at n = 1).

Ranges.  n = 1 is a range of its own (no all-reduce at all), then ``(2^(j-1), 2^j]``: per-device
sizes halve from one range to the next, which is where kernels change; the node size is added as
a boundary too (when it is not a power of two) so a range never mixes intra- and inter-node
rings.  The last range extends to infinity.

Fitting.  Each range gets non-negative coefficients by least squares on relative error
(``scipy.optimize.nnls`` on rows scaled by 1/t, columns normalised).  Note that c(n) is affine in
1/n, so inside one range the three features are linearly dependent: the function T is identified
by 2 points, its split into a / b / b' is not.  The all-reduce part is therefore fitted on its own
(a second fit on the sync points, whose only features are 1 and c(n)), not read off b.  A range
with fewer than 2 points of its own borrows the nearest point of another range at weight 1e-3:
its own point is still reproduced, the borrowed one only picks among the many exact solutions.
A range with no point at all takes the coefficients of the nearest fitted range below
it (above, if none is below), i.e. the model extrapolates.

Monotonicity.  The allocator needs T_m positive and non-increasing in n.  After the fit,
:class:`FittedEstimator` tabulates T over the valid counts (divisors of the batch) ascending and
takes a running minimum: a MetaOp never looks slower on more devices.  (Where the raw fit rises,
e.g. past a node boundary where the all-reduce turns inter-node, the table keeps the lower time
of the smaller count.)  ``compute_time(n)`` and ``sync_time(n)`` are the fitted parts at n itself
(compute = total fit - all-reduce fit, capped by ``time(n)``): where the running minimum did not
clip, ``time = compute_time + sync_time``; where it did, the simulator, which charges compute
and the real synchronisation separately, still sees the physics of n devices.

Point sources.  :class:`HardwarePoints` evaluates the analytic hardware model of
:mod:`spindle.costs.hardware`; :class:`ProfilePoints` reads measured points (``spindle profile``)
and
falls back to a hardware model for MetaOp signatures the profile lacks.
"""

from __future__ import annotations

import bisect
import logging
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
from scipy.optimize import nnls

from spindle.costs.estimator import data_parallel_counts
from spindle.costs.hardware import HardwareModel, load_hardware
from spindle.costs.profile import (
    Profile,
    ProfilePoint,
    Signature,
    load_profile,
    ring_factor,
)
from spindle.plan.contract import MetaOp

log = logging.getLogger(__name__)


BORROW_WEIGHT = 1e-3
MIN_RANGE_POINTS = 2  # the rank of the features inside one range
MIN_TIME_S = 1e-9


def signature(op: MetaOp) -> Signature:
    c = op.cost
    return (op.kind, c.hidden, c.heads, c.ffn, c.tokens, c.memory_tokens, op.batch)


def layer_grad_params(op: MetaOp) -> float:
    """Parameters whose gradients one layer of ``op`` all-reduces: the block's own, plus its
    share of the fused light parts (adapter, projection, LM head) spread evenly over the chain,
    as ``op.cost.flops_per_layer`` spreads their FLOPs.  A layer shared by several MetaOps (the text
    encoder of every text task, the LLM of every QWen-VAL task) is all-reduced once per
    iteration, not once per MetaOp, so each MetaOp is charged its 1/shared_by share."""
    own = op.cost.params_per_layer + op.cost.extra_params / max(op.num_layers, 1)
    return own * op.cost.grad_share / max(op.cost.shared_by, 1)


def _cache_key(op: MetaOp) -> tuple[Signature, float, float]:
    """Signature plus what the fused light parts add (two MetaOps of one signature can differ
    there, e.g. only one of them carries an LM head)."""
    return (signature(op), op.cost.flops_per_layer, layer_grad_params(op))


def default_uppers(max_n: int, devices_per_node: int | None = None) -> tuple[int, ...]:
    """Upper bounds of the ranges: 1, 2, 4, ... up to ``max_n`` (plus the node size)."""
    uppers = {1}
    p = 2
    while p < 2 * max(max_n, 1):
        uppers.add(p)
        p *= 2
    if devices_per_node is not None and 1 <= devices_per_node < max_n:
        uppers.add(devices_per_node)
    return tuple(sorted(uppers))


@dataclass(frozen=True)
class PiecewiseAlphaBeta:
    """T(n) = a_k + b_k * c(n) + b'_k * work / n on range k; ``uppers[k]`` is the largest n of
    range k (range k is ``(uppers[k-1], uppers[k]]``; the last range extends to infinity)."""

    work: float  # w_m: FLOPs of one layer, whole batch
    sync_bytes: float  # gradient bytes of one layer (before the ring factor)
    uppers: tuple[int, ...]
    coeffs: tuple[tuple[float, float, float], ...]  # (a, b, b') per range
    points: tuple[tuple[int, float], ...] = ()  # what it was fitted on
    fitted: tuple[bool, ...] = ()  # whether range k had points of its own

    def c(self, n: int) -> float:
        """All-reduce bytes each device sends at n devices: c_m(n)."""
        return ring_factor(n) * self.sync_bytes

    def range_index(self, n: int) -> int:
        return min(bisect.bisect_left(self.uppers, n), len(self.uppers) - 1)

    def __call__(self, n: int) -> float:
        if n < 1:
            raise ValueError(f"device count must be >= 1 (got {n})")
        a, b, bw = self.coeffs[self.range_index(n)]
        return max(a + b * self.c(n) + bw * self.work / n, MIN_TIME_S)

    def max_relative_error(self) -> float:
        """Largest |T(n) - t| / t over the points it was fitted on."""
        return max((abs(self(n) - t) / t for n, t in self.points), default=0.0)

    @classmethod
    def fit(
        cls,
        points: Sequence[tuple[int, float]],
        work: float,
        sync_bytes: float,
        uppers: Sequence[int] | None = None,
    ) -> "PiecewiseAlphaBeta":
        """Fit non-negative (a, b, b') per range to ``points`` = [(n, seconds), ...]."""
        pts = sorted((int(n), float(t)) for n, t in points)
        if not pts:
            raise ValueError("cannot fit a scalability model to no points")
        for n, t in pts:
            if n < 1 or not (t > 0) or not math.isfinite(t):
                raise ValueError(f"bad profile point n={n}, t={t}: need n >= 1 and 0 < t < inf")
        ups = tuple(sorted(set(uppers))) if uppers else default_uppers(pts[-1][0])
        model = cls(work, sync_bytes, ups, ((0.0, 0.0, 0.0),) * len(ups))
        ranges: list[list[tuple[int, float]]] = [[] for _ in ups]
        for n, t in pts:
            ranges[model.range_index(n)].append((n, t))

        coeffs: list[tuple[float, float, float] | None] = []
        for own in ranges:
            if not own:
                coeffs.append(None)
                continue
            rows = [(n, t, 1.0) for n, t in own]
            if len(own) < MIN_RANGE_POINTS:
                others = sorted(
                    (p for p in pts if p not in own),
                    key=lambda p: abs(math.log(p[0]) - math.log(own[0][0])),
                )
                rows += [(n, t, BORROW_WEIGHT) for n, t in others[: MIN_RANGE_POINTS - len(own)]]
            coeffs.append(model._solve(rows))
        fitted = tuple(c is not None for c in coeffs)
        filled: list[tuple[float, float, float]] = []
        for k in range(len(coeffs)):
            below = [coeffs[j] for j in range(k, -1, -1) if coeffs[j] is not None]
            above = [coeffs[j] for j in range(k, len(coeffs)) if coeffs[j] is not None]
            filled.append((below or above)[0])  # type: ignore[arg-type]
        return cls(work, sync_bytes, ups, tuple(filled), tuple(pts), fitted)

    def _solve(self, rows: list[tuple[int, float, float]]) -> tuple[float, float, float]:
        X = np.array([[1.0, self.c(n), self.work / n] for n, _, _ in rows])
        y = np.array([t for _, t, _ in rows])
        wt = np.array([w for _, _, w in rows]) / y  # relative error, borrowed rows down-weighted
        Xw, yw = X * wt[:, None], y * wt
        scale = np.abs(Xw).max(axis=0)
        scale[scale == 0] = 1.0
        sol, _ = nnls(Xw / scale, yw)
        a, b, bw = (sol / scale).tolist()
        return (a, b, bw)


# --- point sources -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SourcePoints:
    points: tuple[ProfilePoint, ...]
    grad_bytes: int
    origin: str  # "hardware:<name>" or "profile:<path>"


class PointSource(Protocol):
    def points(self, op: MetaOp, max_n: int) -> SourcePoints:
        """Points (n, compute, sync) for one layer of ``op`` at n <= ``max_n``."""
        ...


def sample_counts(batch: int, max_n: int) -> list[int]:
    """Where to sample the hardware model: 1, 2, 4, 8, ... and every divisor of the batch."""
    cap = max(1, min(batch, max_n))
    ns = {n for n in data_parallel_counts(batch, cap)}
    p = 1
    while p <= cap:
        ns.add(p)
        p *= 2
    return sorted(ns)


@dataclass(frozen=True)
class HardwarePoints:
    """Points from the analytic hardware model (:class:`spindle.costs.hardware.HardwareModel`)."""

    hw: HardwareModel

    def compute(self, op: MetaOp, n: int) -> float:
        return self.hw.compute_time(op.cost.flops_per_layer / n)

    def sync(self, op: MetaOp, n: int) -> float:
        return self.hw.allreduce_time(layer_grad_params(op) * self.hw.grad_bytes, n)

    def points(self, op: MetaOp, max_n: int) -> SourcePoints:
        ns = [1] if op.is_loss else sample_counts(op.batch, max_n)
        pts = tuple(ProfilePoint(n, self.compute(op, n), self.sync(op, n)) for n in ns)
        return SourcePoints(pts, self.hw.grad_bytes, f"hardware:{self.hw.name}")


@dataclass
class ProfilePoints:
    """Measured points from a ``spindle profile`` file; signatures it lacks fall back to the
    hardware model (logged once per signature).

    A ``chain`` entry (schema 3) is the MetaOp's whole chain of runtime operators timed and
    divided by its layers: the light parts (adapters, in-projections, positions, final norm,
    heads, losses) and the operator dispatch are in it, so its compute is used as is.  (Only a
    MetaOp whose light parts differ from those of the MetaOp timed for its signature, i.e. whose
    ``flops_per_layer`` differs from the entry's, is scaled by the FLOP ratio.)  A ``block``
    entry (schema 1, 2) timed the bare block of a signature: the measured compute is scaled by
    ``op.cost.flops_per_layer / block FLOPs`` (the light parts assumed to run at the block's speed).
    The sync part is the profile's measured all-reduce model applied to the layer's full
    gradient volume (:func:`layer_grad_params`)."""

    profile: Profile
    fallback: HardwareModel | None = None
    foreign: bool = False  # measured on another workload: said once, the fallbacks quietly
    _warned: set[Signature] = field(default_factory=set, repr=False)

    def points(self, op: MetaOp, max_n: int) -> SourcePoints:
        entry = self.profile.entry(signature(op))
        if entry is not None:
            scale = (op.cost.flops_per_layer / entry.flops_per_layer
                     if entry.flops_per_layer > 0 else 1.0)
            if getattr(entry, "measurement", "block") == "chain":
                if math.isclose(scale, 1.0, rel_tol=1e-9):
                    scale = 1.0  # the measured chain is this MetaOp's: as is
                else:
                    self._warn_once(op, f"light parts differ from the profiled chain of"
                                        f" {entry.metaops[0] if entry.metaops else '?'};"
                                        f" compute scaled by the FLOP ratio {scale:.3f}")
            nbytes = layer_grad_params(op) * self.profile.grad_bytes
            pts = tuple(
                ProfilePoint(
                    p.n, p.compute_s * scale, self.profile.collective.allreduce_time(nbytes, p.n)
                )
                for p in entry.points
                if p.n <= max_n or p.n == 1
            )
            top = max(p.n for p in entry.points)
            if not op.is_loss and top < max_n and data_parallel_counts(op.batch, max_n)[-1] > top:
                self._warn_once(
                    op, f"profile covers n <= {top}; larger n are extrapolated from the fit"
                )
            return SourcePoints(pts, self.profile.grad_bytes, f"profile:{self.profile.source}")
        if self.fallback is None:
            raise KeyError(
                f"profile {self.profile.source} has no entry for {op.name} {signature(op)}"
                           " and there is no hardware model to fall back to")
        self._warn_once(op, f"not in the profile; using hardware model '{self.fallback.name}'",
                        logging.INFO if self.foreign else logging.WARNING)
        return HardwarePoints(self.fallback).points(op, max_n)

    def _warn_once(self, op: MetaOp, msg: str, level: int = logging.INFO) -> None:
        sig = signature(op)
        if sig not in self._warned:
            self._warned.add(sig)
            log.log(level, "MetaOp %s %s: %s", op.name, sig, msg)


# --- the estimator -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FittedTable:
    """One signature's fit and its monotone table over the valid counts."""

    model: PiecewiseAlphaBeta  # total time
    sync_model: PiecewiseAlphaBeta  # the all-reduce part alone
    counts: tuple[int, ...]  # ascending valid n
    times: tuple[float, ...]  # running minimum of model(n)
    computes: tuple[float, ...]  # min(model(n) - sync_model(n), times), >= 0
    syncs: tuple[float, ...]  # sync_model(n), 0 at n = 1
    origin: str

    def index(self, n: int) -> int:
        """Index of the largest valid count <= n (under data parallelism, n devices can only
        use that many)."""
        if n < 1:
            raise ValueError(f"device count must be >= 1 (got {n})")
        return max(bisect.bisect_right(self.counts, n) - 1, 0)


class FittedEstimator:
    """The :class:`spindle.costs.estimator.Estimator` of the planner: piecewise alpha-beta fits of
    points from a :class:`PointSource`, cached per MetaOp signature, tabulated over the valid
    counts so that every ``time`` / ``compute_time`` after the first is a table lookup."""

    def __init__(
        self,
        source: PointSource,
        devices_per_node: int | None = None,
        max_devices: int | None = None,
        name: str = "",
    ) -> None:
        self.source = source
        self.devices_per_node = devices_per_node
        self.max_devices = max_devices
        self.name = name
        self._tables: dict[tuple[Signature, float, float], FittedTable] = {}

    def table(self, op: MetaOp) -> FittedTable:
        key = _cache_key(op)
        tab = self._tables.get(key)
        if tab is None:
            tab = self._fit(op)
            self._tables[key] = tab
        return tab

    def _fit(self, op: MetaOp) -> FittedTable:
        cap = op.batch if self.max_devices is None else min(op.batch, self.max_devices)
        sp = self.source.points(op, cap)
        sync_bytes = float(layer_grad_params(op) * sp.grad_bytes)
        counts = (1,) if op.is_loss else tuple(data_parallel_counts(op.batch, cap))
        top = max(counts[-1], max(p.n for p in sp.points))
        uppers = default_uppers(top, self.devices_per_node)
        work = op.cost.flops_per_layer
        model = PiecewiseAlphaBeta.fit([(p.n, p.total_s) for p in sp.points], work, sync_bytes,
                                       uppers)
        sync_pts = [(p.n, p.sync_s) for p in sp.points if p.sync_s > 0]
        if sync_pts:
            sync_model = PiecewiseAlphaBeta.fit(sync_pts, 0.0, sync_bytes, uppers)
        else:
            sync_model = PiecewiseAlphaBeta(0.0, sync_bytes, uppers,
                                            ((0.0, 0.0, 0.0),) * len(uppers))
        err = model.max_relative_error()
        if err > 0.05:
            log.warning("MetaOp %s: piecewise fit misses its points by up to %.1f%%", op.name,
                        100 * err)
        times: list[float] = []
        computes: list[float] = []
        syncs: list[float] = []
        for n in counts:
            raw = model(n)
            s = 0.0 if n == 1 or not sync_pts else min(sync_model(n), raw)
            t = min(raw, times[-1]) if times else raw  # running minimum: never slower on more n
            times.append(t)
            syncs.append(s)
            computes.append(max(min(raw - s, t), 0.0))
        return FittedTable(
            model, sync_model, counts, tuple(times), tuple(computes), tuple(syncs), sp.origin
        )

    # --- Estimator protocol ---------------------------------------------------------------------
    def time(self, op: MetaOp, n: int) -> float:
        tab = self.table(op)
        return tab.times[tab.index(n)]

    def compute_time(self, op: MetaOp, n: int) -> float:
        """The fitted time without the all-reduce part, at n itself (capped by ``time``)."""
        tab = self.table(op)
        return tab.computes[tab.index(n)]

    def sync_time(self, op: MetaOp, n: int) -> float:
        """The fitted gradient all-reduce part of one layer on n devices (0 at n = 1)."""
        tab = self.table(op)
        return tab.syncs[tab.index(n)]

    def valid_counts(self, op: MetaOp, num_devices: int) -> list[int]:
        if op.is_loss:
            return [1] if num_devices >= 1 else []
        return list(_dp_counts(op.batch, num_devices))


@lru_cache(maxsize=4096)
def _dp_counts(batch: int, num_devices: int) -> tuple[int, ...]:
    return tuple(data_parallel_counts(batch, num_devices))


def make_estimator(
    hardware: str | Path | HardwareModel,
    profile: str | Path | Profile | None = None,
    devices_per_node: int | None = None,
    workload_fingerprint: str | None = None,
) -> FittedEstimator:
    """The planner's estimator: the hardware model (a preset name, a YAML path or a model),
    replaced by measured points wherever ``profile`` (a file, or one already loaded) has an
    entry for a MetaOp's signature.  A profile measured on another workload than the one of
    ``workload_fingerprint`` is said once (its shared signatures are still used)."""
    hw = hardware if isinstance(hardware, HardwareModel) else load_hardware(hardware)
    if devices_per_node is not None and devices_per_node != hw.devices_per_node:
        hw = hw.with_devices_per_node(devices_per_node)
    source: PointSource
    name = hw.name
    if profile is not None:
        measured = load_profile(profile) if isinstance(profile, (str, Path)) else profile
        foreign = bool(workload_fingerprint and measured.workload_fingerprint
                       and measured.workload_fingerprint != workload_fingerprint)
        if foreign:
            log.warning("%s: measured on workload '%s', not this one: MetaOps of other shapes"
                        " use the hardware model", measured.source, measured.workload)
        source = ProfilePoints(measured, hw, foreign)
        name = f"{hw.name}+profile:{Path(measured.source).name}"
    else:
        source = HardwarePoints(hw)
    return FittedEstimator(source, devices_per_node=hw.devices_per_node, name=name)
