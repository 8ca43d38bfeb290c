"""``spindle profile``: measure T_m(n) points of a workload's MetaOps with PyTorch on this machine.

For every distinct MetaOp signature (kind, hidden, heads, ffn, tokens, memory_tokens, batch) and
every valid device count n up to ``--devices``, one transformer block of that shape (a minimal,
self-contained block written here; a contrastive loss is a B x B similarity + cross entropy) runs
forward + backward at the per-device batch ``batch / n``: a few warm-up runs, then the median of
``--repeats`` timed runs is the point's ``compute_s``.  The gradient synchronisation is measured
once: gloo all-reduce over 2 local processes for a few message sizes, fitted as
``latency + bytes / bandwidth``; each point's ``sync_s`` is that model's ring all-reduce of the
block's own gradients over n devices (the estimator re-applies the measured collective model
to the layer's full gradient volume, light parts included).  The result is a versioned JSON profile, written atomically,
that :func:`spindle.scalability.make_estimator` fits instead of the hardware model.

Only this module imports torch (lazily), so loading a profile stays cheap.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from spindle import costmodel
from spindle.estimator import data_parallel_counts
from spindle.graph import MetaOp, contract
from spindle.plan import write_atomic
from spindle.validation import format_validation_error
from spindle.scalability import ProfilePoint, Signature, ring_factor, signature

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PROFILE_SCHEMA_VERSION = 1
PROFILE_KIND = "spindle-profile"
COLLECTIVE_SIZES = (4 * 1024, 64 * 1024, 256 * 1024, 1024 * 1024, 4 * 1024 * 1024)
DEFAULT_MAX_SECONDS = 300.0  # the paper profiles a model in under 5 minutes


class ProfileError(ValueError):
    """A profile that cannot be made or used; the message is one line naming the problem."""


# --- the profile file --------------------------------------------------------------------------


@dataclass(frozen=True)
class CollectiveFit:
    """Measured all-reduce speed: ``latency_s + 2 (n - 1) / n * bytes / bandwidth`` (n > 1)."""

    backend: str
    processes: int
    latency_s: float
    bandwidth: float  # bus bandwidth, bytes/s
    samples: tuple[tuple[int, float], ...] = ()  # (message bytes, median seconds)

    def allreduce_time(self, nbytes: float, n: int) -> float:
        if n <= 1 or nbytes <= 0:
            return 0.0
        return self.latency_s + ring_factor(n) * nbytes / self.bandwidth


@dataclass(frozen=True)
class ProfileEntry:
    signature: Signature
    metaops: tuple[str, ...]  # MetaOp names that have this signature (for humans)
    params_per_layer: int
    flops_per_layer: float
    points: tuple[ProfilePoint, ...]


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
            "entries": [
                {
                    "signature": dict(zip(_SIG_FIELDS, e.signature)),
                    "metaops": list(e.metaops),
                    "params_per_layer": e.params_per_layer,
                    "flops_per_layer": e.flops_per_layer,
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
    params_per_layer: int = Field(ge=1)
    flops_per_layer: float = Field(gt=0)
    points: list[_PointModel] = Field(min_length=1)

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
    entries: list[_EntryModel]



def profile_from_dict(data: Any, source: str = "<profile>") -> Profile:
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: expected a JSON object at the top level")
    version = data.get("schema_version")
    if version != PROFILE_SCHEMA_VERSION:
        raise ProfileError(
            f"{source}: schema_version: unsupported profile version {version!r}"
            f" (this Spindle reads {PROFILE_SCHEMA_VERSION}); re-run `spindle profile`"
        )
    try:
        m = _ProfileModel.model_validate(data)
    except ValidationError as err:
        raise ProfileError(format_validation_error(source, err)) from None
    entries: dict[Signature, ProfileEntry] = {}
    for i, e in enumerate(m.entries):
        s = e.signature
        sig: Signature = (s.kind, s.hidden, s.heads, s.ffn, s.tokens, s.memory_tokens, s.batch)
        if sig in entries:
            raise ProfileError(f"{source}: entries.{i}.signature: duplicate signature {sig}")
        pts = tuple(sorted((ProfilePoint(p.n, p.compute_s, p.sync_s) for p in e.points),
                           key=lambda p: p.n))
        entries[sig] = ProfileEntry(sig, tuple(e.metaops), e.params_per_layer, e.flops_per_layer, pts)
    c = m.collective
    return Profile(
        workload=m.workload, workload_fingerprint=m.workload_fingerprint, devices=m.devices,
        repeats=m.repeats, threads_per_device=m.threads_per_device, dtype=m.dtype,
        grad_bytes=m.grad_bytes, torch_version=m.torch_version, machine=dict(m.machine),
        collective=CollectiveFit(c.backend, c.processes, c.latency_s, c.bandwidth_Bps,
                                 tuple((s.bytes, s.seconds) for s in c.samples)),
        entries=entries, elapsed_s=m.elapsed_s, source=source, schema_version=m.schema_version,
    )


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile file written by ``spindle profile``."""
    p = Path(path)
    try:
        raw = p.read_text()
    except OSError as err:
        raise ProfileError(f"{p}: cannot read: {err.strerror}") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ProfileError(f"{p}: malformed JSON: {err.msg} (line {err.lineno})") from None
    return profile_from_dict(data, str(p))


