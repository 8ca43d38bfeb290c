"""The transmission schedule: which rows of which value every slice reads, and from where.

Pure bookkeeping from the plan (no torch.distributed), what :mod:`spindle.runtime.transmission`
moves and what tests and the byte accounting inspect.  A *value* is the output of one layer of
one MetaOp, ``(metaop, layer)``; an :class:`Edge` connects a value to a slice that reads it (one
per value the slice reads: :func:`spindle.plan.layout.slice_inputs`), with the pieces its rows
travel in from the producer's layout to the consumer's (:func:`spindle.plan.layout.pieces`).
:meth:`TransmissionSchedule.chunk_bounds` cuts a rank's rows of a slice into the chunks that
chunked transfers compute and send one by one.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from spindle.plan.contract import Plan
from spindle.plan.layout import (
    Piece,
    RowRange,
    SliceRef,
    ValueKey,
    chunk_ranges,
    iter_slices,
    pieces,
    slice_inputs,
    slice_rows,
)


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
    outputs_of: dict[SliceRef, tuple[Edge, ...]] = field(default_factory=dict)

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
        outputs: dict[SliceRef, list[Edge]] = defaultdict(list)
        for e in edges:
            into[e.consumer.wave].append(e)
            inputs[e.consumer].append(e)
            outputs[e.producer].append(e)
        return TransmissionSchedule(
            plan, tuple(edges), producer_of,
            {w: tuple(es) for w, es in into.items()},
            {r: tuple(es) for r, es in inputs.items()},
            {r: tuple(es) for r, es in outputs.items()},
        )

    def chunk_bounds(self, ref: SliceRef, rank: int, chunks: int) -> list[RowRange] | None:
        """The batch rows of each of ``chunks`` chunks of ``rank``'s rows of slice ``ref``
        (None where the slice is not computed in chunks: a loss, fewer rows than chunks)."""
        s = self.plan.waves[ref.wave].slices[ref.index]
        metaop = self.plan.metaops[s.metaop]
        mine = [r for d, r in slice_rows(metaop, s.devices) if d == rank]
        return chunk_ranges(metaop, mine[0], chunks) if mine else None

    def remote_rows(self) -> list[tuple[int, int, int, ValueKey]]:
        """``(src, dst, rows, value)`` for every piece that crosses ranks (forward direction)."""
        return [
            (p.src, p.dst, p.rows.size, e.value)
            for e in self.edges for p in e.pieces if not p.is_local
        ]
