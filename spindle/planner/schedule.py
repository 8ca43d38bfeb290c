"""Unplaced schedules: what every planner produces before device placement.

A planner (Spindle's wavefront scheduler or a baseline) decides, for each wave, which MetaOp
slices run and on how many devices; :mod:`spindle.planner.placement` then picks the concrete devices and
the result becomes a :class:`spindle.plan.contract.Plan`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SliceSpec:
    """An ASL tuple <n, s, l> before placement: layers [layer_start, layer_end) of ``metaop`` on
    ``n`` devices, taking ``time_s`` (= layers x T_m(n)) from the start of its wave."""

    metaop: int
    layer_start: int
    layer_end: int
    n: int
    time_s: float

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start


@dataclass(frozen=True)
class WaveSpec:
    """Slices that start together and run side by side; their n sum to at most N."""

    slices: tuple[SliceSpec, ...]
    level: int | None = None

    @property
    def duration_s(self) -> float:
        return max((s.time_s for s in self.slices), default=0.0)

    @property
    def devices_used(self) -> int:
        return sum(s.n for s in self.slices)


def schedule_length(waves: list[WaveSpec]) -> float:
    return sum(w.duration_s for w in waves)
