"""Scalability estimator: T_m(n), the time of one layer of MetaOp m on n devices.

The planner sees MetaOps only through the :class:`Estimator` protocol: ``time(op, n)`` (seconds
for one layer, forward + backward, including the data-parallel gradient all-reduce of that layer
over its n devices) and ``valid_counts(op, num_devices)`` (the device counts the MetaOp may use).

:class:`TableEstimator` holds explicit per-MetaOp tables (hand-written problems, tests, brute
force).  The fitted piecewise alpha-beta estimator built from profile points or the hardware model
lives in :mod:`spindle.costs.scalability`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from spindle.plan.contract import MetaOp


@runtime_checkable
class Estimator(Protocol):
    def time(self, op: MetaOp, n: int) -> float:
        """Seconds for one layer of ``op`` on ``n`` devices (forward + backward + its DP sync)."""
        ...

    def compute_time(self, op: MetaOp, n: int) -> float:
        """Like :meth:`time` without the gradient all-reduce (what the simulator charges per
        wave; it adds the real parameter-group synchronisation separately)."""
        ...

    def valid_counts(self, op: MetaOp, num_devices: int) -> list[int]:
        """Ascending device counts ``op`` may run on, all within ``1..num_devices``."""
        ...


def data_parallel_counts(batch: int, num_devices: int, multiple_of: int = 1) -> list[int]:
    """Valid n under data parallelism, ascending: n <= ``num_devices`` divides the batch (and is
    a multiple of the tensor-parallel degree, when there is one).  The divisors are found in
    O(min(num_devices, sqrt(batch))) steps, so a huge batch or device count costs nothing."""
    found: set[int] = set()
    k = 1
    while k * k <= batch and k <= num_devices:
        if batch % k == 0:
            found.add(k)
            if batch // k <= num_devices:
                found.add(batch // k)
        k += 1
    # every divisor above sqrt(batch) is batch // k for a k found above (none can be <=
    # num_devices when the loop stopped at num_devices < sqrt(batch))
    return sorted(n for n in found if n % multiple_of == 0)


@dataclass
class TableEstimator:
    """Explicit T_m(n) per MetaOp id: ``tables[op.id][n] = seconds``; the keys are the valid n."""

    tables: dict[int, dict[int, float]]
    sync: dict[int, dict[int, float]] = field(default_factory=dict)

    def time(self, op: MetaOp, n: int) -> float:
        return self.tables[op.id][n]

    def compute_time(self, op: MetaOp, n: int) -> float:
        return self.tables[op.id][n] - self.sync.get(op.id, {}).get(n, 0.0)

    def valid_counts(self, op: MetaOp, num_devices: int) -> list[int]:
        return sorted(n for n in self.tables[op.id] if n <= num_devices)
