"""Execution: one training iteration of a plan on one rank (docs/method.md section 8.4).

:class:`WaveExecutor` runs the forward waves in order and the backward waves in reverse:

* forward, wave ``w``: the :class:`~spindle.runtime.transmission.Transmitter` delivers this
  rank's rows of every value its slice reads; each arriving tensor becomes a *leaf* (detached
  from the sender, ``requires_grad``), the slice's operators run the rank's modules with
  :func:`spindle.layers.chain.run_chain`, and the slice's output (an activation tuple, or a
  loss scalar) is kept;
* backward, wave ``w``: ``torch.autograd.backward`` from the slice's output with the gradients
  that arrived from its consumers (a loss scalar with gradient 1); the gradients of its input
  leaves then travel back to the producers' rows and ranks, where they are summed.

:class:`TrainingRun` adds what happens around it: localisation, the parameter device groups'
gradient all-reduce (each bucket started as soon as the backward waves have made it final, under
the remaining ones: :mod:`spindle.runtime.param_groups`), clipping by the true global norm, the
AdamW step, and the measurements.
The executor only executes what the plan says: who runs which layers on which rows is read off
the plan by :mod:`spindle.runtime.localise`.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from spindle.declare.workload import Workload
from spindle.layers import provider_for
from spindle.layers.chain import run_chain
from spindle.layers.provider import Activation
from spindle.layers.user import UserProvider
from spindle.plan.contract import Plan, Slice
from spindle.plan.layout import RowRange, SliceRef, ValueKey
from spindle.runtime.config import ConfigError, RunConfig, check_autocast
from spindle.runtime.data import TaskData, task_data
from spindle.runtime.edges import Edge, TransmissionSchedule
from spindle.runtime.localise import (
    LocalModel,
    localise,
    rows_on,
    slices_of_rank,
)
from spindle.runtime.metrics import PhaseTimer, RankIteration
from spindle.runtime.param_groups import ParameterGroups
from spindle.runtime.transmission import Transmitter

log = logging.getLogger(__name__)


@dataclass
class _SliceRecord:
    """What the forward of one slice leaves for its backward."""

    ref: SliceRef
    value: ValueKey  # the slice's output
    leaves: dict[int, Activation]  # edge id -> input leaves
    output: Activation | torch.Tensor  # activation tuple, or a loss scalar
    # a slice computed in chunks: each chunk's batch rows and output (its own autograd graph)
    chunks: list[tuple[RowRange, Activation | torch.Tensor]] | None = None


@dataclass
class ForwardBackwardResult:
    """This rank's loss contributions per task (detached), summed over its slices."""

    task_losses: dict[str, torch.Tensor] = field(default_factory=dict)


