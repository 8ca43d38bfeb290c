"""Parameter device groups: gradient synchronisation, the global gradient norm, and gathering.

Every logical parameter ``W`` has a device group ``D``: the ranks that hold a replica of it
(its data-parallel replicas and the slices of other tasks that run the same layer).  Parameters
with the same ``D`` form a *pool* (SPINDLE.md section 8.3).  After backward, each pool with
``|D| > 1`` all-reduces (SUM) its gradients inside ``D``, flattened into buckets, in one
deterministic order on every rank.

Why SUM is right: the training objective is the sum of the task losses, and each rank's operators
already return their share of a task's loss divided by the task's *global* count (the model API's
contract), so the gradient of the objective is the plain sum of every rank's local gradient; a
rank outside ``D`` never touches ``W`` and contributes zero.

Overlap with backward (SPINDLE.md section 10): a parameter's gradient is final once the backward
of the earliest wave that uses it has run, on every rank (its *ready wave*, read off the plan by
:func:`spindle.runtime.localise.parameter_ready_waves`).  A pool's parameters are bucketed in
descending ready wave (and by name), a bucket ending when it would exceed ``bucket_bytes`` or, once
it holds ``min_bucket_bytes``, where the ready wave changes (DDP's buckets, in the plan's order).
:meth:`ParameterGroups.launch_ready` is called by every rank after the backward of every wave, in
the same order, and starts the asynchronous all-reduce of each bucket that became final;
:meth:`ParameterGroups.finish` waits for them all and copies the sums back.  Every rank of a
pool launches the same buckets at the same wave, so every group sees one collective order; the
sync collectives run on process groups of their own (the world's too), apart from the default
group that carries the inter-wave P2P traffic and the clip norm.

The global gradient norm counts every parameter once: after the sync all replicas hold the same
gradient, so only the lowest rank of each ``D`` adds its squared norm before one all-reduce over
the world.  Clipping then scales by ``max_norm / (norm + 1e-6)`` clamped to 1, exactly like
``torch.nn.utils.clip_grad_norm_`` on the single-process model.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Mapping

import torch
import torch.distributed as dist

from spindle.plan.contract import (
    SYNC_BUCKET_BYTES,
    SYNC_MIN_BUCKET_BYTES,
    sync_bucket_runs,
)

log = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = SYNC_BUCKET_BYTES  # DDP's bucket_cap_mb
DEFAULT_MIN_BUCKET_BYTES = SYNC_MIN_BUCKET_BYTES  # DDP's first bucket: sync early in backward


@dataclass(frozen=True)
class SyncBucket:
    """Gradients all-reduced together: parameters of one pool, final after ``ready_wave``."""

    ranks: tuple[int, ...]
    names: tuple[str, ...]
    ready_wave: int


@dataclass(frozen=True)
class ParameterPool:
    """Parameters (sorted logical names) replicated on exactly the ranks ``ranks``."""

    ranks: tuple[int, ...]
    names: tuple[str, ...]


def build_pools(device_groups: Mapping[str, tuple[int, ...]]) -> list[ParameterPool]:
    """Group parameters by identical device group, in a deterministic order (by the ranks)."""
    by_group: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for name, ranks in device_groups.items():
        by_group[tuple(sorted(ranks))].append(name)
    return [
        ParameterPool(ranks, tuple(sorted(names)))
        for ranks, names in sorted(by_group.items(), key=lambda kv: (len(kv[0]), kv[0]))
    ]


class ParameterGroups:
    """One rank's view of the pools, with a process group for each ``D`` of more than one rank.

    Constructing it is collective: ``dist.new_group`` is called for every distinct ``D`` with
    ``|D| > 1`` on every rank, in the same order (the pools' order).
    """

    def __init__(
        self,
        device_groups: Mapping[str, tuple[int, ...]],
        rank: int,
        world_size: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        ready_wave: Mapping[str, int] | None = None,
        min_bucket_bytes: int = DEFAULT_MIN_BUCKET_BYTES,
        param_bytes: Mapping[str, int] | None = None,
        timeout_s: float | None = None,
    ) -> None:
        self.device_groups = dict(device_groups)
        self.device = torch.device(device)
        self.dtype = dtype
        self.rank = rank
        self.world_size = world_size
        self.bucket_bytes = bucket_bytes
        self.min_bucket_bytes = min_bucket_bytes
        # without ready waves every gradient is final only at the end (wave 0)
        self.ready_wave = dict(ready_wave or {})
        self.pools = build_pools(device_groups)
        self._groups: dict[tuple[int, ...], dist.ProcessGroup | None] = {}
        for pool in self.pools:
            if len(pool.ranks) <= 1:
                continue
            # a group of its own for every pool, the world's too: the default group carries the
            # inter-wave P2P traffic, which must not queue behind (or ahead of) a sync
            # (with the run's timeout: a peer that stops answering fails the wait, not hangs it)
            self._groups[pool.ranks] = dist.new_group(
                list(pool.ranks),
                timeout=timedelta(seconds=timeout_s) if timeout_s else None,
            ) if world_size > 1 else None
        self.local_pools = [p for p in self.pools if rank in p.ranks]
        self.param_bytes = dict(param_bytes or {})  # sizes for the bucket caps (0 if unknown)
        self._pending: list[tuple[dist.Work, torch.Tensor, list[torch.Tensor]]] = []
        self._launched: set[int] = set()
        self._bytes = 0
        self.buckets = self._plan_buckets()
        log.debug("rank %d: %d pools, %d local, %d process groups, %d buckets", rank,
                  len(self.pools), len(self.local_pools), len(self._groups), len(self.buckets))

    # -- buckets ---------------------------------------------------------------------------------
    def _plan_buckets(self) -> list[SyncBucket]:
        """This rank's buckets, in launch order (descending ready wave, then pool order)."""
        buckets: list[SyncBucket] = []
        for pool in self.local_pools:
            if len(pool.ranks) <= 1:
                continue
            ready = {n: self.ready_wave.get(n, 0) for n in pool.names}
            names = sorted(pool.names, key=lambda n: (-ready[n], n))
            for run in sync_bucket_runs(
                    [(n, ready[n], float(self.param_bytes.get(n, 0))) for n in names],
                    self.bucket_bytes, self.min_bucket_bytes):
                buckets.append(SyncBucket(pool.ranks, tuple(run), min(ready[n] for n in run)))
        buckets.sort(key=lambda b: -b.ready_wave)  # stable: pool order within a wave
        return buckets

    # -- the sync ----------------------------------------------------------------------------
    def launch_ready(self, wave: int, params: Mapping[str, torch.nn.Parameter]) -> None:
        """Start the all-reduce of every bucket whose gradients are final once the backward of
        ``wave`` has run (every rank calls this after every wave's backward, in order)."""
        for i, bucket in enumerate(self.buckets):
            if i not in self._launched and bucket.ready_wave >= wave:
                self._launch(i, bucket, params)

    def _launch(
        self, index: int, bucket: SyncBucket, params: Mapping[str, torch.nn.Parameter]
    ) -> None:
        grads: list[torch.Tensor] = []
        for name in bucket.names:
            p = params[name]
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = torch.cat([g.reshape(-1) for g in grads])
        self._bytes += flat.numel() * flat.element_size()
        work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self._groups[bucket.ranks],
                               async_op=True)
        self._pending.append((work, flat, grads))
        self._launched.add(index)

    def finish(self, params: Mapping[str, torch.nn.Parameter]) -> int:
        """Launch what is left, wait for every bucket and copy the sums into the gradients;
        returns the bytes this rank contributed to all-reduces this iteration."""
        for i, bucket in enumerate(self.buckets):
            if i not in self._launched:
                self._launch(i, bucket, params)
        for work, flat, grads in self._pending:
            work.wait()
            at = 0
            for g in grads:
                g.copy_(flat[at:at + g.numel()].view_as(g))
                at += g.numel()
        nbytes = self._bytes
        self._pending, self._launched, self._bytes = [], set(), 0
        return nbytes

    def sync_gradients(self, params: Mapping[str, torch.nn.Parameter]) -> int:
        """All-reduce (SUM) every local pool's gradients inside its device group at once (no
        overlap); returns the bytes this rank contributed to all-reduces."""
        return self.finish(params)

    def global_grad_norm(self, params: Mapping[str, torch.nn.Parameter]) -> torch.Tensor:
        """The 2-norm of the whole model's gradient, each parameter counted once."""
        squares = []
        for name, p in params.items():
            if p.grad is not None and self.device_groups[name][0] == self.rank:
                squares.append(torch.linalg.vector_norm(p.grad).pow(2))
        total = torch.stack(squares).sum() if squares else torch.zeros((), dtype=self.dtype)
        total = total.to(dtype=self.dtype, device=self.device).reshape(1)
        if self.world_size > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.sqrt()[0]

    def clip_gradients(self, params: Mapping[str, torch.nn.Parameter], max_norm: float) -> float:
        """Scale every local gradient by ``min(1, max_norm / (norm + 1e-6))`` of the true global
        norm; returns the norm before clipping."""
        norm = self.global_grad_norm(params)
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for p in params.values():
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
        return float(norm)

    def gather(
        self,
        params: Mapping[str, torch.nn.Parameter],
        shape_of: Callable[[str], tuple[int, ...]],
        dst: int = 0,
    ) -> dict[str, torch.Tensor] | None:
        """Collect every logical parameter on rank ``dst`` (the lowest rank of each device group
        sends it); returns name -> CPU tensor on ``dst`` and None elsewhere."""
        ops: list[dist.P2POp] = []
        result: dict[str, torch.Tensor] = {}
        for tag, (name, ranks) in enumerate(sorted(self.device_groups.items())):
            owner = ranks[0]
            if owner == dst:
                if self.rank == dst:
                    result[name] = params[name].detach()
            elif self.rank == owner:
                ops.append(dist.P2POp(dist.isend, params[name].detach().contiguous(), dst, tag=tag))
            elif self.rank == dst:
                buf = torch.empty(shape_of(name), dtype=self.dtype, device=self.device)
                result[name] = buf
                ops.append(dist.P2POp(dist.irecv, buf, owner, tag=tag))
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        if self.rank != dst:
            return None
        return {name: result[name].cpu().clone() for name in sorted(result)}
