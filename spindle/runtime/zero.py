"""ZeRO inside a parameter device group: this rank's shard of a sharded pool's sync buckets.

A sharded pool (:func:`spindle.plan.layout.zero_stages`) keeps every parameter whole on every
member of its device group ``D`` (the forward and backward need them), but each bucket's
gradients are *reduce-scattered* over ``D`` instead of all-reduced, and member ``k`` of ``D``
(by rank order) steps AdamW on its contiguous share ``[k*c, (k+1)*c)`` of the bucket flattened
(``c = ceil(elements / |D|)``), so it holds the AdamW state of that share only (ZeRO stage 1).
After the step every member sends its updated share to the others (one all-gather per bucket),
so the replicas stay equal.  Stage 2 (:class:`WaveScatter`) reduce-scatters a bucket after the
backward of every wave that computes its gradients and frees them at once, summing the reduced
shares: a full gradient lives through one wave's backward only, the share is all that is kept
(Rajbhandari et al., "ZeRO", SC'20, sections 5.1-5.2).

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
from typing import Any, Mapping

import torch
import torch.distributed as dist

MOMENTS = ("exp_avg", "exp_avg_sq")
# torch 2.13 names them *_single (the *_tensor names warn that they are deprecated); older
# releases have only the *_tensor ones
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


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
        _all_gather(full, share.contiguous(), group=self.group)
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
    """One stage-1 bucket's asynchronous reduce-scatter (SUM): the gradients flattened and
    padded, the collective started; :meth:`wait` hands this rank's reduced share to the share's
    views as their gradients."""

    def __init__(self, grads: list[torch.Tensor], shard: Shard,
                 dtype: torch.dtype | None = None) -> None:
        self.shard = shard
        # one padded buffer (a cat, then a padded copy, would hold the bucket twice)
        flat = grads[0].new_zeros(shard.padded, dtype=dtype or grads[0].dtype)
        offset = 0
        for g in grads:
            flat[offset:offset + g.numel()] = g.reshape(-1)
            offset += g.numel()
        self.out = flat.new_empty(shard.size)
        self.nbytes = flat.numel() * flat.element_size()
        self.work = _reduce_scatter(self.out, flat, op=dist.ReduceOp.SUM,
                                               group=shard.group, async_op=True)

    def wait(self) -> None:
        self.work.wait()
        for piece, view in zip(self.shard.pieces, self.shard.views):
            view.grad = self.out[piece.at:piece.at + piece.hi - piece.lo].to(view.dtype)


class WaveScatter:
    """A stage-2 bucket: reduce-scattered after the backward of every wave that computes its
    gradients (:func:`spindle.plan.layout.scatter_waves`, the same waves on every member), its
    full gradients freed at once and the reduced shares summed, so a full gradient lives only
    through one wave's backward (ZeRO-2, as DeepSpeed reduces per micro-batch)."""

    def __init__(self, shard: Shard, waves: tuple[int, ...],
                 dtype: torch.dtype | None = None) -> None:
        self.shard = shard
        self.waves = frozenset(waves)
        self.dtype = dtype  # the reduce-scatter's (None: the gradients')
        self.acc: torch.Tensor | None = None
        self.pending: list[tuple[dist.Work, torch.Tensor, torch.Tensor, int]] = []
        self.nbytes = 0

    def launch(self, params: Mapping[str, torch.nn.Parameter], wave: int = -1) -> None:
        """Reduce-scatter the gradients computed so far (zeros where none) and free them."""
        first = params[self.shard.names[0]]
        flat = first.detach().new_zeros(self.shard.padded, dtype=self.dtype or first.dtype)
        offset = 0
        for name, numel in zip(self.shard.names, self.shard.numels):
            p = params[name]
            if p.grad is not None:
                flat[offset:offset + numel] = p.grad.reshape(-1)
                p.grad = None
            offset += numel
        out = flat.new_empty(self.shard.size)
        self.nbytes += flat.numel() * flat.element_size()
        work = _reduce_scatter(out, flat, op=dist.ReduceOp.SUM,
                                          group=self.shard.group, async_op=True)
        self.pending.append((work, out, flat, wave))

    def drain(self, block: bool = True, after: int | None = None) -> None:
        """Add up the shares of the reduce-scatters in flight, in launch order (the sum is the
        same on every run); without ``block`` only those already finished at the front, with
        ``after`` only (waiting for) those launched for waves above it."""
        while self.pending:
            work, out, _, wave = self.pending[0]
            if after is not None and wave <= after:
                return
            if not block and not work.is_completed():
                return
            work.wait()
            if self.acc is None:
                self.acc = out.to(self.shard.views[0].dtype if self.shard.views else out.dtype)
            else:
                self.acc += out.to(self.acc.dtype)
            self.pending.pop(0)

    def finish(self) -> int:
        """Hand the summed share to the views as their gradients; returns the bytes sent."""
        self.drain()
        assert self.acc is not None, "a stage-2 bucket was never reduce-scattered"
        for piece, view in zip(self.shard.pieces, self.shard.views):
            view.grad = self.acc[piece.at:piece.at + piece.hi - piece.lo]
        self.acc = None
        nbytes, self.nbytes = self.nbytes, 0
        return nbytes


