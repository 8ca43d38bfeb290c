"""The profile file: measured T_m(n) points, collectives, optimizer and runtime calibration.

``spindle profile`` (:mod:`spindle.tools.profile`) measures; this module only holds the versioned
JSON format, its validation (one-line :class:`ProfileError` naming the file and field) and the
small models the simulator reads off a profile (all-reduce, point-to-point exchange, optimizer
phase).  It imports no torch, so planning with a profile stays cheap.

Schema versions: 1 has no P2P / optimizer measurement; 1 and 2 time bare blocks
(``measurement: block``); 1-3 have no runtime calibration.  All of them are read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from spindle.io import write_atomic
from spindle.validation import format_validation_error, read_user_file

log = logging.getLogger(__name__)

PROFILE_SCHEMA_VERSION = 4
READABLE_SCHEMA_VERSIONS = (1, 2, 3, 4)
MEASUREMENTS = ("block", "chain")
PROFILE_KIND = "spindle-profile"

Signature = tuple[str, int, int, int, int, int, int]
"""(kind, hidden, heads, ffn, tokens, memory_tokens, batch): what fixes a MetaOp's T(n)."""


def ring_factor(n: int) -> float:
    """Fraction of the message each device sends in a ring all-reduce: 2 (n - 1) / n."""
    return 2.0 * (n - 1) / n if n > 1 else 0.0


@dataclass(frozen=True)
class ProfilePoint:
    """One measured or modelled point: one layer on n devices (seconds)."""

    n: int
    compute_s: float
    sync_s: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.sync_s


class ProfileError(ValueError):
    """A profile that cannot be made or used; the message is one line naming the problem."""


# --- the profile file --------------------------------------------------------------------------


def interpolate_samples(
    samples: tuple[tuple[int, float], ...], nbytes: float, bandwidth: float
) -> float:
    """Measured time of a ``nbytes`` message: piecewise-linear between the measured sizes (gloo
    over loopback is not affine: it switches algorithms and buffer paths with the size), the
    smallest size's time below it, and the fitted ``bandwidth`` beyond the largest size."""
    pts = sorted(samples)
    if nbytes <= pts[0][0]:
        return pts[0][1]
    for (b0, t0), (b1, t1) in zip(pts, pts[1:]):
        if nbytes <= b1:
            return t0 + (t1 - t0) * (nbytes - b0) / (b1 - b0)
    b, t = pts[-1]
    return t + (nbytes - b) / bandwidth


@dataclass(frozen=True)
class CollectiveFit:
    """Measured all-reduce speed: ``latency_s + 2 (n - 1) / n * bytes / bandwidth`` (n > 1)."""

    backend: str
    processes: int
    latency_s: float
    bandwidth: float  # bus bandwidth, bytes/s
    samples: tuple[tuple[int, float], ...] = ()  # (message bytes, mean seconds)

    def allreduce_time(self, nbytes: float, n: int) -> float:
        if n <= 1 or nbytes <= 0:
            return 0.0
        return self.latency_s + ring_factor(n) * nbytes / self.bandwidth

    def measured_allreduce_time(self, nbytes: float, n: int) -> float:
        """The all-reduce time read off the measured samples (interpolated; on ``n`` devices at
        the message size with the same per-device ring traffic as on ``processes``); the fitted
        model when there are no samples."""
        if n <= 1 or nbytes <= 0:
            return 0.0
        if len(self.samples) < 2:
            return self.allreduce_time(nbytes, n)
        equiv = nbytes * ring_factor(n) / ring_factor(self.processes)
        bandwidth = self.bandwidth / ring_factor(self.processes)
        return interpolate_samples(self.samples, equiv, bandwidth)


