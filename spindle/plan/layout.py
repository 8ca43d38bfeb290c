"""The layout rules of a plan, read alike by the simulator, the memory model and the runtime.

Everything here follows from the plan alone (no torch):

* **Rows.**  A slice of a MetaOp with batch ``B`` on an ordered group of ``n`` devices is data
  parallel: member ``k`` holds rows ``[k*B/n, (k+1)*B/n)`` (:func:`slice_rows`).  A contrastive
  loss couples every pair of samples, so it runs on the first device of its group with the
  whole batch and the others idle (:func:`executing_devices`).
* **Slice inputs.**  A slice reads the output of the previous layer of its MetaOp when it starts
  inside the chain, else the last-layer output of every producer MetaOp (:func:`slice_inputs`).
  A *value* is ``(metaop, layer)``: the output of that layer, wherever it was computed.
* **Re-splitting.**  Between two slices the rows move from the producer's layout to the
  consumer's: every non-empty overlap of a producer device's rows with a consumer device's rows
  is a :class:`Piece` (a local view when both ends are the same device, a message otherwise).
* **Parameters.**  A :class:`ParameterIndex` numbers the parameter *keys* every operator uses
  (module paths for the cost models and the runtime alike).  A key's device group is every device
  that executes an operator using it; its *ready wave* is the earliest wave using it (backward
  runs the waves in reverse, so its gradient is final after that wave's backward)
  (:func:`parameter_use`).  Keys with the same group form a pool.
  Inside its ready wave a key is final once the backward has passed its layer: its *ready
  fraction* is the share of its slice's layers run by then (:func:`ready_fractions`).
* **Sync buckets.**  Each pool's keys (pools by size, then devices), by ready point (descending
  ready wave, ascending ready fraction) then name, are cut into buckets of at most
  ``bucket_bytes`` that also end where the ready wave changes once they hold
  ``min_bucket_bytes`` (DDP's bucket cap and its small first bucket), all buckets then by ready
  point (:func:`sync_buckets`): the order every rank launches them in, and the simulator models.
* **ZeRO.**  The plan's per-MetaOp stage applies to whole pools (:func:`zero_stages`): a sharded
  pool's buckets are reduce-scattered over its group instead of all-reduced, each member steps
  AdamW on its contiguous 1/|D| of every bucket, and the updated shards are all-gathered after
  the step.  At stage 2 a bucket is reduce-scattered after the backward of every wave that
  computes its gradients (:func:`scatter_waves`) and the gradients freed, as ZeRO-2 does per
  micro-batch.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from spindle.declare.workload import LayerRef
from spindle.plan.contract import MetaOp, Plan, Slice, Wave

K = TypeVar("K")
ValueKey = tuple[int, int]
"""``(metaop, layer)``: the output of ``layer`` of ``metaop``, wherever it was computed."""

SYNC_BUCKET_BYTES = 25 * 1024 * 1024  # DDP's bucket_cap_mb
SYNC_MIN_BUCKET_BYTES = 1024 * 1024  # DDP's first bucket: the sync starts early in backward


# --- rows ---------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class RowRange:
    """Rows ``[start, end)`` of a MetaOp's batch."""

    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start

    def overlap(self, other: "RowRange") -> "RowRange | None":
        lo, hi = max(self.start, other.start), min(self.end, other.end)
        return RowRange(lo, hi) if lo < hi else None


def executing_devices(metaop: MetaOp, devices: tuple[int, ...]) -> tuple[int, ...]:
    """The devices that run a slice of ``metaop`` on group ``devices``: all of them, or for a
    contrastive loss only the first, with the whole batch."""
    return devices[:1] if metaop.is_loss else devices


def local_rows(metaop: MetaOp, n: int) -> int:
    """Rows each executing device of an ``n``-device slice of ``metaop`` holds."""
    return metaop.batch if metaop.is_loss else metaop.batch // n


