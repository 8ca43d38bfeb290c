"""Transmission: moving activations forward and their gradients backward between waves.

Data moves only at wave boundaries (docs/method.md section 8.2).  A *value* is the output of one
layer of one MetaOp, ``(metaop, layer)``: an activation tuple (batch-first tensors) split over the
rows of the slice that produced it.  An :class:`Edge` connects a value to a slice that reads it:

one edge per value the slice reads (:func:`spindle.plan.layout.slice_inputs`: the carry of its
MetaOp, or the outputs of its producers).  For each edge the rows are re-split from the
producer's layout to the consumer's (:func:`spindle.plan.layout.pieces`): a piece whose two ends
are the same rank is a local view (no communication); the others travel as point-to-point
messages.

At the boundary *before* wave ``w`` the :class:`Transmitter` moves every piece of every edge into
``w`` with one ``dist.batch_isend_irecv`` per boundary: all pieces between two ranks are packed
into one flat buffer per dtype.  Backward is the mirror image: right after the backward of wave
``w``, the gradients of its inputs travel back to the producers' rows and ranks, where gradients
from several consumers of one value are summed.  Receivers learn the trailing shapes and dtypes
of a value from a small fixed-size header the first time a boundary runs; afterwards the cached
shapes are used (the plan and the data shapes are fixed for a run).

:class:`TransmissionSchedule` is pure (no torch.distributed) and is what tests and the byte
accounting inspect; :class:`Transmitter` does the communication on one rank.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Mapping, MutableMapping, Sequence

import torch
import torch.distributed as dist

from spindle.plan.contract import Plan
from spindle.plan.layout import (
    Piece,
    SliceRef,
    ValueKey,
    iter_slices,
    pieces,
    slice_inputs,
    slice_rows,
)

log = logging.getLogger(__name__)

Activation = tuple[torch.Tensor, ...]

# --- the schedule: pure bookkeeping from the plan ----------------------------------------------


@dataclass(frozen=True)
class Edge:
    """Value ``value`` produced by slice ``producer`` and read by slice ``consumer``."""

    id: int
    value: ValueKey
    producer: SliceRef
    consumer: SliceRef
    pieces: tuple[Piece, ...]  # ordered by (dst, rows.start)
    grad: bool = True  # a gradient travels back (False: the producer runs no backward)


@dataclass
class TransmissionSchedule:
    """All edges of a plan, indexed by the wave of their consumer."""

    plan: Plan
    edges: tuple[Edge, ...]
    producer_of: dict[ValueKey, SliceRef]
    into_wave: dict[int, tuple[Edge, ...]] = field(default_factory=dict)
    inputs_of: dict[SliceRef, tuple[Edge, ...]] = field(default_factory=dict)

    @staticmethod
    def build(plan: Plan) -> "TransmissionSchedule":
        producer_of: dict[ValueKey, SliceRef] = {}
        slices = dict(iter_slices(plan.waves))
        for ref, s in slices.items():
            for layer in range(s.layer_start, s.layer_end):
                producer_of[(s.metaop, layer)] = ref
        edges: list[Edge] = []
        for ref, s in slices.items():
            metaop = plan.metaops[s.metaop]
            for value in slice_inputs(plan.metaops, s.metaop, s.layer_start):
                src_ref = producer_of[value]
                src_slice = plan.waves[src_ref.wave].slices[src_ref.index]
                if plan.metaops[value[0]].batch != metaop.batch:
                    raise ValueError(
                        f"MetaOp {s.metaop} (batch {metaop.batch}) reads MetaOp {value[0]}"
                        f" (batch {plan.metaops[value[0]].batch}): batches must match"
                    )
                moves = pieces(slice_rows(plan.metaops[src_slice.metaop], src_slice.devices),
                               slice_rows(metaop, s.devices))
                edges.append(Edge(len(edges), value, src_ref, ref, moves,
                                  plan.metaops[value[0]].backward))
        into: dict[int, list[Edge]] = defaultdict(list)
        inputs: dict[SliceRef, list[Edge]] = defaultdict(list)
        for e in edges:
            into[e.consumer.wave].append(e)
            inputs[e.consumer].append(e)
        return TransmissionSchedule(
            plan, tuple(edges), producer_of,
            {w: tuple(es) for w, es in into.items()},
            {r: tuple(es) for r, es in inputs.items()},
        )

    def remote_rows(self) -> list[tuple[int, int, int, ValueKey]]:
        """``(src, dst, rows, value)`` for every piece that crosses ranks (forward direction)."""
        return [
            (p.src, p.dst, p.rows.size, e.value)
            for e in self.edges for p in e.pieces if not p.is_local
        ]


# --- the runtime side -------------------------------------------------------------------------

_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
)
_MAX_TENSORS = 8  # tensors per activation tuple a header can describe
_MAX_DIMS = 6  # trailing dimensions per tensor a header can describe
_HEADER_PER_VALUE = 1 + _MAX_TENSORS * (2 + _MAX_DIMS)
_HEADER_TAG = 1000


@dataclass(frozen=True)
class TensorSpec:
    """What a receiver must know to hold rows of one tensor of a value."""

    dtype: torch.dtype
    trailing: tuple[int, ...]  # shape without the batch dimension

    @property
    def carries_grad(self) -> bool:
        return self.dtype.is_floating_point


def _spec_of(act: Activation) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(t.dtype, tuple(t.shape[1:])) for t in act)


def _encode_header(specs: Sequence[tuple[TensorSpec, ...]]) -> torch.Tensor:
    out = torch.zeros(len(specs) * _HEADER_PER_VALUE, dtype=torch.int64)
    for v, spec in enumerate(specs):
        if len(spec) > _MAX_TENSORS or any(len(s.trailing) > _MAX_DIMS for s in spec):
            raise ValueError(f"an activation of {len(spec)} tensors does not fit a header")
        base = v * _HEADER_PER_VALUE
        out[base] = len(spec)
        for i, s in enumerate(spec):
            at = base + 1 + i * (2 + _MAX_DIMS)
            out[at] = _DTYPES.index(s.dtype)
            out[at + 1] = len(s.trailing)
            out[at + 2:at + 2 + len(s.trailing)] = torch.tensor(s.trailing, dtype=torch.int64)
    return out


def _decode_header(buf: torch.Tensor, count: int) -> list[tuple[TensorSpec, ...]]:
    vals = buf.tolist()
    specs = []
    for v in range(count):
        base = v * _HEADER_PER_VALUE
        spec = []
        for i in range(int(vals[base])):
            at = base + 1 + i * (2 + _MAX_DIMS)
            ndim = int(vals[at + 1])
            spec.append(TensorSpec(_DTYPES[int(vals[at])],
                                   tuple(int(x) for x in vals[at + 2:at + 2 + ndim])))
        specs.append(tuple(spec))
    return specs


Route = tuple[Edge, Piece]


@dataclass(frozen=True)
class _Item:
    """One tensor of one piece inside a packed message."""

    edge: Edge
    piece: Piece
    tensor: int


@dataclass(frozen=True)
class WaveRoutes:
    """One rank's share of the boundary before a wave.  Lists are in (edge id, row) order,
    which both ends of every message compute alike, so messages need no tags."""

    local: tuple[Route, ...]  # this rank produced and consumes these rows: a view, no message
    to_peer: dict[int, tuple[Route, ...]]  # forward: rows this rank sends to each peer
    from_peer: dict[int, tuple[Route, ...]]  # forward: rows this rank receives from each peer

    @staticmethod
    def of(edges: Sequence[Edge], rank: int) -> "WaveRoutes":
        local: list[Route] = []
        to_peer: dict[int, list[Route]] = defaultdict(list)
        from_peer: dict[int, list[Route]] = defaultdict(list)
        for e in edges:
            for p in e.pieces:
                if p.src == rank and p.dst == rank:
                    local.append((e, p))
                elif p.src == rank:
                    to_peer[p.dst].append((e, p))
                elif p.dst == rank:
                    from_peer[p.src].append((e, p))
        return WaveRoutes(tuple(local), {q: tuple(v) for q, v in to_peer.items()},
                          {q: tuple(v) for q, v in from_peer.items()})


@dataclass
class TransferCounters:
    """Bytes this rank sent to other ranks (payload only, not the one-off headers)."""

    forward_bytes: int = 0
    backward_bytes: int = 0

    @property
    def total(self) -> int:
        return self.forward_bytes + self.backward_bytes

    def reset(self) -> None:
        self.forward_bytes = 0
        self.backward_bytes = 0


class Transmitter:
    """Moves one rank's share of every wave boundary with batched point-to-point messages.

    ``timeout_s`` bounds every wait for a peer, so a rank that stops responding makes this
    rank fail instead of waiting forever.
    """

    def __init__(
        self,
        schedule: TransmissionSchedule,
        rank: int,
        device: torch.device,
        group: dist.ProcessGroup | None = None,
        timeout_s: float | None = None,
    ) -> None:
        self.schedule = schedule
        self.rank = rank
        self.device = device
        self.group = group
        self.counters = TransferCounters()
        self._timeout = timedelta(seconds=timeout_s) if timeout_s else None
        self._specs: dict[ValueKey, tuple[TensorSpec, ...]] = {}
        self._routes: dict[int, WaveRoutes] = {}
        self._headers_done: set[int] = set()  # waves whose forward boundary sent headers

    def routes(self, wave: int) -> WaveRoutes:
        if wave not in self._routes:
            self._routes[wave] = WaveRoutes.of(self.schedule.into_wave.get(wave, ()), self.rank)
        return self._routes[wave]

    # -- forward ------------------------------------------------------------------------------
    def forward(self, wave: int, produced: Mapping[ValueKey, Activation]) -> dict[int, Activation]:
        """Run the boundary before ``wave``: returns edge id -> this rank's rows of the value,
        for every edge into ``wave`` whose consumer runs on this rank.  ``produced`` holds this
        rank's rows of every value it computed so far."""
        routes = self.routes(wave)
        for value, act in produced.items():
            self._specs.setdefault(value, _spec_of(act))
        if wave not in self._headers_done:
            self._exchange_headers(routes, produced)
            self._headers_done.add(wave)

        def payload(item: _Item) -> torch.Tensor:
            return produced[item.edge.value][item.tensor][item.piece.src_index()]

        received = self._exchange(
            {q: self._items(r) for q, r in routes.to_peer.items()},
            {q: self._items(r) for q, r in routes.from_peer.items()},
            payload, backward=False,
        )
        # edge id -> first row of a piece -> the piece's tensors
        parts: dict[int, dict[int, list[torch.Tensor | None]]] = defaultdict(dict)
        for e, p in routes.local:
            parts[e.id][p.rows.start] = [t[p.src_index()] for t in produced[e.value]]
        for item, t in received:
            width = len(self._specs[item.edge.value])
            parts[item.edge.id].setdefault(item.piece.rows.start, [None] * width)[item.tensor] = t
        out: dict[int, Activation] = {}
        for edge_id, by_row in parts.items():
            acts = [by_row[r] for r in sorted(by_row)]
            out[edge_id] = tuple(
                ts[0] if len(ts) == 1 else torch.cat(ts, dim=0)
                for ts in zip(*acts)
            )
        return out

    # -- backward -----------------------------------------------------------------------------
    def backward(
        self,
        wave: int,
        input_grads: Mapping[int, Sequence[torch.Tensor | None]],
        produced: Mapping[ValueKey, Activation],
        output_grads: MutableMapping[ValueKey, list[torch.Tensor | None]],
    ) -> None:
        """Run the backward boundary after ``wave``: send the gradients of this rank's inputs in
        ``wave`` (``input_grads``: edge id -> one gradient per tensor, None when it got none)
        back to the producers' rows, and add the gradients arriving for this rank's outputs
        into ``output_grads`` (value -> one gradient per tensor of ``produced[value]``)."""
        routes = self.routes(wave)

        def payload(item: _Item) -> torch.Tensor:
            g = input_grads[item.edge.id][item.tensor]
            if g is None:  # the consumer did not use this tensor: its gradient is zero
                spec = self._specs[item.edge.value][item.tensor]
                return torch.zeros((item.piece.rows.size, *spec.trailing), dtype=spec.dtype,
                                   device=self.device)
            return g[item.piece.dst_index()]

        # gradients travel the forward routes backwards: to the producers, from the consumers
        received = self._exchange(
            {q: self._items(r, grads_only=True) for q, r in routes.from_peer.items()},
            {q: self._items(r, grads_only=True) for q, r in routes.to_peer.items()},
            payload, backward=True,
        )
        for e, p in routes.local:
            for i, g in enumerate(input_grads[e.id]):
                if g is not None and self._specs[e.value][i].carries_grad:
                    _accumulate(output_grads, produced, e.value, i, p, g[p.dst_index()])
        for item, g in received:
            _accumulate(output_grads, produced, item.edge.value, item.tensor, item.piece, g)

    # -- messages -----------------------------------------------------------------------------
    def _items(self, routes: Sequence[Route], grads_only: bool = False) -> list[_Item]:
        return [
            _Item(e, p, i)
            for e, p in routes
            for i, spec in enumerate(self._specs[e.value])
            if not grads_only or (spec.carries_grad and e.grad)
        ]

    def _wait(self, ops: list[dist.P2POp]) -> None:
        if not ops:
            return
        for req in dist.batch_isend_irecv(ops):
            if self._timeout is None:
                req.wait()
            elif not req.wait(self._timeout):
                raise TimeoutError(f"no answer from a peer within"
                                   f" {self._timeout.total_seconds():.0f} s")

    def _exchange_headers(
        self, routes: WaveRoutes, produced: Mapping[ValueKey, Activation]
    ) -> None:
        """Tell each receiver the dtypes and trailing shapes of the values it will get."""
        ops: list[dist.P2POp] = []
        inbox: list[tuple[list[ValueKey], torch.Tensor]] = []
        for q in sorted(set(routes.to_peer) | set(routes.from_peer)):
            if q in routes.to_peer:
                specs = [_spec_of(produced[e.value]) for e, _ in routes.to_peer[q]]
                header = _encode_header(specs).to(self.device)
                ops.append(dist.P2POp(dist.isend, header, q, self.group, _HEADER_TAG))
            if q in routes.from_peer:
                values = [e.value for e, _ in routes.from_peer[q]]
                buf = torch.empty(len(values) * _HEADER_PER_VALUE, dtype=torch.int64,
                                  device=self.device)
                inbox.append((values, buf))
                ops.append(dist.P2POp(dist.irecv, buf, q, self.group, _HEADER_TAG))
        self._wait(ops)
        for values, buf in inbox:
            for value, spec in zip(values, _decode_header(buf.cpu(), len(values))):
                self._specs[value] = spec

    def _exchange(
        self,
        outgoing: Mapping[int, list[_Item]],
        incoming: Mapping[int, list[_Item]],
        payload: Callable[[_Item], torch.Tensor],
        backward: bool,
    ) -> list[tuple[_Item, torch.Tensor]]:
        """One batched round: for each peer and dtype, one packed buffer each way.  Returns
        every incoming item with its tensor (a view of the received buffer)."""
        ops: list[dist.P2POp] = []
        unpack: list[tuple[list[_Item], torch.Tensor]] = []
        sent = 0
        for q in sorted(set(outgoing) | set(incoming)):
            for code, dtype in enumerate(_DTYPES):
                out = [payload(it) for it in outgoing.get(q, ()) if self._dtype(it) == dtype]
                if out:
                    flat = torch.cat([t.reshape(-1) for t in out]).contiguous()
                    sent += flat.numel() * flat.element_size()
                    ops.append(dist.P2POp(dist.isend, flat, q, self.group, code))
                into = [it for it in incoming.get(q, ()) if self._dtype(it) == dtype]
                if into:
                    buf = torch.empty(sum(self._numel(it) for it in into), dtype=dtype,
                                      device=self.device)
                    unpack.append((into, buf))
                    ops.append(dist.P2POp(dist.irecv, buf, q, self.group, code))
        self._wait(ops)
        if backward:
            self.counters.backward_bytes += sent
        else:
            self.counters.forward_bytes += sent
        received: list[tuple[_Item, torch.Tensor]] = []
        for items, buf in unpack:
            at = 0
            for it in items:
                n = self._numel(it)
                spec = self._specs[it.edge.value][it.tensor]
                received.append((it, buf[at:at + n].view(it.piece.rows.size, *spec.trailing)))
                at += n
        return received

    def _dtype(self, item: _Item) -> torch.dtype:
        return self._specs[item.edge.value][item.tensor].dtype

    def _numel(self, item: _Item) -> int:
        spec = self._specs[item.edge.value][item.tensor]
        return item.piece.rows.size * math.prod(spec.trailing)


def _accumulate(
    output_grads: MutableMapping[ValueKey, list[torch.Tensor | None]],
    produced: Mapping[ValueKey, Activation],
    value: ValueKey,
    tensor: int,
    piece: Piece,
    grad: torch.Tensor,
) -> None:
    """Add ``grad`` (the gradient of ``piece``'s rows) into the producer's gradient buffer."""
    acc = output_grads.setdefault(value, [None] * len(produced[value]))
    buf = acc[tensor]
    if buf is None:
        buf = acc[tensor] = torch.zeros_like(produced[value][tensor])
    buf[piece.src_index()] += grad
