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

The global gradient norm counts every parameter once: after the sync all replicas hold the same
gradient, so only the lowest rank of each ``D`` adds its squared norm before one all-reduce over
the world.  Clipping then scales by ``max_norm / (norm + 1e-6)`` clamped to 1, exactly like
``torch.nn.utils.clip_grad_norm_`` on the single-process model.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024


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
    ) -> None:
        self.device_groups = dict(device_groups)
        self.device = torch.device(device)
        self.dtype = dtype
        self.rank = rank
        self.world_size = world_size
        self.bucket_bytes = bucket_bytes
        self.pools = build_pools(device_groups)
        self._groups: dict[tuple[int, ...], dist.ProcessGroup | None] = {}
        for pool in self.pools:
            if len(pool.ranks) <= 1:
                continue
            if len(pool.ranks) == world_size:
                self._groups[pool.ranks] = None  # the default (world) group
            else:
                self._groups[pool.ranks] = dist.new_group(list(pool.ranks))
        self.local_pools = [p for p in self.pools if rank in p.ranks]
        log.debug("rank %d: %d pools, %d local, %d process groups", rank, len(self.pools),
                  len(self.local_pools), len(self._groups))

    def sync_gradients(self, params: Mapping[str, torch.nn.Parameter]) -> int:
        """All-reduce (SUM) every local pool's gradients inside its device group; returns the
        bytes this rank contributed to all-reduces."""
        handles: list[tuple[dist.Work, torch.Tensor, list[torch.Tensor]]] = []
        nbytes = 0
        for pool in self.local_pools:
            if len(pool.ranks) <= 1:
                continue
            group = self._groups[pool.ranks]
            for bucket in self._buckets(pool, params):
                flat = torch.cat([g.reshape(-1) for g in bucket])
                nbytes += flat.numel() * flat.element_size()
                work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group, async_op=True)
                handles.append((work, flat, bucket))
        for work, flat, bucket in handles:
            work.wait()
            at = 0
            for g in bucket:
                g.copy_(flat[at:at + g.numel()].view_as(g))
                at += g.numel()
        return nbytes

    def _buckets(
        self, pool: ParameterPool, params: Mapping[str, torch.nn.Parameter]
    ) -> list[list[torch.Tensor]]:
        buckets: list[list[torch.Tensor]] = []
        current: list[torch.Tensor] = []
        size = 0
        dtype: torch.dtype | None = None
        for name in pool.names:
            p = params[name]
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            g = p.grad
            nb = g.numel() * g.element_size()
            if current and (size + nb > self.bucket_bytes or g.dtype != dtype):
                buckets.append(current)
                current, size = [], 0
            current.append(g)
            size += nb
            dtype = g.dtype
        if current:
            buckets.append(current)
        return buckets

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