@dataclass(frozen=True)
class P2PFit:
    """Measured point-to-point exchange: both processes ``batch_isend_irecv`` one send and one
    receive of ``bytes`` to each other (what the runtime does at a wave boundary between two
    ranks) in ``latency_s + bytes / bandwidth``."""

    backend: str
    latency_s: float
    bandwidth: float  # bytes/s, each direction
    samples: tuple[tuple[int, float], ...] = ()

    def exchange_time(self, nbytes: float) -> float:
        """Time of an exchange of ``nbytes`` each way, read off the measured samples
        (interpolated), or the fitted model when there are fewer than two."""
        if len(self.samples) < 2:
            return self.latency_s + max(nbytes, 0.0) / self.bandwidth
        return interpolate_samples(self.samples, max(nbytes, 0.0), self.bandwidth)


@dataclass(frozen=True)
class RuntimeCalibration:
    """What the runtime spends per wave beyond its slices' operator chains, measured by running
    it (:class:`spindle.runtime.executor.TrainingRun`, one process per device) on the workload's
    one-device ``sequential`` plan: its compute + send/recv phases per iteration (median), less
    the profile's own chain times of the same slices, per wave (floored at 0).  It is the cost
    of turning inputs into autograd leaves, collecting input gradients, the transmitter's visit
    of every wave boundary and the phase timers; the simulator adds it to every wave."""

    wave_overhead_s: float
    iteration_s: float  # measured compute + send/recv of the calibration plan (median)
    chains_s: float  # the same slices' chain times from the profile
    waves: int


@dataclass(frozen=True)
class OptimizerFit:
    """Measured optimizer phase of the runtime on one process (zero_grad, gradient clipping by
    the global norm, including its scalar all-reduce over the processes, and the
    ``torch.optim.AdamW(foreach=True)`` step): ``fixed_s + per_param_s * parameters``."""

    fixed_s: float
    per_param_s: float
    samples: tuple[tuple[int, float], ...] = ()  # (parameters, mean seconds)

    def step_time(self, params: float) -> float:
        if params <= 0:
            return 0.0
        return self.fixed_s + self.per_param_s * params


@dataclass(frozen=True)
class ProfileEntry:
    signature: Signature
    metaops: tuple[str, ...]  # MetaOp names that have this signature (for humans)
    params_per_layer: int
    flops_per_layer: float  # FLOPs per layer of what was timed (a chain: light parts included)
    points: tuple[ProfilePoint, ...]
    # "chain": the MetaOp's whole chain of runtime operators timed, divided by its layers (used
    # as is); "block": a bare block (versions 1, 2; scaled by the layer's FLOPs by the estimator)
    measurement: str = "block"


@dataclass
class Profile:
    """A measured profile: per-signature points ``(n, compute_s, sync_s)``."""

    workload: str
    workload_fingerprint: str
    devices: int
    repeats: int
    threads_per_device: int
    dtype: str
    grad_bytes: int
    torch_version: str
    machine: dict[str, Any]
    collective: CollectiveFit
    entries: dict[Signature, ProfileEntry]
    elapsed_s: float = 0.0
    source: str = "<memory>"
    schema_version: int = PROFILE_SCHEMA_VERSION
    p2p: P2PFit | None = None  # None in version-1 profiles
    optimizer: OptimizerFit | None = None  # None in version-1 profiles
    runtime: RuntimeCalibration | None = None  # None before version 4

    def entry(self, sig: Signature) -> ProfileEntry | None:
        return self.entries.get(sig)

    def to_dict(self) -> dict[str, Any]:
        c = self.collective
        return {
            "schema_version": self.schema_version,
            "kind": PROFILE_KIND,
            "workload": self.workload,
            "workload_fingerprint": self.workload_fingerprint,
            "devices": self.devices,
            "repeats": self.repeats,
            "threads_per_device": self.threads_per_device,
            "dtype": self.dtype,
            "grad_bytes": self.grad_bytes,
            "torch_version": self.torch_version,
            "machine": self.machine,
            "elapsed_s": self.elapsed_s,
            "collective": {
                "backend": c.backend, "processes": c.processes, "latency_s": c.latency_s,
                "bandwidth_Bps": c.bandwidth,
                "samples": [{"bytes": b, "seconds": s} for b, s in c.samples],
            },
            **({"p2p": {
                "backend": self.p2p.backend, "latency_s": self.p2p.latency_s,
                "bandwidth_Bps": self.p2p.bandwidth,
                "samples": [{"bytes": b, "seconds": s} for b, s in self.p2p.samples],
            }} if self.p2p is not None else {}),
            **({"optimizer": {
                "fixed_s": self.optimizer.fixed_s, "per_param_s": self.optimizer.per_param_s,
                "samples": [{"params": n, "seconds": s} for n, s in self.optimizer.samples],
            }} if self.optimizer is not None else {}),
            **({"runtime": dataclasses.asdict(self.runtime)} if self.runtime is not None else {}),
            "entries": [
                {
                    "signature": dict(zip(_SIG_FIELDS, e.signature)),
                    "metaops": list(e.metaops),
                    "params_per_layer": e.params_per_layer,
                    "flops_per_layer": e.flops_per_layer,
                    "measurement": e.measurement,
                    "points": [
                        {"n": p.n, "compute_s": p.compute_s, "sync_s": p.sync_s} for p in e.points
                    ],
                }
                for e in self.entries.values()
            ],
        }