class WaveExecutor:
    """Forward and backward of one iteration of ``plan`` on ``rank``."""

    def __init__(
        self,
        plan: Plan,
        rank: int,
        local: LocalModel,
        transmitter: Transmitter,
        timer: PhaseTimer,
        seed: int,
        dtype: torch.dtype,
        device: torch.device,
        data_workers: int = 0,
    ) -> None:
        self.plan = plan
        self.rank = rank
        self.local = local
        self.provider = local.provider
        self.transmitter = transmitter
        self.schedule = transmitter.schedule
        self.timer = timer
        self.seed = seed
        self.dtype = dtype
        self.device = device
        self.my_slices: dict[int, tuple[SliceRef, Slice]] = slices_of_rank(plan, rank)
        self.data: dict[str, TaskData] = {
            t.name: task_data(self.provider.workload, t.name, seed, data_workers)
            for t in self.provider.workload.tasks}
        self._batch: dict[tuple[str, RowRange], dict[str, torch.Tensor]] = {}
        # task -> data position minus step (non-zero after a resume: a task's data continues
        # where it stopped, a task new to the run starts at position 0)
        self.data_offsets: dict[str, int] = {}
        self.recompute = False  # activations recomputed in backward (RunConfig.recompute)
        self.autocast: torch.dtype | None = None  # forward under autocast (bf16-mixed)
        # called with every wave index before its backward, and after its backward and
        # gradient send (the sync overlap)
        self.before_backward: Callable[[int], None] | None = None
        self.after_backward: Callable[[int], None] | None = None
        # called before each chunk's backward of a chunked slice: whether it is the last one
        # (the layer-granular sync counts a gradient final only then)
        self.on_chunk: Callable[[bool], None] | None = None
        self._from_wave: dict[int, list[Edge]] = {}
        for e in self.schedule.edges:
            self._from_wave.setdefault(e.producer.wave, []).append(e)

    # -- input data -----------------------------------------------------------------------------
    def prepare_data(self, step: int) -> None:
        """Load this rank's rows of ``step``'s data (kept apart from the timed phases): for each
        task, the span of rows its slices read, once, then each slice's rows and fields."""
        self._batch = {}
        wanted: dict[tuple[str, RowRange], set[str]] = {}
        for _, s in self.my_slices.values():
            metaop = self.plan.metaops[s.metaop]
            rows = rows_on(self.plan, s, self.rank)
            assert rows is not None
            fields = {f for op in metaop.layers[s.layer_start:s.layer_end]
                      for f in self.provider.fields(op)}
            if fields:
                wanted.setdefault((metaop.task, rows), set()).update(fields)
        spans: dict[str, tuple[int, int]] = {}
        for task, rows in wanted:
            lo, hi = spans.get(task, (rows.start, rows.end))
            spans[task] = (min(lo, rows.start), max(hi, rows.end))
        loaded = {task: self.data[task].rows(step + self.data_offsets.get(task, 0), lo, hi)
                  for task, (lo, hi) in spans.items()}
        for (task, rows), fields in wanted.items():
            lo = spans[task][0]
            self._batch[(task, rows)] = {
                f: self._local(loaded[task][f][rows.start - lo:rows.end - lo]) for f in fields}

    def _local(self, part: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype if part.is_floating_point() else part.dtype
        return part.to(device=self.device, dtype=dtype)

    # -- one iteration --------------------------------------------------------------------------
    def forward_backward(self, step: int) -> ForwardBackwardResult:
        """Forward every wave, then backward every wave in reverse; parameter gradients are left
        in ``.grad`` (local sums, not yet synchronised)."""
        produced: dict[ValueKey, Activation] = {}
        records: dict[int, _SliceRecord] = {}
        result = ForwardBackwardResult()
        num_waves = len(self.plan.waves)
        for w in range(num_waves):
            with self.timer.phase("send_recv"):
                arrived = self.transmitter.forward(w, produced)
                self.transmitter.post_receives(self._from_wave.get(w, ()), backward=False)
            mine = self.my_slices.get(w)
            if mine is None:
                continue
            ref, s = mine
            with self.timer.phase("compute"), torch.autocast(
                    self.device.type, dtype=self.autocast or torch.bfloat16,
                    enabled=self.autocast is not None):
                leaves = {eid: _as_leaves(act, self.schedule.edges[eid].grad)
                          for eid, act in arrived.items()}
                value = (s.metaop, s.layer_end - 1)
                bounds = self.transmitter.chunk_rows(ref)
                if bounds is None:
                    out = self._compute_dtype(self._run_slice(ref, s, leaves))
                    records[w] = _SliceRecord(ref, value, leaves, out)
                else:
                    records[w] = self._run_chunks(ref, s, leaves, bounds)
                    out = records[w].output
                if isinstance(out, torch.Tensor):
                    task = self.plan.metaops[s.metaop].task
                    prev = result.task_losses.get(task)
                    loss = out.detach()
                    result.task_losses[task] = loss if prev is None else prev + loss
                else:
                    produced[value] = out

        output_grads: dict[ValueKey, list[torch.Tensor | None]] = {}
        for w in reversed(range(num_waves)):
            input_grads: dict[int, tuple[torch.Tensor | None, ...]] = {}
            if self.before_backward is not None:
                self.before_backward(w)
            with self.timer.phase("send_recv"):
                self.transmitter.post_receives(self.schedule.into_wave.get(w, ()), backward=True)
            rec = records.pop(w, None)
            if rec is not None:
                with self.timer.phase("compute"):
                    self._backward_slice(rec, output_grads)
                    input_grads = {
                        eid: tuple(t.grad if t.requires_grad else None for t in leaf)
                        for eid, leaf in rec.leaves.items()
                    }
            with self.timer.phase("send_recv"):
                self.transmitter.backward(w, input_grads, produced, output_grads)
            if self.after_backward is not None:
                self.after_backward(w)
        return result

    def _compute_dtype(self, out: Activation | torch.Tensor) -> Activation | torch.Tensor:
        """A slice hands its consumers its output in the compute dtype (autocast leaves the
        residual stream in float32): half the bytes between waves."""
        if self.autocast is None or isinstance(out, torch.Tensor):
            return out
        return tuple(t.to(self.autocast) if t.is_floating_point() else t for t in out)

    def _run_chunks(self, ref: SliceRef, s: Slice, leaves: dict[int, Activation],
                    bounds: list[RowRange]) -> _SliceRecord:
        """Slice ``s`` computed chunk by chunk of its rows (``bounds``), each chunk's rows sent
        to their consumers on other ranks as soon as computed (chunked transfers)."""
        rows = rows_on(self.plan, s, self.rank)
        assert rows is not None
        outputs = self.schedule.outputs_of.get(ref, ())
        chunks: list[tuple[RowRange, Activation | torch.Tensor]] = []
        for c, b in enumerate(bounds):
            at = slice(b.start - rows.start, b.end - rows.start)
            part = {eid: tuple(t[at] for t in act) for eid, act in leaves.items()}
            out = self._compute_dtype(self._run_slice(ref, s, part, at))
            if not isinstance(out, torch.Tensor):
                # posted, not waited for (inside the compute phase): the next chunk runs
                # meanwhile
                self.transmitter.send_chunk(outputs, c, b, _constant(out), False)
            chunks.append((b, out))
        whole: Activation | torch.Tensor
        if isinstance(chunks[0][1], torch.Tensor):  # a chain ending in a row-wise loss: the sum
            whole = torch.stack([o.detach() for _, o in chunks]).sum()  # type: ignore[union-attr]
        else:
            whole = tuple(torch.cat([o[i].detach() for _, o in chunks])
                          for i in range(len(chunks[0][1])))
        return _SliceRecord(ref, (s.metaop, s.layer_end - 1), leaves, whole, chunks)

    def _run_slice(
        self, ref: SliceRef, s: Slice, leaves: dict[int, Activation], part: slice | None = None,
    ) -> Activation | torch.Tensor:
        """The operators of slice ``s`` on this rank's rows (``part``: those of one chunk);
        its inputs are ``leaves``: the carry of its MetaOp, or the outputs of its producers by
        stage."""
        metaop = self.plan.metaops[s.metaop]
        edges = self.schedule.inputs_of.get(ref, ())
        rows = rows_on(self.plan, s, self.rank)
        assert rows is not None
        carry: Activation | None = None
        inputs: dict[str, Activation] = {}
        if s.layer_start > 0:
            (edge,) = edges
            carry = leaves[edge.id]
        else:
            for e in edges:
                inputs[self.plan.metaops[e.value[0]].layers[-1].stage] = leaves[e.id]
        refs = metaop.layers[s.layer_start:s.layer_end]
        batch = self._batch.get((metaop.task, rows), {})
        if part is not None:
            batch = {f: t[part] for f, t in batch.items()}
        return run_chain(self.provider, self.local.modules, refs, inputs, carry, batch,
                         metaop.batch, self.recompute or s.metaop in self.plan.recompute)

    def _backward_slice(
        self, rec: _SliceRecord, output_grads: dict[ValueKey, list[torch.Tensor | None]]
    ) -> None:
        if rec.chunks is not None:
            self._backward_chunks(rec, output_grads.pop(rec.value, None))
            return
        roots: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        if isinstance(rec.output, torch.Tensor):
            if rec.output.requires_grad:
                roots.append(rec.output)
                grads.append(torch.ones_like(rec.output))
        else:
            arrived = output_grads.pop(rec.value, None)
            if arrived is not None:
                for t, g in zip(rec.output, arrived):
                    if g is not None and t.requires_grad:
                        roots.append(t)
                        grads.append(g)
        if roots:
            torch.autograd.backward(roots, grads)


    def _backward_chunks(self, rec: _SliceRecord,
                         arrived: list[torch.Tensor | None] | None) -> None:
        """The backward of a chunked slice chunk by chunk, last first; after each, the
        gradients of its input rows go to their producers on other ranks."""
        assert rec.chunks is not None
        s = self.plan.waves[rec.ref.wave].slices[rec.ref.index]
        rows = rows_on(self.plan, s, self.rank)
        assert rows is not None
        inputs = self.schedule.inputs_of.get(rec.ref, ())
        for c in reversed(range(len(rec.chunks))):
            b, out = rec.chunks[c]
            at = slice(b.start - rows.start, b.end - rows.start)
            if self.on_chunk is not None:
                self.on_chunk(c == 0)
            if isinstance(out, torch.Tensor):
                pairs = [(out, torch.ones_like(out))] if out.requires_grad else []
            else:
                pairs = [(t, g[at]) for t, g in zip(out, arrived or ())
                         if g is not None and t.requires_grad]
            if pairs:
                torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])

            def grads(e: Edge, at: slice = at) -> list[torch.Tensor | None]:
                return [t.grad[at] if t.requires_grad and t.grad is not None else None
                        for t in rec.leaves[e.id]]

            self.transmitter.send_chunk(inputs, c, b, grads, True)
        if self.on_chunk is not None:
            self.on_chunk(True)