def write_profile(profile: Profile, path: str | Path) -> None:
    write_atomic(Path(path), json.dumps(profile.to_dict(), indent=1) + "\n")


# --- the measured layers -----------------------------------------------------------------------


def build_block(kind: str, hidden: int, heads: int, ffn: int) -> "torch.nn.Module":
    """One block of the given shape, parameter-for-parameter the one
    :func:`spindle.costmodel.layer_parameters` counts: ``encoder`` (pre-LN self-attention +
    GELU MLP), ``decoder`` (causal self-attention + cross-attention + GELU MLP), ``llm`` (causal
    self-attention + SwiGLU, RMSNorm)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kind, self.heads = kind, heads
            norm = (lambda: nn.RMSNorm(hidden)) if kind == "llm" else (lambda: nn.LayerNorm(hidden))
            self.norm1, self.norm2 = norm(), norm()
            self.qkv = nn.Linear(hidden, 3 * hidden)
            self.proj = nn.Linear(hidden, hidden)
            if kind == "decoder":
                self.norm_c = nn.LayerNorm(hidden)
                self.q_c = nn.Linear(hidden, hidden)
                self.kv_c = nn.Linear(hidden, 2 * hidden)
                self.proj_c = nn.Linear(hidden, hidden)
            if kind == "llm":
                self.gate = nn.Linear(hidden, ffn, bias=False)
                self.up = nn.Linear(hidden, ffn, bias=False)
                self.down = nn.Linear(ffn, hidden, bias=False)
            else:
                self.fc1 = nn.Linear(hidden, ffn)
                self.fc2 = nn.Linear(ffn, hidden)

        def _split(self, t: torch.Tensor) -> torch.Tensor:
            b, s, h = t.shape
            return t.view(b, s, self.heads, h // self.heads).transpose(1, 2)

        def _merge(self, t: torch.Tensor) -> torch.Tensor:
            b, nh, s, d = t.shape
            return t.transpose(1, 2).reshape(b, s, nh * d)

        def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
            q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
            causal = self.kind in ("decoder", "llm")
            a = F.scaled_dot_product_attention(
                self._split(q), self._split(k), self._split(v), is_causal=causal
            )
            x = x + self.proj(self._merge(a))
            if self.kind == "decoder":
                assert memory is not None
                qc = self._split(self.q_c(self.norm_c(x)))
                kc, vc = self.kv_c(memory).chunk(2, dim=-1)
                a = F.scaled_dot_product_attention(qc, self._split(kc), self._split(vc))
                x = x + self.proj_c(self._merge(a))
            y = self.norm2(x)
            if self.kind == "llm":
                y = self.down(F.silu(self.gate(y)) * self.up(y))
            else:
                y = self.fc2(F.gelu(self.fc1(y)))
            return x + y

    return Block()


def _time_call(fn: Any, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_metaop(op: MetaOp, n: int, warmup: int = 2, repeats: int = 5) -> float:
    """Median seconds of forward + backward of one layer of ``op`` at per-device batch
    ``op.batch / n`` on this process (float32)."""
    import torch
    import torch.nn.functional as F

    b = max(op.batch // n, 1)
    gen = torch.Generator().manual_seed(0)
    if op.is_loss:
        za = torch.randn(b, op.hidden, generator=gen, requires_grad=True)
        zb = torch.randn(b, op.hidden, generator=gen, requires_grad=True)
        log_temp = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        labels = torch.arange(b)

        def step() -> None:
            za.grad = zb.grad = log_temp.grad = None
            logits = F.normalize(za, dim=-1) @ F.normalize(zb, dim=-1).T * log_temp.exp()
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            loss.backward()

        return _time_call(step, warmup, repeats)

    block = build_block(op.kind, op.hidden, op.heads, op.ffn)
    x = torch.randn(b, op.tokens, op.hidden, generator=gen, requires_grad=True)
    mem = (
        torch.randn(b, op.memory_tokens, op.hidden, generator=gen, requires_grad=True)
        if op.kind == "decoder" else None
    )
    grad_out = torch.randn(b, op.tokens, op.hidden, generator=gen)
    params = list(block.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        if mem is not None:
            mem.grad = None
        block(x, mem).backward(grad_out)

    return _time_call(step, warmup, repeats)


# --- the collective ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _collective_worker(
    rank: int, world: int, port: int, sizes: tuple[int, ...], repeats: int, out: str
) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        results = []
        for nbytes in sizes:
            t = torch.ones(max(nbytes // 4, 1), dtype=torch.float32)
            for _ in range(2):
                dist.all_reduce(t)
            times = []
            for _ in range(repeats):
                dist.barrier()
                t0 = time.perf_counter()
                dist.all_reduce(t)
                times.append(time.perf_counter() - t0)
            results.append((nbytes, statistics.median(times)))
        if rank == 0:
            Path(out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def fit_collective(
    samples: list[tuple[int, float]], processes: int, backend: str = "gloo"
) -> CollectiveFit:
    """Fit ``t = latency + 2 (p - 1) / p * bytes / bandwidth`` (non-negative, relative error)."""
    import numpy as np
    from scipy.optimize import nnls

    rf = ring_factor(processes)
    X = np.array([[1.0, rf * b] for b, _ in samples])
    y = np.array([t for _, t in samples])
    w = 1.0 / y
    scale = np.abs(X * w[:, None]).max(axis=0)
    sol, _ = nnls(X * w[:, None] / scale, y * w)
    lat, inv_bw = (sol / scale).tolist()
    if inv_bw <= 0:  # no size dependence seen: bound the bandwidth by the largest sample
        b, t = max(samples)
        inv_bw = t / (rf * b)
    return CollectiveFit(backend, processes, lat, 1.0 / inv_bw, tuple(samples))


def measure_collective(
    sizes: tuple[int, ...] = COLLECTIVE_SIZES, repeats: int = 20, processes: int = 2
) -> CollectiveFit:
    """All-reduce times over ``processes`` local gloo processes, fitted to latency + bandwidth."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "collective.json")
        mp.spawn(
            _collective_worker, args=(processes, _free_port(), sizes, repeats, out),
            nprocs=processes, join=True,
        )
        samples = [(int(b), float(t)) for b, t in json.loads(Path(out).read_text())]
    fit = fit_collective(samples, processes)
    log.info("gloo all-reduce: latency %.1f us, bus bandwidth %.2f GB/s",
             fit.latency_s * 1e6, fit.bandwidth / 1e9)
    return fit