_SIG_FIELDS = ("kind", "hidden", "heads", "ffn", "tokens", "memory_tokens", "batch")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _PointModel(_Strict):
    n: int = Field(ge=1)
    compute_s: float = Field(gt=0, allow_inf_nan=False)
    sync_s: float = Field(ge=0, allow_inf_nan=False)


class _SignatureModel(_Strict):
    kind: str = Field(min_length=1)
    hidden: int = Field(ge=1)
    heads: int = Field(ge=1)
    ffn: int = Field(ge=0)
    tokens: int = Field(ge=1)
    memory_tokens: int = Field(ge=0)
    batch: int = Field(ge=1)


class _EntryModel(_Strict):
    signature: _SignatureModel
    metaops: list[str] = []
    params_per_layer: int = Field(ge=0)
    flops_per_layer: float = Field(ge=0)  # 0: a loss FlopCounter sees no matmul in
    points: list[_PointModel] = Field(min_length=1)
    measurement: Literal["block", "chain"] = "block"

    @model_validator(mode="after")
    def _check(self) -> "_EntryModel":
        ns = [p.n for p in self.points]
        if len(set(ns)) != len(ns):
            raise ValueError(f"duplicate n in points {ns}")
        return self


class _SampleModel(_Strict):
    bytes: int = Field(ge=1)
    seconds: float = Field(gt=0)


class _CollectiveModel(_Strict):
    backend: str
    processes: int = Field(ge=2)
    latency_s: float = Field(ge=0, allow_inf_nan=False)
    bandwidth_Bps: float = Field(gt=0, allow_inf_nan=False)
    samples: list[_SampleModel] = []


class _P2PModel(_Strict):
    backend: str
    latency_s: float = Field(ge=0, allow_inf_nan=False)
    bandwidth_Bps: float = Field(gt=0, allow_inf_nan=False)
    samples: list[_SampleModel] = []


class _OptimizerSampleModel(_Strict):
    params: int = Field(ge=1)
    seconds: float = Field(gt=0)


class _OptimizerModel(_Strict):
    fixed_s: float = Field(ge=0, allow_inf_nan=False)
    per_param_s: float = Field(ge=0, allow_inf_nan=False)
    samples: list[_OptimizerSampleModel] = []


class _RuntimeModel(_Strict):
    wave_overhead_s: float = Field(ge=0, allow_inf_nan=False)
    iteration_s: float = Field(ge=0, allow_inf_nan=False)
    chains_s: float = Field(ge=0, allow_inf_nan=False)
    waves: int = Field(ge=1)