class Stage2Sync:
    """This rank's stage-2 buckets through one backward.  In the backward of wave ``w`` the
    buckets with ``w`` among their waves are reduce-scattered in one order (the same on every
    rank): a bucket as soon as every one of its parameters this rank's slice of ``w`` uses has
    its gradient for ``w`` (from post-accumulate-grad hooks, with ``layer``; a rank runs one
    slice, so one backward, per wave) and every earlier bucket has gone, the rest when the
    wave's backward ends.  Finished reduce-scatters are collected without waiting, so a
    bucket's buffer is freed as the backward goes on (on NCCL; gloo reports a collective done
    only once waited for).  When a wave's backward ends, the reduce-scatters of the waves
    before it in backward are waited for: every member has launched those by then (it has
    finished their waves' backward), so the wait cannot deadlock; they are waited for before the
    wave's remaining buckets are launched, so at most two waves' buffers are ever alive, and
    after a wave's backward only its own."""

    def __init__(self, scatters: list[WaveScatter], uses: Mapping[int, set[str]],
                 layer: bool) -> None:
        self.scatters = scatters
        self.layer = layer
        waves = sorted({w for s in scatters for w in s.waves})
        self.order = {w: [i for i, s in enumerate(scatters) if w in s.waves] for w in waves}
        self.need = {(i, w): len(set(scatters[i].shard.names) & uses.get(w, set()))
                     for w in waves for i in self.order[w]}
        self.bucket_of = {n: i for i, s in enumerate(scatters) for n in s.shard.names}
        self.wave = -1
        self.next = 0
        self.left: dict[int, int] = {}

    def begin(self, wave: int) -> None:
        self.wave, self.next = wave, 0
        self.left = {i: self.need[(i, wave)] for i in self.order.get(wave, ())}

    def hook(self, name: str, params: Mapping[str, torch.nn.Parameter]) -> None:
        i = self.bucket_of.get(name)
        if self.layer and i is not None and i in self.left:
            self.left[i] -= 1
            self._issue(params, force=False)

    def end(self, wave: int, params: Mapping[str, torch.nn.Parameter]) -> None:
        # the earlier waves' reduce-scatters first (they had this wave's backward to finish):
        # their buffers go before this wave's remaining buckets take theirs
        for s in self.scatters:
            s.drain(after=wave)
        if wave == self.wave:
            self._issue(params, force=True)

    def _issue(self, params: Mapping[str, torch.nn.Parameter], force: bool) -> None:
        order = self.order.get(self.wave, [])
        while self.next < len(order) and (force or self.left[order[self.next]] <= 0):
            self.scatters[order[self.next]].launch(params, self.wave)
            self.next += 1
        for s in self.scatters:
            s.drain(block=False)


def gather_updated(shards: list[Shard], params: Mapping[str, torch.nn.Parameter]) -> int:
    """After the step: all-gather every shard's updated share into the whole parameters (two
    buckets' collectives in flight at a time, so the buffers stay small); returns the bytes
    this rank sent."""
    pending: list[tuple[Shard, torch.Tensor, dist.Work]] = []
    nbytes = 0

    def land(shard: Shard, full: torch.Tensor, work: dist.Work) -> None:
        work.wait()
        with torch.no_grad():
            for name, flat in shard.whole(full).items():
                params[name].view(-1).copy_(flat)

    for shard in shards:
        if len(pending) >= 2:
            land(*pending.pop(0))
        share = shard.flat([v.detach() for v in shard.views], params[shard.names[0]])
        full = torch.empty(shard.padded, dtype=share.dtype, device=share.device)
        pending.append((shard, full, _all_gather(
            full, share, group=shard.group, async_op=True)))
        nbytes += shard.size * full.element_size()
    for item in pending:
        land(*item)
    return nbytes


def full_state(shards: list[Shard], optimizer_state: Mapping[torch.Tensor, Mapping[str, Any]],
               params: Mapping[str, torch.nn.Parameter]) -> dict[str, dict[str, torch.Tensor]]:
    """The AdamW state (``optimizer_state``, per tensor) of every sharded parameter, whole, by
    logical name (collective over each shard's group: every member calls it, an empty share
    too; empty before the first step)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for shard in shards:
        states = [optimizer_state.get(v, {}) for v in shard.views]
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


def load_state(shards: list[Shard], optimizer_state: dict[torch.Tensor, dict[str, torch.Tensor]],
               state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Give each share's views their part of the whole per-parameter AdamW ``state``."""
    for shard in shards:
        for piece, view in zip(shard.pieces, shard.views):
            whole = state.get(piece.name)
            if whole is None:
                continue
            optimizer_state[view] = {
                "step": whole["step"].clone(),
                **{key: whole[key].reshape(-1)[piece.lo:piece.hi].clone().to(view.dtype)
                   for key in MOMENTS}}


__all__ = ["Shard", "BucketScatter", "WaveScatter", "Stage2Sync", "gather_updated", "full_state",
           "load_state", "MOMENTS"]
