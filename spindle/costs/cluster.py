"""Cluster description: how many devices, how they are grouped into nodes, and their memory.

A :class:`Cluster` is a :class:`spindle.costs.hardware.HardwareModel` (one device kind and its
interconnect: device memory, intra-node (NVLink) and inter-node (InfiniBand) bandwidth and
latency, devices per node) together with a device count, plus the training precision, which the
memory model needs.  Every figure comes from the hardware preset (``spindle/costs/hardware.yaml``,
each constant beside its source) unless a cluster file overrides it; nothing is duplicated here.

Three ways to describe one, all ending in :func:`load_cluster`:

* a hardware preset and a size: ``load_cluster("a800", nodes=4)`` (32 devices),
  ``load_cluster("h100", num_devices=16)``, ``load_cluster("cpu", num_devices=2)``;
* a hardware YAML file (the shape :func:`spindle.costs.hardware.load_hardware` reads) and a size;
* a cluster YAML file that names a hardware preset (or file) and may override figures::

      hardware: a800            # preset name, or a hardware YAML path (relative to this file)
      nodes: 4                  # or num_devices: 32
      devices_per_node: 8       # optional overrides of the preset:
      device_memory_gib: 80
      intra_node_bandwidth_gb_s: 200
      inter_node_bandwidth_gb_s: 50
      inter_node_latency_us: 30
      precision: bf16-mixed     # or fp32 (default: fp32 on the cpu preset, else bf16-mixed)

The ``cpu`` preset's bandwidth and memory share are estimates (placeholders until measured by
``spindle profile``), as its data file says.  A node may be partly used: 12 devices of an 8-GPU
preset are one full node and a node of 4.  Every bad file, field or value raises
:class:`ClusterError` with one line naming the file, the field and the value.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from spindle.costs.hardware import HardwareError, HardwareModel, load_hardware
from spindle.costs.hardware import (
    _read_yaml as read_yaml,  # same YAML reading, one-line errors
)
from spindle.costs.memory import MemoryModel, memory_model_for
from spindle.plan.layout import SYNC_BUCKET_BYTES
from spindle.validation import format_validation_error

Precision = Literal["bf16-mixed", "fp32"]

GIB = 1024**3
MAX_DEVICES = 65_536  # planning is polynomial in the devices; beyond this its arrays grow large


class ClusterError(ValueError):
    """A cluster description that cannot be used; the message is one line."""


@dataclass(frozen=True)
class Cluster:
    """``num_devices`` devices of kind ``hardware``, ``devices_per_node`` to a node.

    Device ``d`` sits in node ``d // devices_per_node``.  ``hardware`` already carries any
    override of the cluster file, so the scalability estimator and the simulator read the same
    figures."""

    hardware: HardwareModel
    num_devices: int
    precision: Precision = "bf16-mixed"
    source: str = ""  # where the description came from: a preset name or a file

    def __post_init__(self) -> None:
        if self.num_devices < 1:
            raise ClusterError(f"{self.where}: num_devices must be >= 1 (got {self.num_devices})")
        if self.num_devices > MAX_DEVICES:
            raise ClusterError(f"{self.where}: {self.num_devices} devices: at most {MAX_DEVICES}"
                               " are planned")

    @property
    def where(self) -> str:
        return self.source or self.hardware.name

    @property
    def devices_per_node(self) -> int:
        return self.hardware.devices_per_node

    @property
    def num_nodes(self) -> int:
        return math.ceil(self.num_devices / self.devices_per_node)

    @property
    def memory_bytes(self) -> int:
        """Memory of one device (bytes)."""
        return self.hardware.memory_bytes

    def node(self, device: int) -> int:
        return device // self.devices_per_node

    def memory_model(self, zero: int = 0) -> MemoryModel:
        """Bytes per parameter and per activation element for this cluster's precision."""
        model = memory_model_for(self.precision, zero=zero)
        if self.hardware.name != "cpu":  # the layer-granular sync start and NCCL (CUDA)
            model = replace(model, gradient_in_flight_bytes=3.0 * SYNC_BUCKET_BYTES,
                            scatter_clone=False)
        return model

    def describe(self) -> str:
        return (
            f"{self.num_devices} x {self.hardware.name} ({self.num_nodes} node(s) of up to"
            f" {self.devices_per_node}), {self.memory_bytes / GIB:.0f} GiB per device,"
            f" {self.hardware.intra_node_bandwidth / 1e9:.0f} GB/s intra-node,"
            f" {self.hardware.inter_node_bandwidth / 1e9:.0f} GB/s inter-node, {self.precision}"
        )


def default_precision(hw: HardwareModel) -> Precision:
    """fp32 on the CPU preset (what the CPU runtime trains in), bf16 mixed precision otherwise."""
    return "fp32" if hw.name == "cpu" else "bf16-mixed"


