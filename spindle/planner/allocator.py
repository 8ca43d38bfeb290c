"""Resource allocator for one MetaLevel: the relaxed optimum C* and its bi-point ASL tuples.

docs/method.md section 5.  For a set of MetaOps that do not depend on each other, the continuous
relaxation (real device counts n, real layer counts) is solved exactly: every MetaOp starts at 0
and ends at C*, with ``L_m * T_m(n*_m) = C*`` and ``sum_m n*_m = N``.  ``T_m`` between two valid
device counts is interpolated linearly, and inverting it at ``C / L_m`` gives the real n a MetaOp
needs to finish by C.  ``sum_m n_m(C)`` is continuous and non-increasing in C, so C* is where it
crosses N; we find it exactly (a search over the breakpoints ``L_m * T_m(n)`` followed by a
closed-form solve inside the bracketing segment) instead of by plain bisection, because the
scheduler re-solves the relaxation for every wave.

Conventions (the edge cases):

* Only the *useful* valid counts are kept: a valid n whose time is not strictly below the time of
  every smaller valid n is never worth its devices, so the curve is the non-increasing Pareto
  frontier of ``(n, T_m(n))``.  Non-positive or non-finite times are an :class:`AllocationError`.
* Below the smallest useful count n_0 (e.g. fewer devices than MetaOps), a real allocation
  ``n < n_0`` means *time sharing*: the MetaOp runs on n_0 devices for the share ``n / n_0`` of
  the time, so ``n(C) = n_0 * T_m(n_0) * L_m / C``.  Its bi-point pair is ``<n_0, L_m>`` and the
  dummy ``<0, .>`` tuple, which is dropped: the MetaOp finishes before C*.
* A candidate ``C < L_m * T_m(n_max)`` cannot be met by MetaOp m at all (``n(C) = inf``), so C* is
  never below ``max_m L_m * T_m(n_max)``; when even that C leaves devices over (the MetaOps cannot
  use N devices between them) C* is that bound and ``sum n*_m < N``.
* A MetaOp with no valid n within N is an :class:`AllocationError`.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from spindle.costs.estimator import Estimator
from spindle.plan.contract import MetaOp

log = logging.getLogger(__name__)

_REL_EPS = 1e-9


class AllocationError(ValueError):
    """A MetaLevel the allocator cannot serve; the message is one line."""


@dataclass(frozen=True)
class ScalingCurve:
    """The useful valid device counts of one MetaOp and their per-layer times, with T_m
    interpolated linearly in between (``counts`` ascending, ``times`` strictly descending)."""

    metaop: int
    counts: tuple[int, ...]
    times: tuple[float, ...]

    @staticmethod
    def of(op: MetaOp, estimator: Estimator, num_devices: int) -> ScalingCurve:
        valid = estimator.valid_counts(op, num_devices)
        if not valid:
            raise AllocationError(
                f"MetaOp {op.id} ('{op.name}') has no valid device count within {num_devices}"
                " devices"
            )
        counts: list[int] = []
        times: list[float] = []
        for n in sorted(valid):
            t = float(estimator.time(op, n))
            if not math.isfinite(t) or t <= 0.0:
                raise AllocationError(
                    f"MetaOp {op.id} ('{op.name}'): time on {n} devices is {t}, expected > 0"
                )
            if not times or t < times[-1] * (1.0 - _REL_EPS):
                counts.append(n)
                times.append(t)
        return ScalingCurve(op.id, tuple(counts), tuple(times))

    @property
    def n_min(self) -> int:
        return self.counts[0]

    @property
    def n_max(self) -> int:
        return self.counts[-1]

    def at(self, n: int) -> float:
        """T(n) at a useful count ``n`` exactly as the estimator gave it."""
        i = bisect.bisect_left(self.counts, n)
        if i == len(self.counts) or self.counts[i] != n:
            raise KeyError(f"{n} is not a useful device count of MetaOp {self.metaop}")
        return self.times[i]

    def time(self, n: float) -> float:
        """Interpolated per-layer time on a real number of devices ``n`` (time sharing below
        ``n_min``; ``n`` above ``n_max`` gives ``T(n_max)``)."""
        c, t = self.counts, self.times
        if n <= c[0]:
            return t[0] * c[0] / n if n > 0 else math.inf
        if n >= c[-1]:
            return t[-1]
        i = bisect.bisect_right(c, n) - 1
        f = (n - c[i]) / (c[i + 1] - c[i])
        return t[i] + f * (t[i + 1] - t[i])

    def devices_for(self, per_layer_s: float) -> float:
        """The real n at which the interpolated T equals ``per_layer_s`` (``inf`` when even
        ``n_max`` is slower)."""
        c, t = self.counts, self.times
        if per_layer_s >= t[0]:
            return c[0] * t[0] / per_layer_s
        if per_layer_s < t[-1] * (1.0 - _REL_EPS):
            return math.inf
        if per_layer_s <= t[-1]:
            return float(c[-1])
        # times are descending: find i with t[i] > per_layer_s >= t[i+1]
        lo, hi = 0, len(t) - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if t[mid] > per_layer_s:
                lo = mid
            else:
                hi = mid
        f = (t[lo] - per_layer_s) / (t[lo] - t[hi])
        return c[lo] + f * (c[hi] - c[lo])


@dataclass(frozen=True)
class ASLTuple:
    """<n, s, l>: ``layers`` consecutive layers of ``metaop`` on ``n`` devices from ``start_s``."""

    metaop: int
    n: int
    start_s: float
    layers: int


@dataclass
class LevelAllocation:
    """The relaxed optimum of one MetaLevel and its bi-point discretisation."""

    c_star: float
    n_star: dict[int, float]
    layers: dict[int, int]
    tuples: dict[int, tuple[ASLTuple, ...]] = field(default_factory=dict)
    num_devices: int = 0

    @property
    def devices_used(self) -> float:
        return sum(self.n_star.values())


def scaling_curves(
    metaops: list[MetaOp], estimator: Estimator, num_devices: int
) -> dict[int, ScalingCurve]:
    return {m.id: ScalingCurve.of(m, estimator, num_devices) for m in metaops}


def relaxed_optimum(
    curves: list[ScalingCurve], layers: list[int], num_devices: int
) -> tuple[float, list[float]]:
    """C* and the real n*_m of the continuous relaxation for MetaOps with these curves and layer
    counts on ``num_devices`` devices (all layer counts must be >= 1)."""
    if num_devices < 1:
        raise AllocationError(f"num_devices {num_devices} is below 1")
    if not curves:
        return 0.0, []
    if any(nl < 1 for nl in layers):
        raise AllocationError("every MetaOp in a relaxation needs at least one layer")
    N = float(num_devices)

    def demand(c: float) -> float:
        return sum(cv.devices_for(c / nl) for cv, nl in zip(curves, layers, strict=True))

    c_lo = max(cv.times[-1] * nl for cv, nl in zip(curves, layers, strict=True))
    if demand(c_lo) <= N * (1.0 + _REL_EPS):
        c_star = c_lo
    else:
        c_star = _solve_between_breakpoints(curves, layers, N, c_lo, demand)
    pairs = list(zip(curves, layers, strict=True))
    n_star = [_snap(cv, cv.devices_for(c_star / nl)) for cv, nl in pairs]
    return c_star, n_star


def _snap(curve: ScalingCurve, n: float) -> float:
    """``n`` capped at n_max, and exactly a valid count when rounding error is all that keeps
    it off one."""
    n = min(float(curve.n_max), n)
    i = bisect.bisect_left(curve.counts, n)
    for c in curve.counts[max(0, i - 1): i + 1]:
        if abs(n - c) <= _REL_EPS * c:
            return float(c)
    return n


def _solve_between_breakpoints(
    curves: list[ScalingCurve],
    layers: list[int],
    N: float,
    c_lo: float,
    demand: Callable[[float], float],
) -> float:
    """C with demand(C) = N, knowing demand(c_lo) > N.  demand is smooth between the breakpoints
    L_m * T_m(n): linear in C for MetaOps between two counts, K / C for time-shared ones."""
    pairs = list(zip(curves, layers, strict=True))
    bps = sorted({t * nl for cv, nl in pairs for t in cv.times if t * nl > c_lo})
    # find the first breakpoint whose demand is <= N; past the last one demand keeps falling as 1/C
    lo_c, hi_c = c_lo, math.inf
    a, b = 0, len(bps)
    while a < b:
        mid = (a + b) // 2
        if demand(bps[mid]) <= N:
            b = mid
        else:
            a = mid + 1
    if a > 0:
        lo_c = bps[a - 1]
    if a < len(bps):
        hi_c = bps[a]
    # inside (lo_c, hi_c) each MetaOp's n(C) is alpha + beta*C or K/C; sum and solve
    probe = lo_c * 1.5 if math.isinf(hi_c) else 0.5 * (lo_c + hi_c)
    A = B = K = 0.0
    for cv, nl in zip(curves, layers, strict=True):
        t = probe / nl
        c, tt = cv.counts, cv.times
        if t >= tt[0]:
            K += c[0] * tt[0] * nl
            continue
        i = max(j for j in range(len(tt) - 1) if tt[j] > t)  # tt[i] > t >= tt[i+1]
        slope = (c[i + 1] - c[i]) / (tt[i] - tt[i + 1])  # dn / d(-t)
        A += c[i] + slope * tt[i]
        B -= slope / nl
    # B*C^2 + (A - N)*C + K = 0 (B <= 0, K >= 0)
    root: float | None = None
    if abs(B) < 1e-300:
        if N - A > 0:
            root = K / (N - A)
    else:
        disc = (A - N) ** 2 - 4.0 * B * K
        if disc >= 0:
            s = math.sqrt(disc)
            cands = [(-(A - N) + s) / (2 * B), (-(A - N) - s) / (2 * B)]
            ok = [r for r in cands if lo_c * (1 - 1e-9) <= r <= hi_c * (1 + 1e-9)]
            if ok:
                root = ok[0]
    if root is not None:
        root = min(max(root, lo_c), hi_c)
        if abs(demand(root) - N) <= 1e-9 * N:  # guard against cancellation in the formula
            return root
    # numerical fallback: plain bisection inside the bracket
    lo: float = lo_c
    hi: float = hi_c if math.isfinite(hi_c) else max(lo_c * 2.0, 1e-300)
    while demand(hi) > N:
        hi *= 2.0
    for _ in range(200):
        mid_c = 0.5 * (lo + hi)
        if demand(mid_c) > N:
            lo = mid_c
        else:
            hi = mid_c
        if hi - lo <= 1e-13 * hi:
            break
    return hi


def bipoint(curve: ScalingCurve, n_star: float, num_layers: int) -> tuple[ASLTuple, ...]:
    """Bi-point discretisation of one MetaOp: ``<n_hi, 0, l_hi>`` then ``<n_lo, s, l_lo>`` with
    ``n_lo <= n* <= n_hi`` useful counts, ``l_hi + l_lo = L`` and
    ``T(n_hi) l_hi + T(n_lo) l_lo = C*`` (layer counts rounded, l = 0 tuples dropped)."""
    c = curve.counts
    if num_layers < 1:
        return ()
    if n_star <= c[0] * (1.0 + _REL_EPS):
        return (ASLTuple(curve.metaop, c[0], 0.0, num_layers),)  # n_lo would be the dummy 0
    if n_star >= c[-1] * (1.0 - _REL_EPS):
        return (ASLTuple(curve.metaop, c[-1], 0.0, num_layers),)
    i = bisect.bisect_right(c, n_star) - 1
    if abs(n_star - c[i]) <= _REL_EPS * c[i]:
        return (ASLTuple(curve.metaop, c[i], 0.0, num_layers),)
    if abs(c[i + 1] - n_star) <= _REL_EPS * c[i + 1]:
        return (ASLTuple(curve.metaop, c[i + 1], 0.0, num_layers),)
    n_lo, n_hi = c[i], c[i + 1]
    t_lo, t_hi = curve.times[i], curve.times[i + 1]
    target = num_layers * curve.time(n_star)  # = C* for a MetaOp strictly inside its range
    l_hi_real = (t_lo * num_layers - target) / (t_lo - t_hi)
    l_hi = min(num_layers, max(0, round(l_hi_real)))
    l_lo = num_layers - l_hi
    out: list[ASLTuple] = []
    if l_hi > 0:
        out.append(ASLTuple(curve.metaop, n_hi, 0.0, l_hi))
    if l_lo > 0:
        out.append(ASLTuple(curve.metaop, n_lo, l_hi * t_hi, l_lo))
    return tuple(out)


def allocate_level(
    metaops: list[MetaOp],
    estimator: Estimator,
    num_devices: int,
    layers: dict[int, int] | None = None,
    curves: dict[int, ScalingCurve] | None = None,
) -> LevelAllocation:
    """Relaxed optimum and bi-point ASL tuples for ``metaops`` (one MetaLevel, or any set of
    mutually independent MetaOps) on ``num_devices`` devices.  ``layers`` overrides the layer
    count per MetaOp id (e.g. the layers still to schedule); MetaOps with 0 layers are skipped."""
    if num_devices < 1:
        raise AllocationError(f"num_devices {num_devices} is below 1")
    lay = {m.id: (layers[m.id] if layers is not None and m.id in layers else m.num_layers)
           for m in metaops}
    ops = [m for m in metaops if lay[m.id] > 0]
    cvs = curves if curves is not None else scaling_curves(ops, estimator, num_devices)
    cl = [cvs[m.id] for m in ops]
    ll = [lay[m.id] for m in ops]
    c_star, n_star = relaxed_optimum(cl, ll, num_devices)
    alloc = LevelAllocation(
        c_star=c_star,
        n_star={m.id: n for m, n in zip(ops, n_star, strict=True)},
        layers={m.id: lay[m.id] for m in ops},
        num_devices=num_devices,
    )
    for m, cv, nl, n in zip(ops, cl, ll, n_star, strict=True):
        alloc.tuples[m.id] = bipoint(cv, n, nl)
    log.debug("level of %d MetaOps on %d devices: C* = %.6g s", len(ops), num_devices, c_star)
    return alloc
