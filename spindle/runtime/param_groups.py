"""Parameter device groups: gradient synchronisation, the global gradient norm, and gathering.

Every logical parameter ``W`` has a device group ``D``: the ranks that hold a replica of it
(its data-parallel replicas and the slices of other tasks that run the same layer).  Parameters
with the same ``D`` form a *pool* (docs/method.md section 8.3).  After backward, each pool with
``|D| > 1`` all-reduces (SUM) its gradients inside ``D``, flattened into buckets, in one
deterministic order on every rank.

Why SUM is right: the training objective is the sum of the task losses, and each rank's operators
already return their share of a task's loss divided by the task's *global* count (the model API's
contract), so the gradient of the objective is the plain sum of every rank's local gradient; a
rank outside ``D`` never touches ``W`` and contributes zero.

Overlap with backward (docs/method.md section 10): a parameter's gradient is final once the backward
of the earliest wave that uses it has run, on every rank (its *ready wave*), and inside that wave
once the backward has passed its layer (its *ready fraction*); the pools are cut into buckets by
:func:`spindle.plan.layout.sync_buckets`, in one launch order by ready point, the rule the
simulator models.  Every rank launches its buckets' asynchronous all-reduces strictly in that
order, so every group sees one collective order:

* ``sync_start="layer"`` (default): a post-accumulate-grad hook on every trainable parameter
  counts it final when it fires in the backward of the earliest wave that uses it on this rank;
  the next buckets in order are launched as soon as all their parameters are final, from inside
  the backward (as DDP's reducer does);
* :meth:`ParameterGroups.launch_ready` is called by every rank after the backward of every wave
  and launches, in order, every bucket whose ready wave it was (a parameter that got no gradient
  never fires its hook; ``sync_start="wave"`` launches only here);
* :meth:`ParameterGroups.finish` launches what is left, waits for them all and copies the sums
  back.

The sync collectives run on process groups of their own (the world's too), apart from the
default group that carries the inter-wave P2P traffic and the clip norm.

The global gradient norm counts every parameter once: after the sync all replicas hold the same
gradient, so only the lowest rank of each ``D`` adds its squared norm before one all-reduce over
the world.  Clipping then scales by ``max_norm / (norm + 1e-6)`` clamped to 1, exactly like
``torch.nn.utils.clip_grad_norm_`` on the single-process model.
"""

from __future__ import annotations

import logging
import math
from datetime import timedelta
from typing import Callable, Mapping

import numpy as np
import torch
import torch.distributed as dist

from spindle.plan.contract import Plan
from spindle.plan.layout import (
    SYNC_BUCKET_BYTES,
    SYNC_MIN_BUCKET_BYTES,
    ParameterIndex,
    SyncBucket,
    executing_devices,
    iter_slices,
    parameter_pools,
    parameter_use,
    ready_fractions,
    scatter_waves,
    sync_buckets,
    wave_use,
    zero_stages,
)
from spindle.runtime.zero import (
    BucketScatter,
    Shard,
    Stage2Sync,
    WaveScatter,
    full_state,
    gather_updated,
    load_state,
)

log = logging.getLogger(__name__)


class BucketSum:
    """One bucket's asynchronous all-reduce (SUM): the gradients flattened into one buffer, the
    collective started; :meth:`wait` copies the sums back into the gradients."""

    def __init__(self, grads: list[torch.Tensor], group: dist.ProcessGroup | None,
                 dtype: torch.dtype | None = None) -> None:
        self.grads = grads
        self.flat = torch.cat([g.reshape(-1) for g in grads])
        if dtype is not None:
            self.flat = self.flat.to(dtype)  # reduced in ``dtype``, copied back into the grads
        self.nbytes = self.flat.numel() * self.flat.element_size()
        self.work = dist.all_reduce(self.flat, op=dist.ReduceOp.SUM, group=group, async_op=True)

    def wait(self) -> None:
        self.work.wait()
        at = 0
        for g in self.grads:
            g.copy_(self.flat[at:at + g.numel()].view_as(g))
            at += g.numel()


