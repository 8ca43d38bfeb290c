"""Hardware model: per-device compute and collective speed of a GPU (or CPU) cluster.

The figures live in a data file (``spindle/costs/hardware.yaml``), one preset per machine kind,
every constant written beside its published source (or marked as our assumption / a
placeholder).  :func:`load_hardware` reads a shipped preset by name or any YAML file of the same
shape, validates it, and returns a :class:`HardwareModel`, which answers three questions for
the scalability estimator: how long one layer call of ``w`` FLOPs computes on one device, how
long the ring all-reduce of ``b`` gradient bytes over ``n`` devices takes, and how big a device
and a node are.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from spindle.validation import format_validation_error, read_user_file

HARDWARE_FILE = Path(__file__).parent / "hardware.yaml"


class HardwareError(ValueError):
    """A hardware description that cannot be used; the message is one line naming the problem."""


@dataclass(frozen=True)
class HardwareModel:
    """One device kind and its interconnect (SI units: FLOP/s, bytes, bytes/s, seconds).

    ``eff(w) = max_efficiency * w / (w + efficiency_half_work_flops)`` is the fraction of
    ``peak_flops`` a layer call reaches when one device does ``w`` FLOPs of it; so
    ``w / (peak * eff(w)) = (w + w_half) / (peak * max_efficiency)``: the efficiency drop of small
    calls is the same as a fixed extra time of ``w_half / (peak * max_efficiency)`` per call.
    """

    name: str
    description: str
    peak_flops: float
    max_efficiency: float
    efficiency_half_work_flops: float
    layer_overhead_s: float
    intra_node_bandwidth: float
    inter_node_bandwidth: float
    intra_node_latency_s: float
    inter_node_latency_s: float
    memory_bytes: int
    devices_per_node: int
    grad_bytes: int
    # AdamW step (optional: 0 = not modelled): memory-bound, bytes moved per parameter / bandwidth
    memory_bandwidth: float = 0.0
    optimizer_bytes_per_param: float = 0.0
    # how much of the gradient sync that the runtime starts under the remaining backward waves
    # really runs alongside them (1: all of it, as NCCL on its own stream; 0: none, as gloo
    # sharing the CPU cores with the compute)
    sync_overlap: float = 0.0
    sources: dict[str, str] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def efficiency(self, work_flops: float) -> float:
        """Fraction of peak reached by a layer call doing ``work_flops`` FLOPs on one device."""
        if work_flops <= 0:
            return 0.0
        return self.max_efficiency * work_flops / (work_flops + self.efficiency_half_work_flops)

    def compute_time(self, work_flops: float) -> float:
        """Seconds for one layer call of ``work_flops`` FLOPs on one device (fwd + bwd)."""
        w = max(work_flops, 0.0)
        return self.layer_overhead_s + (w + self.efficiency_half_work_flops) / (
            self.peak_flops * self.max_efficiency
        )

    def bandwidth(self, n: int) -> float:
        """Bus bandwidth of a ring over ``n`` devices (intra-node if it fits in one node)."""
        inside = n <= self.devices_per_node
        return self.intra_node_bandwidth if inside else self.inter_node_bandwidth

    def latency(self, n: int) -> float:
        inside = n <= self.devices_per_node
        return self.intra_node_latency_s if inside else self.inter_node_latency_s

    def allreduce_time(self, nbytes: float, n: int) -> float:
        """Ring all-reduce of ``nbytes`` over ``n`` devices: 0 at n = 1, else
        latency + 2 (n - 1) / n * nbytes / bandwidth."""
        if n <= 1 or nbytes <= 0:
            return 0.0
        return self.latency(n) + 2.0 * (n - 1) / n * nbytes / self.bandwidth(n)

    def optimizer_time(self, params: float) -> float:
        """Seconds of one AdamW step over ``params`` parameters on one device: the optimizer is
        memory-bound, so ``params * optimizer_bytes_per_param / memory_bandwidth`` (0 when the
        preset gives no memory bandwidth)."""
        if self.memory_bandwidth <= 0 or params <= 0:
            return 0.0
        return params * self.optimizer_bytes_per_param / self.memory_bandwidth

    def with_devices_per_node(self, devices_per_node: int) -> "HardwareModel":
        if devices_per_node < 1:
            raise HardwareError(
                f"{self.name}: devices_per_node must be >= 1 (got {devices_per_node})")
        return dataclasses.replace(self, devices_per_node=devices_per_node)


# --- validation --------------------------------------------------------------------------------


class _Sourced(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    source: str = Field(min_length=1, description="published source, or 'ASSUMPTION ...'")


class _PositiveFloat(_Sourced):
    value: float = Field(gt=0, allow_inf_nan=False)


class _NonNegFloat(_Sourced):
    value: float = Field(ge=0, allow_inf_nan=False)


class _Fraction(_Sourced):
    value: float = Field(gt=0, le=1)


class _UnitInterval(_Sourced):
    value: float = Field(ge=0, le=1)


class _PositiveInt(_Sourced):
    value: int = Field(gt=0)


class _HardwareSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = ""
    peak_flops: _PositiveFloat
    max_efficiency: _Fraction
    efficiency_half_work_flops: _NonNegFloat
    layer_overhead_s: _NonNegFloat
    intra_node_bandwidth: _PositiveFloat
    inter_node_bandwidth: _PositiveFloat
    intra_node_latency_s: _NonNegFloat
    inter_node_latency_s: _NonNegFloat
    memory_bytes: _PositiveInt
    devices_per_node: _PositiveInt
    grad_bytes: _PositiveInt
    memory_bandwidth: _PositiveFloat | None = None
    optimizer_bytes_per_param: _PositiveFloat | None = None
    sync_overlap: _UnitInterval | None = None


_SOURCED_FIELDS = tuple(f for f in _HardwareSpec.model_fields if f != "description")



def hardware_from_dict(name: str, data: Any, source: str = "<hardware>") -> HardwareModel:
    """Validate one preset's mapping (``{field: {value, source}}``) into a
    :class:`HardwareModel`."""
    if not isinstance(data, dict):
        raise HardwareError(f"{source}: {name}: expected a mapping of fields")
    try:
        spec = _HardwareSpec.model_validate(data)
    except ValidationError as err:
        raise HardwareError(format_validation_error(f"{source}: {name}", err)) from None
    present = [f for f in _SOURCED_FIELDS if getattr(spec, f) is not None]
    values = {f: getattr(spec, f).value for f in present}
    sources = {f: getattr(spec, f).source for f in present}
    return HardwareModel(name=name, description=spec.description, sources=sources, **values)


def _read_yaml(path: Path) -> Any:
    return read_user_file(path, "yaml", HardwareError)


def shipped_hardware() -> list[str]:
    """Names of the presets in the shipped data file."""
    data = _read_yaml(HARDWARE_FILE)
    return sorted(data) if isinstance(data, dict) else []


def load_hardware(name_or_path: str | Path) -> HardwareModel:
    """A shipped preset by name (``a800``, ``h100``, ``cpu``), or a YAML file by path.

    A file may hold one preset (its fields at the top level; named after the file) or several
    presets keyed by name (then it must hold exactly one, or be given as ``path:name``)."""
    text = str(name_or_path)
    path = Path(text)
    if not path.exists():
        file_part, _, preset = text.rpartition(":")
        if file_part and Path(file_part).exists():
            return _load_from_file(Path(file_part), preset)
        data = _read_yaml(HARDWARE_FILE)
        if isinstance(data, dict) and text in data:
            return hardware_from_dict(text, data[text], str(HARDWARE_FILE))
        raise HardwareError(
            f"hardware '{text}': no such file and no shipped preset of that name"
            f" (shipped: {', '.join(shipped_hardware())})"
        )
    return _load_from_file(path, None)


def _load_from_file(path: Path, preset: str | None) -> HardwareModel:
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise HardwareError(f"{path}: expected a mapping at the top level")
    if preset is not None:
        if preset not in data:
            raise HardwareError(f"{path}: no preset '{preset}' (has: {', '.join(map(str, data))})")
        return hardware_from_dict(preset, data[preset], str(path))
    if "peak_flops" in data:  # a single preset at the top level
        return hardware_from_dict(path.stem, data, str(path))
    if len(data) == 1:
        (name, body), = data.items()
        return hardware_from_dict(str(name), body, str(path))
    raise HardwareError(
        f"{path}: holds {len(data)} presets ({', '.join(map(str, data))}); name one as PATH:NAME"
    )