def chunk_ranges(metaop: MetaOp, rows: RowRange, chunks: int) -> list[RowRange] | None:
    """``rows`` of a slice of ``metaop`` cut into ``chunks`` chunks (the runtime's
    ``--transfer-chunks``), or None where the slice is not computed in chunks: one chunk, a
    contrastive loss (its batch is coupled), fewer rows than chunks."""
    if chunks <= 1 or metaop.is_loss or rows.size < chunks:
        return None
    lo, n = rows.start, rows.size
    return [RowRange(lo + c * n // chunks, lo + (c + 1) * n // chunks) for c in range(chunks)]


@functools.lru_cache(maxsize=4096)
def row_ranges(batch: int, n: int) -> tuple[RowRange, ...]:
    """The rows of each of ``n`` members of a data-parallel group over ``batch`` samples:
    member ``k`` holds ``[k*batch/n, (k+1)*batch/n)``."""
    per = batch // n
    return tuple(RowRange(k * per, (k + 1) * per) for k in range(n))


def slice_rows(metaop: MetaOp, devices: tuple[int, ...]) -> tuple[tuple[int, RowRange], ...]:
    """``(device, rows)`` for every device that executes a slice of ``metaop`` on ``devices``,
    in group order."""
    ranks = executing_devices(metaop, devices)
    return tuple(zip(ranks, row_ranges(metaop.batch, len(ranks))))


@dataclass(frozen=True)
class Piece:
    """Rows ``rows`` of a value that move from device ``src`` (holding ``src_rows``) to device
    ``dst`` (which needs ``dst_rows``); ``rows`` is their overlap, in batch coordinates."""

    src: int
    dst: int
    rows: RowRange
    src_rows: RowRange
    dst_rows: RowRange

    @property
    def is_local(self) -> bool:
        return self.src == self.dst

    def src_index(self) -> slice:
        """Where the rows sit in the producer's local tensor."""
        return slice(self.rows.start - self.src_rows.start, self.rows.end - self.src_rows.start)

    def dst_index(self) -> slice:
        """Where the rows sit in the consumer's local tensor."""
        return slice(self.rows.start - self.dst_rows.start, self.rows.end - self.dst_rows.start)


def pieces(
    producer: Sequence[tuple[int, RowRange]], consumer: Sequence[tuple[int, RowRange]]
) -> tuple[Piece, ...]:
    """Every overlap of a producer device's rows with a consumer device's rows, ordered by
    (consumer device, first row)."""
    return _pieces(tuple(producer), tuple(consumer))


@functools.lru_cache(maxsize=65536)
def _pieces(
    producer: tuple[tuple[int, RowRange], ...], consumer: tuple[tuple[int, RowRange], ...]
) -> tuple[Piece, ...]:
    # both sides hold ascending, disjoint row ranges (row_ranges): a consumer range meets the
    # producer ranges from the last one starting at or before it, found by bisection
    starts = [rows.start for _, rows in producer]
    out = []
    for dst, dst_rows in consumer:
        k = max(bisect.bisect_right(starts, dst_rows.start) - 1, 0)
        while k < len(producer) and producer[k][1].start < dst_rows.end:
            src, src_rows = producer[k]
            rows = src_rows.overlap(dst_rows)
            if rows is not None:
                out.append(Piece(src, dst, rows, src_rows, dst_rows))
            k += 1
    out.sort(key=lambda p: (p.dst, p.rows.start))
    return tuple(out)


# --- slices and their inputs ----------------------------------------------------------------------


@dataclass(frozen=True)
class SliceRef:
    """Where a slice sits in the plan: ``plan.waves[wave].slices[index]``."""

    wave: int
    index: int


def iter_slices(waves: Sequence[Wave]) -> Iterator[tuple[SliceRef, Slice]]:
    for wi, wave in enumerate(waves):
        for si, s in enumerate(wave.slices):
            yield SliceRef(wi, si), s


def slice_inputs(
    metaops: Sequence[MetaOp], metaop: int, layer_start: int
) -> tuple[ValueKey, ...]:
    """The values a slice of ``metaop`` starting at ``layer_start`` reads: the previous layer's
    output of its MetaOp when it starts inside the chain, else the last-layer output of each
    producer MetaOp."""
    if layer_start > 0:
        return ((metaop, layer_start - 1),)
    return tuple((d, metaops[d].num_layers - 1) for d in metaops[metaop].deps)


def value_elements(metaops: Sequence[MetaOp], value: ValueKey) -> float:
    """Elements per sample of ``value``: a MetaOp's output after its last layer, else the
    hidden states (and memory) passed inside the chain."""
    m = metaops[value[0]]
    if value[1] == m.num_layers - 1:
        return m.cost.out_elements_per_sample
    return m.cost.act_elements_per_sample


def slice_layers(metaops: Sequence[MetaOp], s: Slice) -> tuple[LayerRef, ...]:
    """The operators slice ``s`` runs."""
    return metaops[s.metaop].layers[s.layer_start:s.layer_end]


# --- parameters ---------------------------------------------------------------------------------


class ParameterIndex:
    """Integer ids and sizes (elements) of the parameter keys every operator of ``metaops`` uses,
    per (MetaOp, layer); ``keys_of(operator)`` names an operator's keys and their sizes.

    ``grad_sizes`` are the elements of each key that train (``trainable_of(key)``; all of them
    by default): only those have gradients, optimizer state and a sync.  ``sizes`` count every
    element (the weights a device holds)."""

    def __init__(self, metaops: Sequence[MetaOp],
                 keys_of: Callable[[LayerRef], Mapping[str, int]],
                 trainable_of: Callable[[str], int] | None = None) -> None:
        ids: dict[str, int] = {}
        sizes: list[int] = []
        self.layer_ids: list[list[np.ndarray]] = []
        for m in metaops:
            per_layer = []
            for ref in m.layers:
                row = []
                for name, count in keys_of(ref).items():
                    if name not in ids:
                        ids[name] = len(sizes)
                        sizes.append(count)
                    row.append(ids[name])
                per_layer.append(np.asarray(row, dtype=np.int64))
            self.layer_ids.append(per_layer)
        self.names = list(ids)
        self.ids = ids
        self.sizes = np.asarray(sizes, dtype=np.float64)
        self.grad_sizes = self.sizes if trainable_of is None else np.asarray(
            [trainable_of(name) for name in self.names], dtype=np.float64)
        self._cache: dict[tuple[int, int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.names)

    def slice_ids(self, metaop: int, layer_start: int, layer_end: int) -> np.ndarray:
        key = (metaop, layer_start, layer_end)
        got = self._cache.get(key)
        if got is None:
            got = np.unique(np.concatenate(self.layer_ids[metaop][layer_start:layer_end]))
            self._cache[key] = got
        return got


def parameter_use(plan: Plan, index: ParameterIndex) -> tuple[np.ndarray, np.ndarray]:
    """For every key of ``index``: which devices hold it (``[keys, devices]`` booleans; a
    contrastive-loss slice counts only its executing device) and its ready wave (-1 if unused)."""
    holds = np.zeros((len(index), plan.num_devices), dtype=bool)
    ready = np.full(len(index), -1, dtype=np.int64)
    for ref, s in iter_slices(plan.waves):
        ids = index.slice_ids(s.metaop, s.layer_start, s.layer_end)
        ready[ids[ready[ids] < 0]] = ref.wave
        for d in executing_devices(plan.metaops[s.metaop], s.devices):
            holds[ids, d] = True
    return holds, ready


def parameter_pools(holds: np.ndarray) -> dict[tuple[int, ...], list[int]]:
    """Device group -> the keys held by exactly those devices (docs/method.md section 8.3's pools
    D -> {W}), in the order of their first key; keys in id order."""
    used = np.flatnonzero(holds.any(axis=1))
    if not len(used):
        return {}
    # one row of bits per key: keys with equal rows share a group
    packed = np.packbits(holds[used], axis=1)
    _, first, inverse = np.unique(packed, axis=0, return_index=True, return_inverse=True)
    by_group = np.split(used[np.argsort(inverse.reshape(-1), kind="stable")],
                        np.cumsum(np.bincount(inverse.reshape(-1)))[:-1])
    pools: dict[tuple[int, ...], list[int]] = {}
    for g in np.argsort(first, kind="stable").tolist():
        members = by_group[g]
        pools[tuple(np.flatnonzero(holds[members[0]]).tolist())] = members.tolist()
    return pools


def zero_stages(index: ParameterIndex, zero: Mapping[int, int], holds: np.ndarray
                ) -> np.ndarray:
    """Every key's ZeRO stage under a per-MetaOp choice ``zero`` (:attr:`Plan.zero`): one rule,
    used by the runtime, the memory model and the simulator alike.  A pool (the keys of one
    device group ``holds`` gives) is sharded as a whole, at the highest stage any MetaOp using
    one of its keys asks for; keys held by one device only (nothing to shard over) get 0."""
    stage = metaop_stages(index, zero)
    if stage.any():
        for group, ids in parameter_pools(holds).items():
            stage[ids] = int(stage[ids].max()) if len(group) > 1 else 0
    return stage


def scatter_waves(plan: Plan, index: ParameterIndex, keys: Sequence[int],
                  use: np.ndarray | None = None) -> tuple[int, ...]:
    """The waves whose backward computes gradients of some of ``keys`` (descending: backward
    order).  ZeRO-2 reduce-scatters a sharded bucket after each of them and frees its gradients,
    so a full gradient lives only through one wave's backward.  ``use``: the plan's
    :func:`wave_use`, when already known."""
    use = wave_use(plan, index) if use is None else use
    hit = use[np.asarray(keys, dtype=np.int64)].any(axis=0)
    return tuple(int(w) for w in np.flatnonzero(hit)[::-1])


def wave_use(plan: Plan, index: ParameterIndex) -> np.ndarray:
    """``[keys, waves]``: whether some slice of the wave uses the key."""
    use = np.zeros((len(index), len(plan.waves)), dtype=bool)
    for ref, s in iter_slices(plan.waves):
        use[index.slice_ids(s.metaop, s.layer_start, s.layer_end), ref.wave] = True
    return use


def metaop_stages(index: ParameterIndex, zero: Mapping[int, int]) -> np.ndarray:
    """Per key, the highest stage of the MetaOps using it (before the pool rule of
    :func:`zero_stages`); cached on the index per choice (a copy is returned)."""
    key = tuple(sorted((m, st) for m, st in zero.items() if st))
    cache = index.__dict__.setdefault("_stage_cache", {})
    stage = cache.get(key)
    if stage is None:
        stage = np.zeros(len(index), dtype=np.int64)
        for m, st in key:
            for ids in index.layer_ids[m]:
                stage[ids] = np.maximum(stage[ids], st)
        if len(cache) >= 256:  # a planning run tries a few dozen choices; never unbounded
            cache.clear()
        cache[key] = stage
    return stage.copy()


# --- sync buckets -------------------------------------------------------------------------------


def ready_fractions(plan: Plan, index: ParameterIndex, ready: np.ndarray) -> np.ndarray:
    """For every key, how far into the backward of its ready wave its gradient is final, as a
    fraction of its slice's layers: a slice runs backward from its last layer down, so a key of
    layer ``j`` of a slice over ``[start, end)`` is final after ``end - j`` of its ``end - start``
    layers (the largest such fraction over the ready wave's slices that use it).  Unused keys
    get 1."""
    fraction = np.zeros(len(index), dtype=np.float64)
    for ref, s in iter_slices(plan.waves):
        span = s.layer_end - s.layer_start
        for j in range(s.layer_start, s.layer_end):
            ids = index.layer_ids[s.metaop][j]
            ids = ids[ready[ids] == ref.wave]
            if len(ids):
                fraction[ids] = np.maximum(fraction[ids], (s.layer_end - j) / span)
    fraction[fraction == 0] = 1.0
    return fraction


def sync_bucket_runs(
    items: Sequence[tuple[K, tuple[int, float], float]],
    bucket_bytes: float = SYNC_BUCKET_BYTES,
    min_bucket_bytes: float = SYNC_MIN_BUCKET_BYTES,
) -> list[list[K]]:
    """One pool's keys ``(key, (ready wave, ready fraction), nbytes)`` in launch order cut into
    buckets: a bucket ends before a key that would take it past ``bucket_bytes``, or, once it
    holds ``min_bucket_bytes``, before one with another ready wave.  Inside a wave buckets fill
    up to ``bucket_bytes`` (as DDP's do: a bucket per layer would pay a collective's latency per
    layer); ``min_bucket_bytes`` 0 cuts at every ready point (the most buckets)."""
    buckets: list[list[K]] = []
    current: list[K] = []
    size = 0.0
    previous: tuple[int, float] | None = None
    for key, point, nbytes in items:
        moved = previous is not None and (point[0] != previous[0] if min_bucket_bytes > 0
                                          else point != previous)
        if current and (size + nbytes > bucket_bytes
                        or (size >= min_bucket_bytes and moved)):
            buckets.append(current)
            current, size = [], 0.0
        current.append(key)
        size += nbytes
        previous = point
    if current:
        buckets.append(current)
    return buckets


@dataclass(frozen=True)
class SyncBucket:
    """Gradients all-reduced together inside ``group``: the keys ``keys`` (ids of a
    :class:`ParameterIndex`), ``nbytes`` in all, final on every device of the group once the
    backward of ``ready_wave`` has run ``ready_fraction`` of its slices' layers."""

    group: tuple[int, ...]
    keys: tuple[int, ...]
    nbytes: float
    ready_wave: int
    ready_fraction: float = 1.0
    stage: int = 0  # ZeRO: 0 all-reduce; 1/2 reduce-scatter, and all-gather after the step


def sync_buckets(
    index: ParameterIndex, holds: np.ndarray, ready: np.ndarray, element_bytes: float,
    bucket_bytes: float = SYNC_BUCKET_BYTES, min_bucket_bytes: float = SYNC_MIN_BUCKET_BYTES,
    fraction: np.ndarray | None = None, stage: np.ndarray | None = None,
) -> list[SyncBucket]:
    """Every pool of more than one device cut into buckets (module docstring), in launch order.
    ``ready`` all 0 means every gradient is final only after the whole backward; ``fraction``
    (:func:`ready_fractions`) places a key inside its ready wave's backward (None: at its end,
    the wave-granular sync); ``stage`` (:func:`zero_stages`) marks the sharded pools' buckets.
    The launch order is by ready point: descending ready wave, then ascending fraction; the
    same on every rank."""
    out: list[SyncBucket] = []
    waves = ready.tolist()
    frac = [1.0] * len(waves) if fraction is None else fraction.tolist()
    pools = parameter_pools(holds)
    for group in sorted(pools, key=lambda g: (len(g), g)):
        # keys with nothing to train have no gradient to sync
        ids = [i for i in pools[group] if index.grad_sizes[i] > 0]
        if len(group) < 2 or not ids:
            continue
        ordered = sorted(ids, key=lambda i: (-waves[i], frac[i], index.names[i]))
        nbytes = {i: float(index.grad_sizes[i]) * element_bytes for i in ordered}
        # ZeRO-2 reduce-scatters a bucket after every wave using any of its keys: a bucket per
        # ready point, so that it holds keys the same waves use
        sharded = stage is not None and int(stage[ids[0]]) >= 2
        for run in sync_bucket_runs([(i, (waves[i], frac[i]), nbytes[i]) for i in ordered],
                                    bucket_bytes, 0 if sharded else min_bucket_bytes):
            # the last key is final last: the lowest wave, and in it the largest fraction
            out.append(SyncBucket(group, tuple(run), sum(nbytes[i] for i in run),
                                  waves[run[-1]], frac[run[-1]],
                                  0 if stage is None else int(stage[run[0]])))
    out.sort(key=lambda b: (-b.ready_wave, b.ready_fraction))  # stable: pools in order
    return out


def pool_sizes(plan: Plan, index: ParameterIndex, holds: np.ndarray | None = None
               ) -> dict[tuple[int, ...], float]:
    """Device group -> trainable parameters held by exactly those devices (the runtime's pools
    D -> {W}, docs/method.md section 8.3: what the sync all-reduces and the optimizer steps).  A
    contrastive-loss slice counts only its executing device.  ``holds``: the plan's
    :func:`parameter_use` holdings, when already known."""
    if holds is None:
        holds, _ = parameter_use(plan, index)
    return {group: float(index.grad_sizes[ids].sum())
            for group, ids in parameter_pools(holds).items()}


def inter_wave_transfers(plan: Plan) -> list[list[tuple[int, int, float]]]:
    """For each wave, the forward transfers into it: ``(src_device, dst_device, elements)`` for
    every row range that moves between two different devices (the runtime's pieces,
    :func:`pieces`)."""
    metaops = plan.metaops
    producer_rows: dict[int, tuple] = {}  # MetaOp -> rows of its latest slice
    out: list[list[tuple[int, int, float]]] = []
    for wave in plan.waves:
        moves: list[tuple[int, int, float]] = []
        for s in wave.slices:
            m = metaops[s.metaop]
            dst = slice_rows(m, s.devices)
            for value in slice_inputs(metaops, s.metaop, s.layer_start):
                per_sample = value_elements(metaops, value)
                if per_sample <= 0:
                    continue
                # producer-major, the order the per-device sums were always taken in
                for p in sorted(pieces(producer_rows[value[0]], dst),
                                key=lambda p: (p.src_rows.start, p.rows.start)):
                    if not p.is_local:
                        moves.append((p.src, p.dst, p.rows.size * per_sample))
        for s in wave.slices:
            producer_rows[s.metaop] = slice_rows(metaops[s.metaop], s.devices)
        out.append(moves)
    return out


def predicted_send_bytes(plan: Plan, element_bytes: int) -> float:
    """Bytes sent between different devices in one iteration, forward activations plus the
    same volume of gradients in backward, with ``element_bytes`` per element (4 for the fp32 CPU
    runtime).  Local copies (same device) are not counted.  The runtime moves the same pieces,
    so its measured bytes sent must equal this."""
    return 2.0 * element_bytes * sum(e for moves in inter_wave_transfers(plan)
                                     for _, _, e in moves)