class ParameterGroups:
    """One rank's view of the pools and their sync buckets, with a process group for each
    device group ``D`` of more than one rank.

    Constructing it is collective: ``dist.new_group`` is called for every distinct ``D`` with
    ``|D| > 1`` on every rank, in the same order (by size, then ranks).  With ``overlap``, each
    bucket is launched once the backward of its ready wave has run; without, every gradient counts
    as final only after the whole backward (every bucket at wave 0).
    """

    def __init__(
        self,
        plan: Plan,
        index: ParameterIndex,
        members: Mapping[str, Mapping[str, tuple[int, ...]]],
        rank: int,
        world_size: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        overlap: bool = True,
        bucket_bytes: int = SYNC_BUCKET_BYTES,
        min_bucket_bytes: int = SYNC_MIN_BUCKET_BYTES,
        timeout_s: float | None = None,
        trainable: Callable[[str], bool] | None = None,
        sync_start: str = "layer",
        reduce_dtype: torch.dtype | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.reduce_dtype = reduce_dtype  # the all-reduce's dtype (None: the gradients')
        self.rank = rank
        self.world_size = world_size
        holds, ready = parameter_use(plan, index)
        layer = overlap and sync_start == "layer"
        fraction = ready_fractions(plan, index, ready) if layer else None
        if not overlap:
            ready = np.zeros_like(ready)
        # every parameter's group is its module's; its shape, for the gather
        self.device_groups: dict[str, tuple[int, ...]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for i, path in enumerate(index.names):
            for name, shape in members[path].items():
                self.device_groups[name] = tuple(int(d) for d in holds[i].nonzero()[0])
                self.shapes[name] = shape
        self.device_groups = dict(sorted(self.device_groups.items()))
        self._groups: dict[tuple[int, ...], dist.ProcessGroup | None] = {}
        for ranks in sorted(parameter_pools(holds), key=lambda g: (len(g), g)):
            if len(ranks) <= 1:
                continue
            # a group of its own for every pool, the world's too: the default group carries the
            # inter-wave P2P traffic, which must not queue behind (or ahead of) a sync
            # (with the run's timeout: a peer that stops answering fails the wait, not hangs it)
            self._groups[ranks] = dist.new_group(
                list(ranks), timeout=timedelta(seconds=timeout_s) if timeout_s else None,
            ) if world_size > 1 else None
        reduced = reduce_dtype or dtype
        element_bytes = torch.finfo(reduced).bits // 8 if reduced.is_floating_point else 1
        # frozen parameters have no gradient to sync (the same rule on every rank)
        self.buckets: list[tuple[SyncBucket, tuple[str, ...]]] = []
        # ZeRO: this rank's share of every sharded bucket (None for an all-reduced one); stage-2
        # buckets are reduce-scattered after every wave that computes their gradients instead
        # of in the ordered launch
        self.shards: list[Shard | None] = []
        self.scatters: list[WaveScatter] = []
        stage = zero_stages(index, plan.zero, holds)
        use = wave_use(plan, index) if (stage >= 2).any() else None
        for b in sync_buckets(index, holds, ready, element_bytes, bucket_bytes, min_bucket_bytes,
                              fraction, stage):
            names = tuple(n for k in b.keys for n in members[index.names[k]]
                          if trainable is None or trainable(n))
            if rank not in b.group or not names:
                continue
            shard = Shard.of(b.stage, names, tuple(math.prod(self.shapes[n]) for n in names),
                             b.group, rank, self._groups[b.group]) if b.stage else None
            if shard is not None and b.stage >= 2:
                # without the per-wave callbacks (no overlap) one reduce-scatter at the end
                waves = scatter_waves(plan, index, b.keys, use) if overlap else ()
                self.scatters.append(WaveScatter(shard, waves, reduce_dtype))
                continue
            self.buckets.append((b, names))
            self.shards.append(shard)
        self.all_shards = [s for s in self.shards if s] + [w.shard for w in self.scatters]
        self.stage2 = Stage2Sync(self.scatters, _names_used(plan, index, members, rank),
                                 layer) if self.scatters else None
        self.sharded = {n for shard in self.all_shards for n in shard.names}
        self._pending: list[BucketSum | BucketScatter] = []
        self._next = 0  # buckets[:_next] are launched this iteration
        # the layer-granular start: each bucket's parameters not yet final this iteration, and
        # the wave in whose backward a parameter is final on this rank (its earliest use here)
        self._final_wave: dict[str, int] = {}
        self._bucket_of: dict[str, int] = {}
        self._waiting: list[int] = []
        self._wave = -1
        self._counting = True
        self._params: Mapping[str, torch.nn.Parameter] | None = None
        if layer:
            local = _earliest_local_wave(plan, index, rank)
            for i, (b, names) in enumerate(self.buckets):
                for name in names:
                    self._bucket_of[name] = i
                    self._final_wave[name] = min(int(local[k]) for k in b.keys
                                                 if name in members[index.names[k]])
            self._waiting = [len(names) for _, names in self.buckets]
        log.debug("rank %d: %d process groups, %d buckets", rank, len(self._groups),
                  len(self.buckets))

    # -- the sync ----------------------------------------------------------------------------
    def attach(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        """Bind the ZeRO shares' views to ``params`` (the rank's parameters by logical name) and
        register the layer-granular start's post-accumulate-grad hooks on them (only with
        ``sync_start="layer"``)."""
        self._params = params
        for shard in self.all_shards:
            shard.bind(params)
        if self.stage2 is not None and self.stage2.layer:
            for name in self.stage2.bucket_of:
                params[name].register_post_accumulate_grad_hook(self._stage2_hook(name))
        for name in self._bucket_of:
            params[name].register_post_accumulate_grad_hook(self._hook(name))

    def count_hooks(self, on: bool) -> None:
        """Whether the post-accumulate-grad hooks count (off through the backward of a chunked
        slice's chunks but the last: a parameter's gradient is final only after that one)."""
        self._counting = on

    def _hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def final(_: torch.Tensor) -> None:
            if not self._counting or self._wave != self._final_wave[name]:
                return  # a later wave's backward on this rank: more gradient still to come
            i = self._bucket_of[name]
            self._waiting[i] -= 1
            if self._waiting[i] == 0 and i == self._next:
                self._launch_while(lambda k: self._waiting[k] == 0)
        return final

    def _stage2_hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def final(_: torch.Tensor) -> None:
            assert self.stage2 is not None and self._params is not None
            if self._counting:
                self.stage2.hook(name, self._params)
        return final

    def begin_backward(self, wave: int) -> None:
        """The backward of ``wave`` starts (the hooks count a parameter final in the earliest
        wave that uses it on this rank)."""
        self._wave = wave
        if self.stage2 is not None:
            self.stage2.begin(wave)

    def launch_ready(self, wave: int, params: Mapping[str, torch.nn.Parameter]) -> None:
        """Start, in order, the all-reduce of every bucket whose gradients are final once the
        backward of ``wave`` has run (every rank calls this after every wave's backward)."""
        self._params = params
        self._launch_while(lambda k: self.buckets[k][0].ready_wave >= wave
                           or (bool(self._waiting) and self._waiting[k] == 0))
        if self.stage2 is not None:
            self.stage2.end(wave, params)

    def _launch_while(self, ready: Callable[[int], bool]) -> None:
        """Launch buckets from the next one on, in order, while ``ready`` holds."""
        assert self._params is not None
        while self._next < len(self.buckets) and ready(self._next):
            bucket, names = self.buckets[self._next]
            grads: list[torch.Tensor] = []
            for name in names:
                p = self._params[name]
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
            shard = self.shards[self._next]
            if shard is not None:
                self._pending.append(BucketScatter(grads, shard, self.reduce_dtype))
                for name in names:  # copied into the bucket's buffer, and final: of no more use
                    self._params[name].grad = None
            else:
                self._pending.append(BucketSum(grads, self._groups[bucket.group],
                                               self.reduce_dtype))
            self._next += 1

    def finish(self, params: Mapping[str, torch.nn.Parameter]) -> int:
        """Launch what is left, wait for every bucket and copy the sums into the gradients;
        returns the bytes this rank contributed to all-reduces this iteration."""
        self._params = params
        self._launch_while(lambda k: True)
        for pending in self._pending:
            pending.wait()
        nbytes = sum(pending.nbytes for pending in self._pending)
        for scatter in self.scatters:
            if not scatter.waves:
                scatter.launch(params)
        nbytes += sum(scatter.finish() for scatter in self.scatters)
        self._pending, self._next, self._wave = [], 0, -1
        self._waiting = [len(names) for _, names in self.buckets] if self._bucket_of else []
        return nbytes

    # -- the optimizer's view ------------------------------------------------------------------
    def optimizer_params(self, params: Mapping[str, torch.nn.Parameter]) -> list[torch.Tensor]:
        """What this rank's AdamW steps: every trainable parameter it holds, except that a
        sharded pool's parameters are replaced by this rank's share of them (views)."""
        out: list[torch.Tensor] = [p for n, p in params.items()
                                   if p.requires_grad and n not in self.sharded]
        return out + [v for shard in self.all_shards for v in shard.views]

    def zero_grad(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        """Drop every gradient: the parameters' and the shares'."""
        for p in params.values():
            p.grad = None
        for shard in self.all_shards:
            for v in shard.views:
                v.grad = None

    def after_step(self, params: Mapping[str, torch.nn.Parameter]) -> int:
        """All-gather the updated shares into the whole parameters (collective; nothing without
        ZeRO); returns the bytes this rank sent."""
        if not self.sharded:
            return 0
        for shard in self.all_shards:  # the step has read the shares' gradients
            for v in shard.views:
                v.grad = None
        return gather_updated(self.all_shards, params)

    def optimizer_state(self, state: Mapping[torch.Tensor, Mapping[str, torch.Tensor]],
                        params: Mapping[str, torch.nn.Parameter]
                        ) -> dict[str, dict[str, torch.Tensor]]:
        """AdamW's ``state`` (the optimizer's, per tensor) of every parameter this rank holds,
        whole, by logical name (collective with ZeRO: the shares are gathered)."""
        out = {n: dict(state[p]) for n, p in params.items()
               if n not in self.sharded and p in state}
        out.update(full_state(self.all_shards, state, params))
        return out

    def load_optimizer_state(self, optimizer_state: dict[torch.Tensor, dict[str, torch.Tensor]],
                             params: Mapping[str, torch.nn.Parameter],
                             state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Give AdamW (its ``optimizer_state``) the whole per-name ``state`` (this rank's share
        of a sharded one)."""
        for n, st in state.items():
            if n not in self.sharded:
                optimizer_state[params[n]] = dict(st)
        load_state(self.all_shards, optimizer_state, state)

    def _grads(self, params: Mapping[str, torch.nn.Parameter]
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The gradients AdamW will read (unsharded parameters' and the shares'), and of those
        the ones this rank counts in the global norm: an unsharded parameter on the lowest rank
        of its group, and every share (the shares of a bucket partition it)."""
        mine: list[torch.Tensor] = []
        every: list[torch.Tensor] = []
        for name, p in params.items():
            if p.grad is not None and name not in self.sharded:
                every.append(p.grad)
                if self.device_groups[name][0] == self.rank:
                    mine.append(p.grad)
        for shard in self.all_shards:
            for v in shard.views:
                if v.grad is not None:
                    every.append(v.grad)
                    mine.append(v.grad)
        return every, mine

    def global_grad_norm(self, params: Mapping[str, torch.nn.Parameter]) -> torch.Tensor:
        """The 2-norm of the whole model's gradient, each parameter counted once."""
        squares = [torch.linalg.vector_norm(g).pow(2) for g in self._grads(params)[1]]
        total = torch.stack(squares).sum() if squares else torch.zeros((), dtype=self.dtype)
        total = total.to(dtype=self.dtype, device=self.device).reshape(1)
        if self.world_size > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.sqrt()[0]

    def clip_gradients(self, params: Mapping[str, torch.nn.Parameter], max_norm: float) -> float:
        """Scale every gradient AdamW will read by ``min(1, max_norm / (norm + 1e-6))`` of the
        true global norm; returns the norm before clipping."""
        norm = self.global_grad_norm(params)
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in self._grads(params)[0]:
            g.mul_(coef.to(g.dtype))
        return float(norm)

    def gather(
        self, params: Mapping[str, torch.nn.Parameter], dst: int = 0
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
                buf = torch.empty(self.shapes[name], dtype=self.dtype, device=self.device)
                result[name] = buf
                ops.append(dist.P2POp(dist.irecv, buf, owner, tag=tag))
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        if self.rank != dst:
            return None
        return {name: result[name].cpu().clone() for name in sorted(result)}


def _names_used(plan: Plan, index: ParameterIndex,
                members: Mapping[str, Mapping[str, tuple[int, ...]]], rank: int
                ) -> dict[int, set[str]]:
    """Per wave, the parameters (logical names) of the slice ``rank`` executes in it."""
    out: dict[int, set[str]] = {}
    for ref, s in iter_slices(plan.waves):
        if rank in executing_devices(plan.metaops[s.metaop], s.devices):
            ids = index.slice_ids(s.metaop, s.layer_start, s.layer_end)
            out.setdefault(ref.wave, set()).update(
                n for k in ids.tolist() for n in members[index.names[k]])
    return out


def _earliest_local_wave(plan: Plan, index: ParameterIndex, rank: int) -> np.ndarray:
    """Per key, the earliest wave in which ``rank`` executes an operator using it (its gradient
    is final here after that wave's backward; ``len(waves)`` where it never does)."""
    earliest = np.full(len(index), len(plan.waves), dtype=np.int64)
    for ref, s in iter_slices(plan.waves):
        if rank in executing_devices(plan.metaops[s.metaop], s.devices):
            ids = index.slice_ids(s.metaop, s.layer_start, s.layer_end)
            earliest[ids] = np.minimum(earliest[ids], ref.wave)
    return earliest
