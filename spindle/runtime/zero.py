"""ZeRO inside a parameter device group: this rank's shard of a sharded pool's sync buckets.

A sharded pool (:func:`spindle.plan.layout.zero_stages`) keeps every parameter whole on every
member of its device group ``D`` (the forward and backward need them), but each bucket's
gradients are *reduce-scattered* over ``D`` instead of all-reduced, and member ``k`` of ``D``
(by rank order) steps AdamW on its contiguous share ``[k*c, (k+1)*c)`` of the bucket flattened
(``c = ceil(elements / |D|)``), so it holds the AdamW state of that share only (ZeRO stage 1).
After the step every member sends its updated share to the others (one all-gather per bucket),
so the replicas stay equal.  Stage 2 also frees the full-size gradients of a bucket as soon as its
reduce-scatter has finished: the reduced share is all that is kept (Rajbhandari et al., "ZeRO",
SC'20, sections 5.1-5.2).

The AdamW "parameters" of a share are :class:`Shard` views: leaf tensors sharing the storage of
the real parameters (``p.detach().view(-1)[lo:hi]``), so the optimizer updates the parameters in
place and there is no master copy.  AdamW is elementwise, so stepping the shares is exactly
stepping the whole parameters.  Bucket padding (the last share may be short) is zeros that no
view covers.

Checkpoints stay by logical name (layout-independent): :func:`full_state` all-gathers a share's
AdamW state into whole per-parameter tensors, :func:`load_state` slices them back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.distributed as dist

MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class Piece:
    """The part ``[lo, hi)`` (flat) of parameter ``name`` in this rank's share, at offset ``at``
    of the share."""

    name: str
    lo: int
    hi: int
    at: int


@dataclass
class Shard:
    """This rank's share of one sharded bucket over the process group ``group``."""

    stage: int
    names: tuple[str, ...]  # the bucket's parameters, in bucket order
    numels: tuple[int, ...]
    size: int  # elements per share (the last ones padded)
    position: int  # this rank's place in the group
    members: int  # |D|
    group: dist.ProcessGroup | None
    pieces: list[Piece] = field(default_factory=list)
    views: list[torch.Tensor] = field(default_factory=list)  # one leaf per piece

    @staticmethod
    def of(stage: int, names: tuple[str, ...], numels: tuple[int, ...], ranks: tuple[int, ...],
           rank: int, group: dist.ProcessGroup | None) -> "Shard":
        total = sum(numels)
        members = len(ranks)
        size = math.ceil(total / members)
        position = ranks.index(rank)
        start, end = position * size, min((position + 1) * size, total)
        shard = Shard(stage, names, numels, size, position, members, group)
        offset = 0
        for name, numel in zip(names, numels):
            lo, hi = max(start, offset), min(end, offset + numel)
            if lo < hi:
                shard.pieces.append(Piece(name, lo - offset, hi - offset, lo - start))
            offset += numel
        return shard

    @property
    def padded(self) -> int:
        return self.size * self.members

    def bind(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        """Make the AdamW views of this share over ``params`` (the parameters themselves)."""
        self.views = []
        for piece in self.pieces:
            p = params[piece.name]
            assert p.is_contiguous(), f"parameter {piece.name} is not contiguous"
            self.views.append(p.detach().view(-1)[piece.lo:piece.hi])

    def flat(self, tensors: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """``tensors`` (one per piece) flattened into one share-sized buffer (zero padded) of
        ``like``'s dtype and device."""
        out = like.new_zeros(self.size)
        for piece, t in zip(self.pieces, tensors):
            out[piece.at:piece.at + piece.hi - piece.lo] = t.reshape(-1)
        return out

    def gather(self, share: torch.Tensor) -> torch.Tensor:
        """Every member's share, concatenated in member order (collective over the group)."""
        full = torch.empty(self.padded, dtype=share.dtype, device=share.device)
        dist.all_gather_into_tensor(full, share.contiguous(), group=self.group)
        return full

    def whole(self, full: torch.Tensor) -> dict[str, torch.Tensor]:
        """A gathered flat bucket split into each parameter's flat tensor."""
        out: dict[str, torch.Tensor] = {}
        offset = 0
        for name, numel in zip(self.names, self.numels):
            out[name] = full[offset:offset + numel]
            offset += numel
        return out


class BucketScatter:
    """One sharded bucket's asynchronous reduce-scatter (SUM): the gradients flattened and
    padded, the collective started; :meth:`wait` hands this rank's reduced share to the share's
    views as their gradients (and, at stage 2, frees the full-size gradients)."""

    def __init__(self, grads: list[torch.Tensor], shard: Shard,
                 dtype: torch.dtype | None = None) -> None:
        self.shard = shard
        self.grads = grads
        flat = torch.cat([g.reshape(-1) for g in grads])
        if dtype is not None:
            flat = flat.to(dtype)
        pad = shard.padded - flat.numel()
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        self.out = flat.new_empty(shard.size)
        self.nbytes = flat.numel() * flat.element_size()
        self.work = dist.reduce_scatter_tensor(self.out, flat, op=dist.ReduceOp.SUM,
                                               group=shard.group, async_op=True)

    def wait(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        self.work.wait()
        for piece, view in zip(self.shard.pieces, self.shard.views):
            view.grad = self.out[piece.at:piece.at + piece.hi - piece.lo].to(view.dtype)
        if self.shard.stage >= 2:
            for name in self.shard.names:
                params[name].grad = None


def gather_updated(shards: list[Shard], params: Mapping[str, torch.nn.Parameter]) -> int:
    """After the step: all-gather every shard's updated share into the whole parameters (all
    buckets' collectives in flight together); returns the bytes this rank sent."""
    pending = []
    for shard in shards:
        share = shard.flat([v.detach() for v in shard.views], params[shard.names[0]])
        full = torch.empty(shard.padded, dtype=share.dtype, device=share.device)
        pending.append((shard, full, dist.all_gather_into_tensor(
            full, share, group=shard.group, async_op=True)))
    nbytes = 0
    with torch.no_grad():
        for shard, full, work in pending:
            work.wait()
            nbytes += shard.size * full.element_size()
            for name, flat in shard.whole(full).items():
                params[name].view(-1).copy_(flat)
    return nbytes


def full_state(shards: list[Shard], optimizer: torch.optim.Optimizer,
               params: Mapping[str, torch.nn.Parameter]) -> dict[str, dict[str, torch.Tensor]]:
    """The AdamW state of every sharded parameter, whole, by logical name (collective over each
    shard's group; empty before the first step)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for shard in shards:
        states = [optimizer.state.get(v, {}) for v in shard.views]
        like = params[shard.names[0]].detach()
        step = float(states[0]["step"]) if states and states[0] else 0.0
        steps = shard.gather(torch.full((shard.size,), step, dtype=torch.float64,
                                        device=like.device))[::shard.size]
        if float(steps.max()) == 0.0:
            continue  # not stepped yet: nothing to save
        whole = {key: shard.whole(shard.gather(shard.flat(
            [s[key] if s else like.new_zeros(p.hi - p.lo)
             for s, p in zip(states, shard.pieces)], like))) for key in MOMENTS}
        for name in shard.names:
            shape = params[name].shape
            out[name] = {"step": torch.tensor(float(steps.max()), dtype=torch.float32),
                         **{key: whole[key][name].reshape(shape).clone() for key in MOMENTS}}
    return out


def load_state(shards: list[Shard], optimizer: torch.optim.Optimizer,
               state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Give each share's views their part of the whole per-parameter AdamW ``state``."""
    for shard in shards:
        for piece, view in zip(shard.pieces, shard.views):
            whole = state.get(piece.name)
            if whole is None:
                continue
            optimizer.state[view] = {
                "step": whole["step"].clone(),
                **{key: whole[key].reshape(-1)[piece.lo:piece.hi].clone().to(view.dtype)
                   for key in MOMENTS}}


__all__ = ["Shard", "BucketScatter", "gather_updated", "full_state", "load_state", "MOMENTS"]