def _constant(out: Activation) -> Callable[[Edge], Activation]:
    return lambda _: out


def _as_leaves(act: Activation, grad: bool) -> Activation:
    """Inputs of a slice: detached from the sender; floating tensors require grad when a
    gradient goes back to their producer (``grad``, from the plan)."""
    return tuple(
        t.detach().requires_grad_(True) if grad and t.is_floating_point() else t.detach()
        for t in act
    )


@dataclass
class StepOutcome:
    """One rank's result of :meth:`TrainingRun.step`."""

    rank_iteration: RankIteration
    grad_norm: float


class TrainingRun:
    """Everything one rank needs to train ``plan``: built in named steps, then :meth:`step`.

    Construction is collective when the world has more than one rank (process groups of the
    parameter device groups are created on every rank).
    """

    def __init__(
        self, workload: Workload, plan: Plan, rank: int, world_size: int, device: torch.device,
        config: RunConfig | None = None,
    ) -> None:
        config = config or RunConfig()
        if config.zero is not None:  # the user's override of the plan's ZeRO stages
            plan = replace(plan, zero={m.id: config.zero for m in plan.metaops})
        self.workload = workload
        self.plan = plan
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.config = config
        self.dtype = dtype = config.torch_dtype
        self.task_names = [t.name for t in workload.tasks]
        provider = provider_for(workload)
        provider.check_runnable()
        self.local = localise(provider, plan, rank, config.seed, dtype, device)
        self.groups = ParameterGroups(
            plan, self.local.index, self.local.members, rank, world_size, device, dtype,
            overlap=config.overlap_sync, min_bucket_bytes=config.min_bucket_bytes,
            timeout_s=config.timeout, trainable=provider.trainable,
            sync_start=config.sync_start_on(device), reduce_dtype=config.torch_reduce_dtype,
        )
        self.groups.attach(self.local.params)
        schedule = TransmissionSchedule.build(plan)
        if config.transfer_chunks > 1 and device.type == "cuda":
            raise ConfigError(f"--transfer-chunks {config.transfer_chunks}: chunked transfers"
                              " run on gloo (CPU) only so far; use 1 on CUDA")
        # a user's module is probed row-wise only where a plan splits its batch over devices,
        # so a user workload's one-device slices are never computed in chunks
        self.transmitter = Transmitter(schedule, rank, device, timeout_s=config.timeout,
                                       chunks=config.transfer_chunks,
                                       chunk_single=not isinstance(provider, UserProvider))
        self.timer = PhaseTimer(device)
        self.executor = WaveExecutor(plan, rank, self.local, self.transmitter, self.timer,
                                     config.seed, dtype, device, config.data_workers)
        self.executor.recompute = config.recompute
        self.executor.on_chunk = self.groups.count_hooks
        if config.autocast_dtype is not None:
            check_autocast(device, config.autocast_dtype)
            self.executor.autocast = config.autocast_dtype
            # torch's RMSNorm with a bfloat16 input and its float32 weight falls back from its
            # fused kernel and says so on every call; the result is right
            warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
        if config.overlap_sync:
            self.executor.before_backward = self.groups.begin_backward
            self.executor.after_backward = self._launch_ready
        # frozen parameters (requires_grad False) have no gradient and no optimizer state; a
        # sharded pool's parameters are stepped by this rank's share of them (ZeRO)
        params = self.groups.optimizer_params(self.local.params)
        self.optimizer = (
            # foreach: the multi-tensor kernels, bit-identical to the per-tensor loop, faster
            torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay,
                              foreach=True)
            if params else None
        )
        self._prepared: int | None = None

    def prepare_data(self, step: int) -> float:
        """Generate ``step``'s input rows now (outside the timed iteration); returns seconds."""
        t0 = time.perf_counter()
        self.executor.prepare_data(step)
        self._prepared = step
        return time.perf_counter() - t0

    def step(self, step: int) -> StepOutcome:
        """One iteration: forward, backward, device-group sync, clip, AdamW step (the input
        rows are generated first unless :meth:`prepare_data` already did)."""
        data_s = 0.0 if self._prepared == step else self.prepare_data(step)
        self._prepared = None
        self.timer.reset()
        self.transmitter.counters.reset()
        self.timer.sync()
        start = time.perf_counter()
        with self.timer.phase("optimizer"):
            self.groups.zero_grad(self.local.params)
        result = self.executor.forward_backward(step)
        with self.timer.phase("param_sync"):
            sync_bytes = self.groups.finish(self.local.params)
        with self.timer.phase("optimizer"):
            norm = self.groups.clip_gradients(self.local.params, self.config.clip)
            if self.optimizer is not None:
                self.optimizer.step()
        with self.timer.phase("param_sync"):
            sync_bytes += self.groups.after_step(self.local.params)
        elapsed = time.perf_counter() - start
        counters = self.transmitter.counters
        return StepOutcome(
            RankIteration(
                time_s=elapsed, data_s=data_s, phases=dict(self.timer.seconds),
                bytes_forward=counters.forward_bytes, bytes_backward=counters.backward_bytes,
                sync_bytes=sync_bytes,
                task_losses={t: float(v) for t, v in result.task_losses.items()},
            ),
            grad_norm=norm,
        )

    def data_positions(self, steps_done: int) -> dict[str, int]:
        """Each task's data position (batches consumed) once ``steps_done`` steps have run."""
        offsets = self.executor.data_offsets
        return {t: steps_done + offsets.get(t, 0) for t in self.task_names}

    def set_data_positions(self, step: int, positions: dict[str, int]) -> None:
        """Continue from ``step`` with each task at its saved position (a task not in
        ``positions`` starts at 0)."""
        self.executor.data_offsets = {t: positions.get(t, 0) - step for t in self.task_names}

    def _launch_ready(self, wave: int) -> None:
        with self.timer.phase("param_sync"):
            self.groups.launch_ready(wave, self.local.params)

    def optimizer_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """AdamW's state of every parameter this rank holds, whole, by logical name
        (collective: with ZeRO the shares are gathered, so every rank takes part, also one whose
        shares are all empty and that has no optimizer)."""
        state = self.optimizer.state if self.optimizer is not None else {}
        return self.groups.optimizer_state(state, self.local.params)

    def load_optimizer_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Continue from the whole per-name AdamW ``state`` (:meth:`optimizer_state`'s form)."""
        if self.optimizer is not None:
            self.groups.load_optimizer_state(self.optimizer.state, self.local.params, state)

    def gather_parameters(self) -> dict[str, torch.Tensor] | None:
        """Every logical parameter on rank 0 (None on the other ranks); collective."""
        return self.groups.gather(self.local.params)


__all__ = ["WaveExecutor", "TrainingRun", "StepOutcome", "ForwardBackwardResult"]
