"""Device placement: map each wave's device groups onto concrete device ids.

:func:`place_naive` is the simple placement: within a wave, slices take consecutive device ids in
order, except that a slice whose MetaOp ran in the previous wave on a group of the same size
keeps those devices when they are free (its layers then continue without any transfer).
Topology- and memory-aware placement (SPINDLE.md section 7) builds on this.
"""

from __future__ import annotations

from spindle.plan import Slice, Wave
from spindle.schedule import WaveSpec


def place_naive(waves: list[WaveSpec], num_devices: int) -> list[Wave]:
    placed: list[Wave] = []
    last_devices: dict[int, tuple[int, ...]] = {}
    for spec in waves:
        if spec.devices_used > num_devices:
            raise ValueError(f"wave uses {spec.devices_used} devices, only {num_devices} exist")
        free = list(range(num_devices))
        chosen: dict[int, tuple[int, ...]] = {}
        # first, slices that can stay where their MetaOp already is
        for i, s in enumerate(spec.slices):
            prev = last_devices.get(s.metaop)
            if prev is not None and len(prev) == s.n and all(d in free for d in prev):
                chosen[i] = prev
                for d in prev:
                    free.remove(d)
        for i, s in enumerate(spec.slices):
            if i not in chosen:
                chosen[i] = tuple(free[: s.n])
                del free[: s.n]
        slices = tuple(
            Slice(s.metaop, s.layer_start, s.layer_end, chosen[i], s.time_s)
            for i, s in enumerate(spec.slices)
        )
        for s in slices:
            last_devices[s.metaop] = s.devices
        placed.append(Wave(slices=slices, level=spec.level))
    return placed
