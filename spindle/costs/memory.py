"""Memory model: the bytes each device of a placed plan needs at its peak.

Per device, two parts:

* **Model states** of every parameter the device holds (the parameters of the modules of every
  operator it executes, by module path: :attr:`spindle.costs.graph.MetaGraph.parameter_index`, the
  index the runtime uses too): the weights, their gradients and the AdamW states.  A parameter used
  by several MetaOps or tasks on the same device (a shared component layer) is counted **once** on
  that device, as the runtime builds it once.  Bytes per parameter (:class:`MemoryModel`):

  - ``bf16-mixed``: what the runtime's ``--precision bf16-mixed`` allocates: float32 weights
    (the master copy) 4 + float32 gradients 4 + float32 exp_avg 4 + exp_avg_sq 4, plus the
    bfloat16 compute copy autocast makes of every weight and keeps for the backward (2):
    18 B/param.  (Megatron-style bf16 parameters with a separate fp32 master, Rajbhandari et
    al., "ZeRO" (SC'20) section 3.1's 2 + 2 + 12 = 16, are not what this runtime runs.)
  - ``fp32`` (CPU runtime): weights 4 + gradients 4 + exp_avg 4 + exp_avg_sq 4 = 16 B/param.

  ZeRO (the plan's per-MetaOp stage, :func:`spindle.plan.layout.zero_stages`; the runtime's
  :mod:`spindle.runtime.zero`): stage 1 splits each sharded parameter's optimizer states evenly
  over its device group (all devices that hold it), so a device pays ``optimizer_bytes /
  |group|`` for it; stage 2 splits its gradient bytes too, but the full gradients of the keys a
  slice computes live through that slice's backward next to the previous wave's buffer still
  being reduce-scattered, and at their launch (once that one is waited for) the buffer they
  are copied into and gloo's clone of it (:class:`spindle.runtime.zero.Stage2Sync`): twice
  their bytes are in flight in the backward, at most ``gradient_in_flight_bytes`` (three
  sync buckets where the sync starts layer by layer, the GPU presets; no cap with the CPU's
  wave-granular start).  A stage-1 reduce-scatter copies
  a bucket's gradients into one buffer (then frees them), gloo clones it once more
  (``scatter_clone``; measured: a ZeRO-1 step's peak on 2 gloo ranks is in that clone), and
  the share is written apart: one bucket's copy, the clones and the shares at the launch.
  The weights (and the compute copy) stay whole on every device.  Sharding moves about the
  same bytes (the all-reduce becomes a reduce-scatter of gradients + an all-gather of updated
  weights, ZeRO paper section 7.2.1), but the all-gather runs after the step, and stage 2
  reduce-scatters once per wave computing the gradients (the simulator charges both).

* **Activations**.  Waves run forward in order, then backward in reverse, so what a forward
  slice saves for backward stays alive until the backward pass reaches it: at the end of the
  forward pass a device holds sum over its slices of (local rows x layers x saved elements per
  sample per layer x activation bytes) + the saved input of each stage's first layer + the LM
  head's saved log-probabilities; the largest *transient* of its slices (the gradient buffers
  of one layer during its backward: about one layer's saved activations; for an LM stage also
  the logits and their gradient) comes on top.  Activation elements per layer come from
  :func:`spindle.layers.costmodel.layer_activation_elements` (via
  :attr:`spindle.costs.graph.MetaOp.saved_elements_per_sample_per_layer`), less the attention
  scores when ``flash_attention`` (default: fused attention keeps O(s) statistics; the runtime's
  ``scaled_dot_product_attention`` does so on CPU too).  Loss logits are fp32 (autocast runs
  cross entropy in fp32) in both precisions.  With recomputation (the plan's
  :attr:`~spindle.plan.contract.Plan.recompute`, or ``recompute`` for all) a layer keeps only
  its input and the backward recomputes one layer at a time (transient: its activations and
  their gradients).

* **The peak** (:func:`peak_bytes`) is the largest of three moments, since the runtime drops
  every gradient when a step starts: the end of forward (the states without gradients + every
  saved activation), the backward (every gradient, the activations freed as it goes), and
  AdamW's step (the gradients it reads and a temporary as large, ``foreach``'s square root),
  or, with ZeRO, the all-gather after it (two buckets' buffers).

Checked against the runtime on 2 gloo ranks (``benchmarks/memory_bench.py``, BENCHMARKS.md:
every strategy on the tiny and small workloads, 56 of 60 rows within 15%).  Not modelled:
allocator fragmentation and caching, the all-reduce's flat buffer, the framework's own
footprint (CUDA context ~0.5-1 GB per GPU).  A contrastive-loss slice runs on the first device
of its group with the whole batch, as the runtime runs it (:func:`executing_devices`); its
other devices hold nothing for it.

:class:`MemoryLedger` is the incremental form the placement uses (what a device holds after
each slice, and what one more slice would add); :func:`memory_report` replays a whole plan
through it.  Where ZeRO is on, the ledger's running totals are upper bounds of the report's
(the pool rule can raise a key's stage only once the plan is whole; the all-gather's buffers
are bounded), so the placement never accepts what the report refuses.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Collection, Literal, Mapping, Sequence

import numpy as np

from spindle.costs.graph import MetaGraph
from spindle.plan.contract import MetaOp, Plan, Slice
from spindle.plan.layout import (
    SYNC_BUCKET_BYTES,
    ParameterIndex,
    executing_devices,
    local_rows,
    metaop_stages,
    slice_inputs,
    value_elements,
    zero_stages,
)

GB = 1e9  # reports use decimal gigabytes (1e9 bytes); device capacities are often GiB
LOGIT_BYTES = 4  # cross entropy in fp32 (autocast's fp32 list), also on CPU


def format_gb(nbytes: float) -> str:
    """``12.3 GB`` (three significant digits, so that tiny CPU workloads do not read 0.0)."""
    return f"{nbytes / GB:.3g} GB"


@dataclass(frozen=True)
class MemoryModel:
    """Bytes per parameter (weights, gradients, optimizer states) and per activation element."""

    name: str
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    copy_bytes: int = 0  # a compute copy of every weight kept for backward (autocast's)
    # ZeRO-2: full gradients alive at once in a slice's backward (inf: all of the slice's, as
    # with the wave-granular sync start; the layer start keeps about three buckets' worth)
    gradient_in_flight_bytes: float = float("inf")
    # the reduce-scatter clones its input (gloo's does; NCCL's works in place): ZeRO-1's launch
    scatter_clone: bool = True
    zero: int = 0  # ZeRO stage of every MetaOp (the --zero override)
    zero_metaops: tuple[tuple[int, int], ...] = ()  # (MetaOp, stage): a plan's, per MetaOp
    flash_attention: bool = True  # attention keeps O(s) statistics, not the s x s scores
    recompute: bool = False  # activation checkpointing per layer (the runtime's --recompute)
    recompute_metaops: frozenset[int] = frozenset()  # ... for these MetaOps only (a plan's)

    def recomputes(self, metaop: MetaOp) -> bool:
        """Whether ``metaop``'s slices keep only each layer's input (a loss never does)."""
        return not metaop.is_loss and (self.recompute or metaop.id in self.recompute_metaops)

    def zero_of(self, metaops: Sequence[MetaOp]) -> dict[int, int]:
        """MetaOp -> ZeRO stage under this model (the override, else the plan's per MetaOp)."""
        own = dict(self.zero_metaops)
        return {m.id: max(self.zero, own.get(m.id, 0)) for m in metaops}

    def strategy(self, metaops: Sequence[MetaOp]) -> tuple[tuple[int, ...], dict[int, int]]:
        """The plan fields of this model's memory strategy: the MetaOps that recompute
        (:attr:`Plan.recompute`) and MetaOp -> ZeRO stage (:attr:`Plan.zero`, stages above 0)."""
        zero = {m: st for m, st in self.zero_of(metaops).items() if st}
        return tuple(m.id for m in metaops if self.recomputes(m)), zero

    @property
    def state_bytes_per_param(self) -> int:
        """Unsharded bytes per trained parameter: 16 in fp32, 18 in bf16-mixed."""
        return self.weight_bytes + self.copy_bytes + self.grad_bytes + self.optimizer_bytes

    def trained_bytes(self, stage: np.ndarray, group: np.ndarray | float) -> np.ndarray:
        """Gradient + optimizer bytes per trained element of keys at ZeRO ``stage`` sharded
        over ``group`` devices."""
        n = np.maximum(group, 1)
        return (self.grad_bytes / np.where(stage >= 2, n, 1)
                + self.optimizer_bytes / np.where(stage >= 1, n, 1))


MIXED_BF16 = MemoryModel("bf16-mixed", weight_bytes=4, grad_bytes=4, optimizer_bytes=8,
                         activation_bytes=2, copy_bytes=2)
FP32 = MemoryModel("fp32", weight_bytes=4, grad_bytes=4, optimizer_bytes=8, activation_bytes=4)


def memory_model_for(precision: Literal["bf16-mixed", "fp32"] | str,
                     zero: int = 0, recompute: bool = False) -> MemoryModel:
    base = {"bf16-mixed": MIXED_BF16, "fp32": FP32}.get(precision)
    if base is None:
        raise ValueError(f"precision '{precision}': expected bf16-mixed or fp32")
    return replace(base, zero=zero, recompute=recompute)


def with_strategy(model: MemoryModel, recompute: Collection[int] = (),
                  zero: Mapping[int, int] | None = None) -> MemoryModel:
    """``model`` with a plan's memory strategy added: MetaOps ``recompute`` recompute, and
    ``zero`` (MetaOp -> stage) shards."""
    if recompute:
        model = replace(model, recompute_metaops=model.recompute_metaops | set(recompute))
    if zero:
        own = dict(model.zero_metaops)
        for m, st in zero.items():
            own[m] = max(own.get(m, 0), st)
        model = replace(model, zero_metaops=tuple(sorted(own.items())))
    return model


def saved_elements_per_layer(metaop: MetaOp, model: MemoryModel) -> float:
    """Elements one layer of ``metaop`` keeps for backward, per sample.  The cost model's count
    (:func:`spindle.layers.costmodel.layer_activation_elements`) keeps the attention scores and
    probabilities (2 x heads x s x s, and the cross-attention's 2 x heads x s x m); a fused
    attention kernel (FlashAttention on GPUs, PyTorch's CPU ``scaled_dot_product_attention``,
    which the runtime calls) keeps only O(s) statistics, so with ``flash_attention`` they are
    left out."""
    elems = metaop.cost.saved_elements_per_sample_per_layer
    if model.flash_attention and not metaop.is_loss:
        elems -= metaop.cost.attention_elements_per_sample
    return elems


# --- which parameters an operator uses --------------------------------------------------------


@dataclass(frozen=True)
class SliceActivation:
    """Activation bytes one executing device of a slice keeps (``saved``, alive until its
    backward) and needs briefly during its backward (``transient``)."""

    saved: float
    transient: float


def slice_activation(
    metaops: Sequence[MetaOp], metaop: MetaOp, layer_start: int, layer_end: int, n: int,
    model: MemoryModel,
) -> SliceActivation:
    rows = local_rows(metaop, n)
    ab = model.activation_bytes
    per_layer = saved_elements_per_layer(metaop, model) * rows * ab
    if model.recomputes(metaop):
        # only each layer's input stays; backward recomputes one layer's activations at a time
        saved = metaop.cost.act_elements_per_sample * rows * ab * (layer_end - layer_start)
        transient = 2 * per_layer
    else:
        saved = per_layer * (layer_end - layer_start)
        transient = per_layer
    if metaop.is_loss:
        return SliceActivation(saved, transient)
    if layer_start == 0:
        # the first layer also saves its inputs: other stages' outputs (for in_proj) and raw
        # features (for the input projection)
        inputs = sum(value_elements(metaops, v) for v in slice_inputs(metaops, metaop.id, 0))
        if metaop.cost.input_elements_per_sample:
            inputs += metaop.cost.input_elements_per_sample
        saved += inputs * rows * ab
    if layer_end == metaop.num_layers and metaop.cost.logit_elements_per_sample:
        logits = rows * metaop.cost.logit_elements_per_sample * LOGIT_BYTES
        saved += logits  # log-probabilities saved by cross entropy
        transient += logits  # the logits (or their gradient) next to them
    return SliceActivation(saved, transient)


# --- per-device accounting --------------------------------------------------------------------


def peak_bytes(states: Any, grads: Any, step_grads: Any, saved: Any, transient: Any,
               gather: Any = 0.0, grad_transient: Any = 0.0) -> Any:
    """A device's peak over the three moments of a step (floats or arrays alike): ``states``
    (weights, compute copy, gradients, optimizer state) less the ``grads`` in them, plus the
    largest of: the end of forward (every saved activation, no gradient: the step starts by
    dropping them), the backward (every gradient: the activations are freed as it goes; the
    largest transient either way), and AdamW's step (the gradients it reads, ``step_grads``,
    and a temporary as large: ``foreach``'s square root of exp_avg_sq), and ZeRO's all-gather
    of the updated shares after it (``gather``: its buffers).  ``grad_transient`` (ZeRO-2's
    full gradients in flight) exists in the backward only."""
    backward = np.maximum(saved, grads + grad_transient) + transient
    return states - grads + np.maximum(np.maximum(backward, 2.0 * step_grads), gather)


@dataclass
class DeviceMemory:
    """One device's peak (:func:`peak_bytes`): model states, saved activations, the largest
    transient, and of the states the gradients alive in backward and those AdamW steps."""

    device: int
    param_bytes: float
    activation_bytes: float
    transient_bytes: float
    num_params: float
    metaops: tuple[int, ...]
    grad_bytes: float = 0.0
    step_grad_bytes: float = 0.0
    gather_bytes: float = 0.0
    grad_transient_bytes: float = 0.0

    @property
    def total_bytes(self) -> float:
        return float(peak_bytes(self.param_bytes, self.grad_bytes, self.step_grad_bytes,
                                self.activation_bytes, self.transient_bytes, self.gather_bytes,
                                self.grad_transient_bytes))


@dataclass
class MemoryReport:
    model: MemoryModel
    devices: list[DeviceMemory]
    capacity_bytes: float | None = None

    @property
    def peak_bytes(self) -> float:
        return max((d.total_bytes for d in self.devices), default=0.0)

    @property
    def mean_bytes(self) -> float:
        return sum(d.total_bytes for d in self.devices) / max(len(self.devices), 1)

    @property
    def peak_gb(self) -> float:
        return self.peak_bytes / GB

    @property
    def imbalance(self) -> float:
        """Peak over mean across devices (1.0 = perfectly balanced)."""
        mean = self.mean_bytes
        return self.peak_bytes / mean if mean > 0 else 1.0

    def over_capacity(self) -> list[DeviceMemory]:
        if self.capacity_bytes is None:
            return []
        return [d for d in self.devices if d.total_bytes > self.capacity_bytes]

    def fits(self) -> bool:
        return not self.over_capacity()

    def as_dict(self) -> dict[str, float]:
        return {"peak_memory_gb": self.peak_gb, "memory_imbalance": self.imbalance}


@dataclass
class MemoryLedger:
    """What each device holds as slices are added, and what another slice would add."""

    graph: MetaGraph
    model: MemoryModel
    num_devices: int
    index: ParameterIndex | None = None
    holds: np.ndarray = field(init=False)  # [params, devices] bool
    param_bytes: np.ndarray = field(init=False)
    saved: np.ndarray = field(init=False)
    transient: np.ndarray = field(init=False)
    metaops_on: list[list[int]] = field(init=False)

    def __post_init__(self) -> None:
        if self.index is None:
            self.index = self.graph.parameter_index
        self.zero = self.model.zero_of(self.graph.metaops)
        self.stage = metaop_stages(self.index, self.zero)  # before the pool rule
        # an upper bound of the final (pool rule) stage: every key at the plan's highest
        top = max(self.zero.values(), default=0)
        self.stage_bound = np.full(len(self.index), top, dtype=np.int64)
        self.holds = np.zeros((len(self.index), self.num_devices), dtype=bool)
        self.param_bytes = np.zeros(self.num_devices)
        self.grads = np.zeros(self.num_devices)  # of param_bytes: the gradients in backward
        self.step_grads = np.zeros(self.num_devices)  # ... and those AdamW steps
        self.grad_transient = np.zeros(self.num_devices)  # ZeRO-2's in flight
        self.stage1 = np.zeros((2, self.num_devices))  # ZeRO-1's gradients: full, share
        self.sharded_weights = np.zeros(self.num_devices)  # ZeRO's all-gather, bounded
        self.saved = np.zeros(self.num_devices)
        self.transient = np.zeros(self.num_devices)
        self.metaops_on = [[] for _ in range(self.num_devices)]
        self._log: list[tuple[np.ndarray, np.ndarray, float]] = []  # (devices, keys, transient)

    @property
    def total(self) -> np.ndarray:
        return peak_bytes(self.param_bytes, self.grads, self.step_grads, self.saved,
                          self.transient, _gather_bound(self.sharded_weights, self.step_grads),
                          self.grad_transient + self._launch_bytes(self.stage1))

    def _grad_bytes(self, ids: np.ndarray, stage: np.ndarray, n: np.ndarray | float
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Per key of ``ids``: gradient bytes alive in backward (ZeRO-2: the share) and read
        by AdamW (ZeRO-1 and 2: the share) on a device of a group of ``n``."""
        assert self.index is not None
        full = self.index.grad_sizes[ids] * self.model.grad_bytes
        n = np.maximum(n, 1)
        return full / np.where(stage >= 2, n, 1), full / np.where(stage >= 1, n, 1)

    def _param_bytes(self, ids: np.ndarray, n: int) -> np.ndarray:
        """Bytes of each key of ``ids`` on a device that takes it as one of ``n`` executing
        devices: weights (and their compute copy) for every element, gradient and optimizer
        state for the trainable ones.  A sharded key's device pays its share over the group,
        which holds at least the slice's executing devices, so charging the share over n when
        it first takes the key is an upper bound of its final share (:meth:`report` recomputes
        the exact share, with the pool rule of :func:`zero_stages`)."""
        assert self.index is not None
        m = self.model
        return (self.index.grad_sizes[ids] * m.trained_bytes(self.stage[ids], float(n))
                + self.index.sizes[ids] * (m.weight_bytes + m.copy_bytes))

    def added_bytes(self, metaop: int, l0: int, l1: int, n: int) -> np.ndarray:
        """Bytes each device would add if it executed layers ``[l0, l1)`` of ``metaop`` as one
        of ``n`` devices: new parameters + saved activations + growth of its largest
        transient."""
        m = self.graph.metaops[metaop]
        assert self.index is not None
        ids = self.index.slice_ids(metaop, l0, l1)
        n_exec = len(executing_devices(m, tuple(range(n))))
        new = ~self.holds[ids] if len(ids) else np.zeros((0, self.num_devices), dtype=bool)
        gb, gs = self._grad_bytes(ids, self.stage[ids], float(n_exec))
        act = slice_activation(self.graph.metaops, m, l0, l1, n, self.model)
        in_flight = self._gradient_transient(ids, self.stage_bound)
        weights = self._sharded_weights(ids) @ new
        step_grads = self.step_grads + gs @ new
        after = peak_bytes(self.param_bytes + self._param_bytes(ids, n_exec) @ new,
                           self.grads + gb @ new, step_grads,
                           self.saved + act.saved, np.maximum(self.transient, act.transient),
                           _gather_bound(self.sharded_weights + weights, step_grads),
                           np.maximum(self.grad_transient, in_flight) + self._launch_bytes(
                               self.stage1 + self._stage1(ids, self.stage_bound, n_exec) @ new))
        return after - self.total

    def _sharded_weights(self, ids: np.ndarray) -> np.ndarray:
        """Per key of ``ids``: its weight bytes if it may be sharded (the all-gather's)."""
        assert self.index is not None
        return np.where(self.stage_bound[ids] >= 1,
                        self.index.grad_sizes[ids] * self.model.weight_bytes, 0.0)

    def _gradient_transient(self, ids: np.ndarray, stage: np.ndarray) -> float:
        """ZeRO-2: twice the full gradients of a slice's sharded keys (module docstring), in
        flight through its backward."""
        assert self.index is not None
        sharded = ids[stage[ids] >= 2]
        # the gradients and the previous wave's buffer; at the launch, the buffer and its clone
        return min(2.0 * float(self.index.grad_sizes[sharded].sum()) * self.model.grad_bytes,
                   self.model.gradient_in_flight_bytes)

    def _stage1(self, ids: np.ndarray, stage: np.ndarray, n: float) -> np.ndarray:
        """Per key of ``ids``: [full gradient bytes, share bytes] if at ZeRO stage 1, else 0."""
        assert self.index is not None
        full = np.where(stage[ids] == 1, self.index.grad_sizes[ids] * self.model.grad_bytes, 0.0)
        return np.stack([full, full / max(n, 1.0)])

    def _launch_bytes(self, one: np.ndarray) -> np.ndarray:
        """ZeRO-1's reduce-scatters at their launch on each device, from ``one`` = [full
        gradient bytes, share bytes] of its stage-1 keys: the bucket being copied (at most a
        sync bucket), gloo's clones of every bucket in flight, and the shares."""
        m = self.model
        launch = np.minimum(one[0], SYNC_BUCKET_BYTES) + m.scatter_clone * one[0]
        return np.minimum(launch, m.gradient_in_flight_bytes) + one[1]

    def add(self, s: Slice) -> None:
        m = self.graph.metaops[s.metaop]
        devs = np.asarray(executing_devices(m, s.devices), dtype=np.int64)
        assert self.index is not None
        ids = self.index.slice_ids(s.metaop, s.layer_start, s.layer_end)
        per_key = self._param_bytes(ids, len(devs))
        act = slice_activation(self.graph.metaops, m, s.layer_start, s.layer_end, s.n, self.model)
        at = np.ix_(ids, devs)
        new = ~self.holds[at]  # the keys each device takes anew
        gb, gs = self._grad_bytes(ids, self.stage[ids], float(len(devs)))
        self.param_bytes[devs] += per_key @ new
        self.grads[devs] += gb @ new
        self.step_grads[devs] += gs @ new
        self.holds[at] = True
        self.saved[devs] += act.saved
        self.transient[devs] = np.maximum(self.transient[devs], act.transient)
        self.grad_transient[devs] = np.maximum(self.grad_transient[devs],
                                               self._gradient_transient(ids, self.stage_bound))
        self.sharded_weights[devs] += self._sharded_weights(ids) @ new
        self.stage1[:, devs] += self._stage1(ids, self.stage_bound, float(len(devs))) @ new
        self._log.append((devs, ids, act.transient))
        for d in devs.tolist():
            self.metaops_on[d].append(s.metaop)

    def report(self, capacity_bytes: float | None = None) -> MemoryReport:
        """The per-device peak; with ZeRO, each sharded parameter's share is computed over its
        final device group."""
        assert self.index is not None
        m = self.model
        counts = self.index.sizes @ self.holds  # parameters per device
        stage = zero_stages(self.index, self.zero, self.holds)
        group = self.holds.sum(axis=1)  # devices per key
        per_key = self.index.grad_sizes * m.trained_bytes(stage, group)
        param_bytes = counts * (m.weight_bytes + m.copy_bytes) + per_key @ self.holds
        gb, gs = self._grad_bytes(np.arange(len(self.index)), stage, group)
        grads, step_grads = gb @ self.holds, gs @ self.holds
        # ZeRO's all-gather after the step: two buckets in flight, each whole and its share
        sharded = np.where(stage >= 1, self.index.grad_sizes * m.weight_bytes, 0.0)
        gather = np.minimum(sharded @ self.holds, 2.0 * SYNC_BUCKET_BYTES) * (
            1.0 + (sharded / np.maximum(group, 1)) @ self.holds
            / np.maximum(sharded @ self.holds, 1.0))
        # ... next to the unsharded parameters' gradients (kept until the next step)
        gather = np.where(gather > 0, gather + np.where(stage >= 1, 0.0, gs) @ self.holds, 0.0)
        in_flight = self.grad_transient
        if (stage >= 2).any():  # the gradients in flight under the final (pool) stages
            in_flight = np.zeros(self.num_devices)
            for devs, ids, _ in self._log:
                in_flight[devs] = np.maximum(in_flight[devs],
                                             self._gradient_transient(ids, stage))
        one = np.where(stage == 1, self.index.grad_sizes * m.grad_bytes, 0.0)
        in_flight = in_flight + self._launch_bytes(
            np.stack([one @ self.holds, (one / np.maximum(group, 1)) @ self.holds]))
        devices = [
            DeviceMemory(d, float(param_bytes[d]), float(self.saved[d]),
                         float(self.transient[d]),
                         float(counts[d]), tuple(dict.fromkeys(self.metaops_on[d])),
                         float(grads[d]), float(step_grads[d]), float(gather[d]),
                         float(in_flight[d]))
            for d in range(self.num_devices)
        ]
        return MemoryReport(self.model, devices, capacity_bytes)


def _gather_bound(sharded_weights: np.ndarray, step_grads: np.ndarray) -> np.ndarray:
    """An upper bound of the all-gather moment (:meth:`MemoryLedger.report` has the exact one):
    two buckets whole and their shares, next to every gradient AdamW read."""
    return 2.0 * np.minimum(sharded_weights, 2.0 * SYNC_BUCKET_BYTES) + step_grads


def memory_report(
    plan: Plan, graph: MetaGraph, model: MemoryModel, capacity_bytes: float | None = None,
    index: ParameterIndex | None = None,
) -> MemoryReport:
    """The peak memory of every device of ``plan`` under ``model`` (and the plan's own memory
    strategy: its recomputed MetaOps and ZeRO stages)."""
    model = with_strategy(model, plan.recompute, plan.zero)
    ledger = MemoryLedger(graph, model, plan.num_devices, index)
    for wave in plan.waves:
        for s in wave.slices:
            ledger.add(s)
    return ledger.report(capacity_bytes)