class _ProfileModel(_Strict):
    schema_version: int
    kind: Literal["spindle-profile"]
    workload: str
    workload_fingerprint: str = ""
    devices: int = Field(ge=1)
    repeats: int = Field(ge=1)
    threads_per_device: int = Field(ge=1)
    dtype: str
    grad_bytes: int = Field(ge=1)
    torch_version: str
    machine: dict[str, Any]
    elapsed_s: float = Field(default=0.0, ge=0)
    collective: _CollectiveModel
    p2p: _P2PModel | None = None
    optimizer: _OptimizerModel | None = None
    runtime: _RuntimeModel | None = None
    entries: list[_EntryModel]



def profile_from_dict(data: Any, source: str = "<profile>") -> Profile:
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: expected a JSON object at the top level")
    version = data.get("schema_version")
    if version not in READABLE_SCHEMA_VERSIONS:
        raise ProfileError(
            f"{source}: schema_version: unsupported profile version {version!r}"
            f" (this Spindle reads {', '.join(map(str, READABLE_SCHEMA_VERSIONS))});"
            " re-run `spindle profile`"
        )
    try:
        m = _ProfileModel.model_validate(data)
    except ValidationError as err:
        raise ProfileError(format_validation_error(source, err)) from None
    if m.p2p is None or m.optimizer is None:
        log.warning("%s: the profile (version %s) has no %s measurement; the simulator uses the"
                    " hardware preset's figures instead (re-run `spindle profile`)", source,
                    version, "P2P" if m.p2p is None else "optimizer")
    entries: dict[Signature, ProfileEntry] = {}
    for i, e in enumerate(m.entries):
        s = e.signature
        sig: Signature = (s.kind, s.hidden, s.heads, s.ffn, s.tokens, s.memory_tokens, s.batch)
        if sig in entries:
            raise ProfileError(f"{source}: entries.{i}.signature: duplicate signature {sig}")
        pts = tuple(sorted((ProfilePoint(p.n, p.compute_s, p.sync_s) for p in e.points),
                           key=lambda p: p.n))
        if e.measurement == "chain" and m.schema_version < 3:
            raise ProfileError(f"{source}: entries.{i}.measurement: 'chain' needs schema_version 3")
        entries[sig] = ProfileEntry(sig, tuple(e.metaops), e.params_per_layer, e.flops_per_layer,
                                    pts, e.measurement)
    c = m.collective
    return Profile(
        workload=m.workload, workload_fingerprint=m.workload_fingerprint, devices=m.devices,
        repeats=m.repeats, threads_per_device=m.threads_per_device, dtype=m.dtype,
        grad_bytes=m.grad_bytes, torch_version=m.torch_version, machine=dict(m.machine),
        collective=CollectiveFit(c.backend, c.processes, c.latency_s, c.bandwidth_Bps,
                                 tuple((s.bytes, s.seconds) for s in c.samples)),
        entries=entries, elapsed_s=m.elapsed_s, source=source, schema_version=m.schema_version,
        p2p=None if m.p2p is None else P2PFit(
            m.p2p.backend, m.p2p.latency_s, m.p2p.bandwidth_Bps,
            tuple((s.bytes, s.seconds) for s in m.p2p.samples)),
        optimizer=None if m.optimizer is None else OptimizerFit(
            m.optimizer.fixed_s, m.optimizer.per_param_s,
            tuple((s.params, s.seconds) for s in m.optimizer.samples)),
        runtime=None if m.runtime is None else RuntimeCalibration(**m.runtime.model_dump()),
    )


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile file written by ``spindle profile``."""
    p = Path(path)
    return profile_from_dict(read_user_file(p, "json", ProfileError), str(p))


def write_profile(profile: Profile, path: str | Path) -> None:
    write_atomic(Path(path), json.dumps(profile.to_dict(), indent=1) + "\n")
