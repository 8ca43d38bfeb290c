"""Per-iteration measurements of the runtime: a phase timer and the JSON-lines metrics file.

An iteration's time splits into the phases of docs/method.md section 9's breakdown: ``compute``
(forward and backward of the slices), ``send_recv`` (inter-wave transmission), ``param_sync``
(the device-group gradient all-reduces) and ``optimizer`` (gradient clipping and the AdamW step).
Each rank times its own phases; :func:`combine_ranks` turns every rank's numbers into one record
(the slowest rank's time per phase, bytes summed over ranks, task losses summed over the ranks'
contributions).  Input data generation is timed apart (``data_s``) and not counted in the
iteration, as a real input pipeline prefetches it.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

PHASES: tuple[str, ...] = ("compute", "send_recv", "param_sync", "optimizer")


class PhaseTimer:
    """Wall-clock seconds per phase; on CUDA it synchronises the device when a phase ends so
    that queued kernels are charged to the phase that launched them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {p: 0.0 for p in PHASES}

    def reset(self) -> None:
        for p in self.seconds:
            self.seconds[p] = 0.0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@dataclass
class RankIteration:
    """One rank's numbers for one iteration."""

    time_s: float
    data_s: float
    phases: dict[str, float]
    bytes_forward: int
    bytes_backward: int
    sync_bytes: int
    task_losses: dict[str, float]  # this rank's contributions

    def to_vector(self, tasks: Sequence[str]) -> list[float]:
        return [
            self.time_s, self.data_s, *(self.phases.get(p, 0.0) for p in PHASES),
            float(self.bytes_forward), float(self.bytes_backward), float(self.sync_bytes),
            *(self.task_losses.get(t, 0.0) for t in tasks),
        ]


def vector_length(num_tasks: int) -> int:
    return 2 + len(PHASES) + 3 + num_tasks


@dataclass
class IterationMetrics:
    """One iteration over all ranks: what a metrics line holds."""

    plan: str  # the plan's label (its file name without .json)
    planner: str
    step: int
    time_s: float  # slowest rank's iteration time
    compute_s: float
    send_recv_s: float
    param_sync_s: float
    optimizer_s: float
    data_s: float
    bytes_sent: int  # inter-wave payload, forward + backward, summed over ranks
    bytes_sent_forward: int
    bytes_sent_backward: int
    param_sync_bytes: int  # bytes entering gradient all-reduces, summed over ranks
    losses: dict[str, float]
    loss: float
    grad_norm: float
    rank_time_s: list[float] = field(default_factory=list)
    checkpoint_s: float = 0.0  # writing a checkpoint after this iteration (not in time_s)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def combine_ranks(
    plan: str, planner: str, step: int, tasks: Sequence[str], vectors: Sequence[Sequence[float]],
    grad_norm: float,
) -> IterationMetrics:
    """Merge every rank's :meth:`RankIteration.to_vector` into one record."""
    def col(i: int) -> list[float]:
        return [float(v[i]) for v in vectors]

    n_ph = len(PHASES)
    phase_max = {p: max(col(2 + k)) for k, p in enumerate(PHASES)}
    base = 2 + n_ph
    fwd, bwd, sync = (int(round(sum(col(base + k)))) for k in range(3))
    losses = {t: sum(col(base + 3 + k)) for k, t in enumerate(tasks)}
    return IterationMetrics(
        plan=plan, planner=planner, step=step, time_s=max(col(0)), compute_s=phase_max["compute"],
        send_recv_s=phase_max["send_recv"], param_sync_s=phase_max["param_sync"],
        optimizer_s=phase_max["optimizer"], data_s=max(col(1)), bytes_sent=fwd + bwd,
        bytes_sent_forward=fwd, bytes_sent_backward=bwd, param_sync_bytes=sync, losses=losses,
        loss=sum(losses.values()), grad_norm=grad_norm, rank_time_s=col(0),
    )


class MetricsWriter:
    """Appends one JSON object per iteration to a file (rank 0 only writes); what the file
    held before stays (a resumed or repeated run adds its lines)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: IterationMetrics | dict[str, Any]) -> None:
        if self.path is None:
            return
        line = record.to_json() if isinstance(record, IterationMetrics) else json.dumps(record)
        with self.path.open("a") as f:
            f.write(line + "\n")