# --- profiling a workload ----------------------------------------------------------------------


def machine_description(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(), "machine": platform.machine(), "cpu": cpu,
        "cpu_count": os.cpu_count() or 1, "threads_per_device": threads,
        "python": platform.python_version(),
        # other work on the machine inflates the timings: record how busy it was
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def block_flops(op: MetaOp) -> float:
    """FLOPs (fwd + bwd, whole batch) of what :func:`time_metaop` runs: the bare block, without
    the light parts ``op.flops_per_layer`` spreads over the chain."""
    if op.is_loss:
        return op.flops_per_layer
    return op.batch * costmodel.layer_train_flops(
        op.kind, op.hidden, op.ffn, op.tokens, op.memory_tokens
    )


def _distinct_metaops(ops: list[MetaOp]) -> dict[Signature, list[MetaOp]]:
    out: dict[Signature, list[MetaOp]] = {}
    for op in ops:
        out.setdefault(signature(op), []).append(op)
    return out


def _calibrate_flops() -> float:
    """This process's float32 matmul rate (FLOP/s), for the time guard only."""
    import torch

    a = torch.randn(256, 256)
    dt = _time_call(lambda: a @ a, 2, 5)
    return 2 * 256**3 / max(dt, 1e-9)


def estimate_profile_seconds(
    jobs: list[tuple[MetaOp, int]], flops_rate: float, warmup: int, repeats: int
) -> float:
    """A lower-bound guess of the profiling time: FLOPs at the measured matmul rate."""
    return sum(block_flops(op) / n for op, n in jobs) * (warmup + repeats) / flops_rate


def profile_metaops(
    ops: list[MetaOp],
    devices: int,
    repeats: int = 5,
    warmup: int = 2,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    threads: int | None = None,
    collective: CollectiveFit | None = None,
    progress: bool = True,
    workload: str = "",
    workload_fingerprint: str = "",
) -> Profile:
    """Measure every distinct signature of ``ops`` at every valid n <= ``devices``."""
    import torch
    from tqdm import tqdm

    if devices < 1:
        raise ProfileError(f"--devices must be >= 1 (got {devices})")
    if repeats < 1:
        raise ProfileError(f"--repeats must be >= 1 (got {repeats})")
    threads = threads or max(1, (os.cpu_count() or 1) // devices)
    groups = _distinct_metaops(ops)
    jobs = [
        (group[0], n)
        for group in groups.values()
        for n in ([1] if group[0].is_loss else data_parallel_counts(group[0].batch, devices))
    ]
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        guess = estimate_profile_seconds(jobs, _calibrate_flops(), warmup, repeats)
        if guess > max_seconds:
            raise ProfileError(
                f"profiling {len(jobs)} points would take at least ~{guess:.0f} s on this machine"
                f" (> --max-seconds {max_seconds:g}); profile a tiny workload or raise the limit"
            )
        start = time.perf_counter()
        coll = collective or measure_collective(processes=2)
        measured: dict[Signature, list[ProfilePoint]] = {s: [] for s in groups}
        with tqdm(total=len(jobs), desc="profiling", unit="point", disable=not progress) as bar:
            for op, n in jobs:
                elapsed = time.perf_counter() - start
                if elapsed > max_seconds:
                    raise ProfileError(
                        f"profiling stopped after {elapsed:.0f} s (> --max-seconds {max_seconds:g})"
                        f" with {bar.n}/{len(jobs)} points done"
                    )
                bar.set_postfix_str(f"{op.name} n={n}", refresh=False)
                compute = time_metaop(op, n, warmup, repeats)
                sync = coll.allreduce_time(op.params_per_layer * 4, n)
                measured[signature(op)].append(ProfilePoint(n, compute, sync))
                bar.update()
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(old_threads)
    entries = {
        sig: ProfileEntry(
            sig, tuple(o.name for o in group), group[0].params_per_layer,
            block_flops(group[0]), tuple(measured[sig]),
        )
        for sig, group in groups.items()
    }
    return Profile(
        workload=workload, workload_fingerprint=workload_fingerprint, devices=devices,
        repeats=repeats, threads_per_device=threads, dtype="float32", grad_bytes=4,
        torch_version=torch.__version__, machine=machine_description(threads),
        collective=coll, entries=entries, elapsed_s=elapsed,
    )


# --- CLI ---------------------------------------------------------------------------------------


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``spindle profile WORKLOAD [--devices N] [--out PATH] [--repeats R] ...``."""
    parser.add_argument("workload", help="shipped workload name or a YAML/TOML path")
    parser.add_argument("--devices", type=int, default=2,
                        help="profile every valid device count up to N (default 2)")
    parser.add_argument("--out", type=Path, default=Path("profile.json"),
                        help="where to write the profile (default profile.json)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per point (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per point first")
    parser.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS,
                        help="refuse or stop when profiling would take longer (default 300)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per simulated device (default cores / devices)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run_profile_command(args: argparse.Namespace) -> int:
    """Run ``spindle profile``; 0 on success, 2 on a bad workload or a refused profile."""
    from spindle.workload import WorkloadError, load_workload

    try:
        w = load_workload(args.workload)
        graph = contract(w)
        prof = profile_metaops(
            graph.metaops, args.devices, repeats=args.repeats, warmup=args.warmup,
            max_seconds=args.max_seconds, threads=args.threads,
            progress=not args.no_progress, workload=w.name,
            workload_fingerprint=w.fingerprint(),
        )
        write_profile(prof, args.out)
    except (WorkloadError, ProfileError) as err:
        sys.stderr.write(f"spindle profile: error: {err}\n")
        return 2
    npts = sum(len(e.points) for e in prof.entries.values())
    sys.stdout.write(
        f"wrote {args.out}: {len(prof.entries)} signatures, {npts} points, devices <= {prof.devices},"
        f" {prof.elapsed_s:.1f} s (gloo latency {prof.collective.latency_s * 1e6:.0f} us,"
        f" {prof.collective.bandwidth / 1e9:.2f} GB/s)\n"
    )
    return 0