def cluster_from_hardware(
    hw: HardwareModel,
    num_devices: int | None = None,
    nodes: int | None = None,
    devices_per_node: int | None = None,
    precision: Precision | None = None,
    source: str = "",
) -> Cluster:
    """A cluster of ``num_devices`` devices, or of ``nodes`` full nodes, of kind ``hw``.

    ``devices_per_node`` defaults to the preset's, capped at ``num_devices`` (so 2 devices of an
    8-GPU preset are one node of 2)."""
    where = source or hw.name
    if num_devices is None and nodes is None:
        raise ClusterError(f"{where}: give the number of devices or of nodes")
    for field_name, value in (("num_devices", num_devices), ("nodes", nodes),
                              ("devices_per_node", devices_per_node)):
        if value is not None and value < 1:
            raise ClusterError(f"{where}: {field_name} must be >= 1 (got {value})")
    dpn = devices_per_node or hw.devices_per_node
    if num_devices is None:
        num_devices = int(nodes) * dpn  # type: ignore[arg-type]
    elif nodes is not None and num_devices != nodes * dpn:
        raise ClusterError(
            f"{where}: {nodes} nodes x {dpn} devices is {nodes * dpn},"
            f" not num_devices {num_devices}"
        )
    if devices_per_node is None:
        dpn = min(dpn, num_devices)
    if dpn != hw.devices_per_node:
        hw = hw.with_devices_per_node(dpn)
    return Cluster(hw, num_devices, precision or default_precision(hw), source or hw.name)


class _ClusterFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    hardware: str = Field(min_length=1, description="hardware preset name or hardware YAML file")
    nodes: StrictInt | None = Field(default=None, gt=0)
    num_devices: StrictInt | None = Field(default=None, gt=0)
    devices_per_node: StrictInt | None = Field(default=None, gt=0)
    device_memory_gib: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    intra_node_bandwidth_gb_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    inter_node_bandwidth_gb_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    intra_node_latency_us: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    inter_node_latency_us: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    precision: Precision | None = None


def cluster_from_dict(
    data: Any, source: str = "<cluster>", base_dir: Path | None = None,
    num_devices: int | None = None, nodes: int | None = None,
) -> Cluster:
    """Validate a cluster file's mapping.  ``num_devices`` / ``nodes`` (e.g. from the command
    line) replace the file's own size when given."""
    if not isinstance(data, dict):
        raise ClusterError(f"{source}: expected a mapping at the top level")
    try:
        spec = _ClusterFile.model_validate(data)
    except ValidationError as err:
        raise ClusterError(format_validation_error(source, err)) from None
    hw_ref = spec.hardware
    if base_dir is not None and (base_dir / hw_ref).exists():
        hw_ref = str(base_dir / hw_ref)
    try:
        hw = load_hardware(hw_ref)
    except HardwareError as err:
        raise ClusterError(f"{source}: hardware: {err}") from None
    overrides: dict[str, float] = {}
    if spec.device_memory_gib is not None:
        overrides["memory_bytes"] = int(spec.device_memory_gib * GIB)
    if spec.intra_node_bandwidth_gb_s is not None:
        overrides["intra_node_bandwidth"] = spec.intra_node_bandwidth_gb_s * 1e9
    if spec.inter_node_bandwidth_gb_s is not None:
        overrides["inter_node_bandwidth"] = spec.inter_node_bandwidth_gb_s * 1e9
    if spec.intra_node_latency_us is not None:
        overrides["intra_node_latency_s"] = spec.intra_node_latency_us * 1e-6
    if spec.inter_node_latency_us is not None:
        overrides["inter_node_latency_s"] = spec.inter_node_latency_us * 1e-6
    if overrides:
        hw = dataclasses.replace(hw, **overrides)  # type: ignore[arg-type]
    if num_devices is None and nodes is None:
        num_devices, nodes = spec.num_devices, spec.nodes
    return cluster_from_hardware(hw, num_devices, nodes, spec.devices_per_node, spec.precision,
                                 source)


def load_cluster(
    spec: str | Path | HardwareModel,
    num_devices: int | None = None,
    nodes: int | None = None,
    devices_per_node: int | None = None,
    precision: Precision | None = None,
    device_memory_gib: float | None = None,
) -> Cluster:
    """A cluster from a hardware preset name, a hardware YAML file, a cluster YAML file (one with
    a top-level ``hardware`` key) or a :class:`HardwareModel`; sizes and memory given here (the
    command line) take precedence over the file's."""
    if isinstance(spec, HardwareModel):
        hw, source = spec, spec.name
    else:
        path = Path(str(spec))
        data = _read_yaml(path) if path.is_file() else None
        if isinstance(data, dict) and "hardware" in data:
            c = cluster_from_dict(data, str(path), path.parent, num_devices, nodes)
            if devices_per_node is not None or precision is not None:
                c = cluster_from_hardware(c.hardware, c.num_devices, None,
                                          devices_per_node or c.devices_per_node,
                                          precision or c.precision, c.source)
            return _with_memory(c, device_memory_gib)
        try:
            hw = load_hardware(spec)
        except HardwareError as err:
            raise ClusterError(str(err)) from None
        source = str(spec)
    if num_devices is None and nodes is None:
        nodes = 1
    return _with_memory(
        cluster_from_hardware(hw, num_devices, nodes, devices_per_node, precision, source),
        device_memory_gib,
    )


def _with_memory(c: Cluster, device_memory_gib: float | None) -> Cluster:
    if device_memory_gib is None:
        return c
    if not device_memory_gib > 0 or not math.isfinite(device_memory_gib):
        raise ClusterError(f"{c.where}: device_memory_gib must be > 0 (got {device_memory_gib})")
    hw = dataclasses.replace(c.hardware, memory_bytes=int(device_memory_gib * GIB))
    return dataclasses.replace(c, hardware=hw)


def _read_yaml(path: Path) -> Any:
    try:
        return read_yaml(path)
    except HardwareError as err:
        raise ClusterError(str(err)) from None


__all__ = ["Cluster", "ClusterError", "Precision", "cluster_from_hardware", "cluster_from_dict",
           "load_cluster", "default_precision"]
