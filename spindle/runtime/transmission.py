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

:class:`~spindle.runtime.edges.TransmissionSchedule` (pure) says what moves;
:class:`Transmitter` does the communication on one rank.

Chunked transfers (``--transfer-chunks K``, T3's idea in software): from the second iteration
on (every receiver then knows the shapes), a slice is computed in K row chunks
(:meth:`TransmissionSchedule.chunk_bounds`), each chunk's rows ``isend`` as soon as computed
into receives posted at the start of the producers' wave and waited for at the consumers'
boundary; in backward each chunk's input gradients likewise, last chunk first.  Both ends post a
pair's chunked messages in one order (chunk, edge, piece, tensor), one tag per direction.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Mapping, MutableMapping, Sequence

import torch
import torch.distributed as dist

from spindle.plan.layout import Piece, RowRange, SliceRef, ValueKey
from spindle.runtime.edges import Edge, TransmissionSchedule

log = logging.getLogger(__name__)

Activation = tuple[torch.Tensor, ...]

# --- the runtime side -------------------------------------------------------------------------

_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
)
_MAX_TENSORS = 8  # tensors per activation tuple a header can describe
_MAX_DIMS = 6  # trailing dimensions per tensor a header can describe
_HEADER_PER_VALUE = 1 + _MAX_TENSORS * (2 + _MAX_DIMS)
_HEADER_TAG = 1000
_EARLY_TAG = 1100  # chunked messages (forward; + 1 backward), matched in posting order


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
        chunks: int = 1,
        chunk_single: bool = True,
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
        # chunked transfers (module docstring): from the second iteration on (the receivers
        # know every value's shapes), a chunked slice's rows travel as soon as computed
        self.chunks = chunks
        self.chunk_single = chunk_single  # a one-device slice may be computed in chunks
        self.iteration = 0
        self._early_in: dict[tuple[int, bool], list[tuple[Piece, int, torch.Tensor,
                                                          dist.Work]]] = {}
        self._early_out: list[tuple[dist.Work, torch.Tensor]] = []

    def routes(self, wave: int) -> WaveRoutes:
        if wave not in self._routes:
            self._routes[wave] = WaveRoutes.of(self.schedule.into_wave.get(wave, ()), self.rank)
        return self._routes[wave]

    # -- chunked transfers --------------------------------------------------------------------
    @property
    def chunking(self) -> bool:
        """Whether this iteration computes and sends slices in chunks (from the second on)."""
        return self.chunks > 1 and self.iteration >= 2

    def chunk_rows(self, ref: SliceRef, rank: int | None = None) -> list[RowRange] | None:
        """The chunks (batch rows) ``rank``'s rows of slice ``ref`` are computed and sent in
        this iteration, or None (the same answer on every rank)."""
        if not self.chunking:
            return None
        s = self.schedule.plan.waves[ref.wave].slices[ref.index]
        if s.n == 1 and not self.chunk_single:
            return None
        return self.schedule.chunk_bounds(ref, self.rank if rank is None else rank, self.chunks)

    def _sub_pieces(self, e: Edge, p: Piece, backward: bool
                    ) -> list[tuple[int, Piece]] | None:
        """``p`` cut at the chunks of the rank that sends it (forward: the producer's rows,
        backward: the consumer's), as (chunk, piece); None when that slice is not chunked."""
        ref, rank = (e.consumer, p.dst) if backward else (e.producer, p.src)
        bounds = self.chunk_rows(ref, rank)
        if bounds is None:
            return None
        out = []
        for c, b in enumerate(bounds):
            rows = p.rows.overlap(b)
            if rows is not None:
                out.append((c, Piece(p.src, p.dst, rows, p.src_rows, p.dst_rows)))
        return out

    def _early_items(self, e: Edge, backward: bool) -> list[tuple[int, Piece, int]]:
        """(chunk, piece, tensor) of every message of edge ``e`` that travels chunk by chunk,
        in the order both ends post them (chunk, piece, tensor; backward: chunks last first)."""
        specs = self._specs.get(e.value)
        if specs is None or (backward and not e.grad):
            return []
        out = []
        for p in e.pieces:
            if p.is_local or self.rank not in (p.src, p.dst):
                continue
            subs = self._sub_pieces(e, p, backward)
            for c, sub in subs or ():
                out += [(c, sub, i) for i, spec in enumerate(specs)
                        if not backward or spec.carries_grad]
        return out

    def post_receives(self, edges: Sequence[Edge], backward: bool) -> None:
        """Post this rank's receives of ``edges``' chunked messages (forward: at the start of
        the producers' wave; backward: before the consumers' backward)."""
        if not self.chunking:
            return
        items = [(c, e, sub, i) for e in edges for c, sub, i in self._early_items(e, backward)]
        # the senders' order: chunk by chunk (stable: edges, pieces, tensors within one)
        for _, e, sub, i in sorted(items, key=lambda x: -x[0] if backward else x[0]):
            peer = sub.dst if backward else sub.src
            if peer == self.rank:
                continue
            spec = self._specs[e.value][i]
            buf = torch.empty((sub.rows.size, *spec.trailing), dtype=spec.dtype,
                              device=self.device)
            work = dist.irecv(buf, peer, self.group, _EARLY_TAG + backward)
            assert work is not None
            self._early_in.setdefault((e.id, backward), []).append((sub, i, buf, work))

    def send_chunk(self, edges: Sequence[Edge], chunk: int, rows: RowRange,
                   tensors: Callable[[Edge], Sequence[torch.Tensor | None]],
                   backward: bool) -> None:
        """Send chunk ``chunk`` (batch rows ``rows``, held as ``tensors(edge)``: one per tensor
        of the value, rows ``rows`` only; None: a zero gradient) of every edge in ``edges``."""
        sent = 0
        for e in edges:
            for c, sub, i in self._early_items(e, backward):
                peer = sub.src if backward else sub.dst
                if c != chunk or peer == self.rank:
                    continue
                t = tensors(e)[i]
                at = slice(sub.rows.start - rows.start, sub.rows.end - rows.start)
                if t is None:
                    spec = self._specs[e.value][i]
                    part = torch.zeros((sub.rows.size, *spec.trailing), dtype=spec.dtype,
                                       device=self.device)
                else:  # a copy: later chunks' backward may still write the gradient buffer
                    part = t[at].clone() if backward else t[at].contiguous()
                sent += part.numel() * part.element_size()
                work = dist.isend(part, peer, self.group, _EARLY_TAG + backward)
                assert work is not None
                self._early_out.append((work, part))
        if backward:
            self.counters.backward_bytes += sent
        else:
            self.counters.forward_bytes += sent

    def _early_received(self, edges: Sequence[Edge], backward: bool
                        ) -> list[tuple[Edge, Piece, int, torch.Tensor]]:
        """Wait for the chunked messages of ``edges`` (and for this rank's own sends)."""
        out = []
        for e in edges:
            for sub, i, buf, work in self._early_in.pop((e.id, backward), ()):
                self._wait_work(work)
                out.append((e, sub, i, buf))
        while self._early_out:
            self._wait_work(self._early_out.pop(0)[0])
        return out

    def _wait_work(self, work: dist.Work) -> None:
        """Wait for one request, at most the timeout (then fail: a peer stopped answering)."""
        if self._timeout is None:
            work.wait()
        elif not work.wait(self._timeout):
            raise TimeoutError(f"no answer from a peer within"
                               f" {self._timeout.total_seconds():.0f} s")

    # -- forward ------------------------------------------------------------------------------
    def forward(self, wave: int, produced: Mapping[ValueKey, Activation]) -> dict[int, Activation]:
        """Run the boundary before ``wave``: returns edge id -> this rank's rows of the value,
        for every edge into ``wave`` whose consumer runs on this rank.  ``produced`` holds this
        rank's rows of every value it computed so far."""
        if wave == 0:
            self.iteration += 1
        routes = self.routes(wave)
        for value, act in produced.items():
            self._specs.setdefault(value, _spec_of(act))
        if wave not in self._headers_done:
            self._exchange_headers(routes, produced)
            self._headers_done.add(wave)

        def payload(item: _Item) -> torch.Tensor:
            return produced[item.edge.value][item.tensor][item.piece.src_index()]

        received = self._exchange(
            {q: self._items(self._at_boundary(r, False)) for q, r in routes.to_peer.items()},
            {q: self._items(self._at_boundary(r, False)) for q, r in routes.from_peer.items()},
            payload, backward=False,
        )
        early = self._early_received(self.schedule.into_wave.get(wave, ()), backward=False)
        received += [(_Item(e, sub, i), t) for e, sub, i, t in early]
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
            {q: self._items(self._at_boundary(r, True), grads_only=True)
             for q, r in routes.from_peer.items()},
            {q: self._items(self._at_boundary(r, True), grads_only=True)
             for q, r in routes.to_peer.items()},
            payload, backward=True,
        )
        early = self._early_received(self.schedule.into_wave.get(wave, ()), backward=True)
        received += [(_Item(e, sub, i), t) for e, sub, i, t in early]
        for e, p in routes.local:
            for i, g in enumerate(input_grads[e.id]):
                if g is not None and self._specs[e.value][i].carries_grad:
                    _accumulate(output_grads, produced, e.value, i, p, g[p.dst_index()])
        for item, g in received:
            _accumulate(output_grads, produced, item.edge.value, item.tensor, item.piece, g)

    # -- messages -----------------------------------------------------------------------------
    def _at_boundary(self, routes: Sequence[Route], backward: bool) -> Sequence[Route]:
        """The routes that travel at the boundary: those not sent chunk by chunk."""
        if not self.chunking:
            return routes
        return [(e, p) for e, p in routes if self._sub_pieces(e, p, backward) is None]

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
            self._wait_work(req)

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
