"""The provider of user stacks (:class:`~spindle.declare.modules.ModuleStack`): the user's own
modules, their costs counted on the meta device, their losses.

Modules of component ``c``: ``c.pre``, ``c.layers.i``, ``c.post``; a custom loss that is an
``nn.Module`` is ``loss.<task>``.  A parameter's logical name is the path plus its name inside
the module (``vision.layers.3.attn.q_proj.weight``).  Operator ``i`` of a stage runs
``c.layers.i``; layer 0 also runs ``pre`` on the stage's dataset fields and the outputs of its
input stages, the last layer also ``post``.  Every task's loss is one more operator that reads
the stages it names: split over rows like a layer when it is row-wise (the mean over its rows,
weighted by rows / batch so that the ranks' shares add up to the task's mean), on one device
with the whole batch when it is ``coupled``.

Costs are counted, not declared: each module runs forward and backward on meta tensors under
``torch.utils.flop_counter.FlopCounterMode`` and a saved-tensors hook, at two and three rows, so
the per-row FLOPs and saved activations come out of the difference (the parameters, saved once,
cancel).  A measured profile (``spindle profile model.py``) replaces those estimates.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from spindle.declare.datasets import probe
from spindle.declare.modules import ModuleStack, module_seed
from spindle.declare.workload import LOSS_STAGE, LayerRef, Stage, Task, Workload
from spindle.layers.provider import (
    Activation,
    LayerError,
    LayerProvider,
    OperatorCost,
    Output,
)
from spindle.plan.contract import LOSS_KIND

ROW_LOSS_KIND = "loss"
"""The MetaOp kind of a row-wise custom loss (split over rows like a layer)."""


@dataclass(frozen=True)
class _Count:
    flops: float  # forward + backward
    saved: float  # elements kept for backward


class UserProvider(LayerProvider):
    """The modules of a workload of user stacks (module docstring)."""

    def __init__(self, workload: Workload) -> None:
        super().__init__(workload)
        self._stage_shapes: dict[tuple[str, str], list[tuple[int, ...]]] | None = None
        self._costs: dict[tuple[LayerRef, int], OperatorCost] = {}
        self._probes: dict[str, dict[str, torch.Tensor]] = {}
        self._keys: dict[str, str] = {}  # module path -> _module_key
        self._grads: dict[str, dict[str, bool]] = {}  # module path -> requires_grad by name
        self._counts: dict[tuple[object, ...], _Count] = {}  # (module key, input) -> count
        self._outs: dict[tuple[object, ...], torch.Tensor] = {}  # (module key, input) -> output

    # --- structure -------------------------------------------------------------------------------
    def stack(self, component: str) -> ModuleStack:
        comp = self.workload.components[component]
        assert isinstance(comp, ModuleStack)
        return comp

    def num_layers(self, component: str) -> int:
        return self.stack(component).layers

    def has_loss_operator(self, task: Task) -> bool:
        return True  # every custom loss is an operator of its own

    def _stage(self, ref: LayerRef) -> tuple[Task, Stage, ModuleStack]:
        task = self.workload.task(ref.task)
        st = next((s for s in task.stages if s.name == ref.stage), None)
        if st is None or st.component != ref.component:
            raise LayerError(f"operator {ref}: no such stage in task '{ref.task}'")
        return task, st, self.stack(st.component)

    def fields(self, ref: LayerRef) -> tuple[str, ...]:
        task = self.workload.task(ref.task)
        if ref.is_loss:
            return task.loss.fields
        _, st, _ = self._stage(ref)
        return st.fields if ref.layer == 0 else ()

    def input_stages(self, ref: LayerRef) -> tuple[str, ...]:
        task = self.workload.task(ref.task)
        if ref.is_loss:
            return task.loss.inputs
        _, st, _ = self._stage(ref)
        return st.inputs if ref.layer == 0 else ()

    def output_shapes(self, task: str, stage: str) -> tuple[tuple[int, ...], ...]:
        return (self._shapes_of(task, stage)[-1],)

    # --- modules ---------------------------------------------------------------------------------
    def operator_modules(self, ref: LayerRef) -> tuple[str, ...]:
        if ref.is_loss:
            fn = self.workload.task(ref.task).loss.fn
            return (f"loss.{ref.task}",) if isinstance(fn, nn.Module) else ()
        _, st, stack = self._stage(ref)
        c = st.component
        paths = [f"{c}.layers.{ref.layer}"]
        if ref.layer == 0 and stack.pre is not None:
            paths.append(f"{c}.pre")
        if ref.layer == stack.layers - 1 and stack.post is not None:
            paths.append(f"{c}.post")
        return tuple(paths)

    def build(self, path: str) -> nn.Module:
        head, _, rest = path.partition(".")
        try:
            if head == LOSS_STAGE:
                fn = self.workload.task(rest).loss.fn
                if not isinstance(fn, nn.Module):
                    raise KeyError(path)
                import copy

                return copy.deepcopy(fn).to(torch.empty(0).device)
            stack = self.stack(head)
            part, _, index = rest.partition(".")
            if part == "layers":
                return stack.build_layer(int(index))
            return stack.build_part(part)
        except (KeyError, ValueError, IndexError):
            raise LayerError(f"no module '{path}'") from None
        except Exception as err:  # the user's factory
            raise LayerError(f"building '{path}' fails: {type(err).__name__}: {err}") from None

    def create(self, path: str, seed: int, dtype: torch.dtype,
               device: torch.device | str = "cpu") -> nn.Module:
        """Built by its factory on the CPU with the global RNG seeded from (seed, path), so the
        user's own initialisation runs, the same on every rank; then cast and moved."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(module_seed(seed, path))
            module = self.build(path)
        if self._frozen_path(path):
            module.requires_grad_(False)
        return module.to(dtype=dtype, device=device)

    def initial_value(
        self, name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype
    ) -> torch.Tensor:
        path, _, inner = _split_name(name, self.workload)
        module = self.create(path, seed, dtype)
        return dict(module.named_parameters())[inner].detach()

    def trainable(self, name: str) -> bool:
        path, _, inner = _split_name(name, self.workload)
        if self._frozen_path(path):
            return False
        return self._requires_grad(path).get(inner, True)

    def _frozen_path(self, path: str) -> bool:
        head = path.partition(".")[0]
        comp = self.workload.components.get(head)
        return isinstance(comp, ModuleStack) and comp.frozen

    def _requires_grad(self, path: str) -> dict[str, bool]:
        got = self._grads.get(path)
        if got is None:
            with torch.device("meta"):
                module = self.build(path)
            got = self._grads[path] = {n: p.requires_grad for n, p in module.named_parameters()}
        return got

    # --- running ---------------------------------------------------------------------------------
    def run(
        self, ref: LayerRef, modules: Mapping[str, nn.Module], carry: Activation | None,
        stage_inputs: Mapping[str, Activation], batch: Mapping[str, torch.Tensor],
        global_batch: int,
    ) -> Output:
        task = self.workload.task(ref.task)
        if ref.is_loss:
            return self._loss(task, modules, stage_inputs, batch, global_batch)
        _, st, stack = self._stage(ref)
        c = st.component
        if ref.layer == 0:
            args = [batch[f] for f in st.fields] + [stage_inputs[s][0] for s in st.inputs]
            x = modules[f"{c}.pre"](*args) if stack.pre is not None else args[0]
        else:
            if carry is None:
                raise LayerError(f"operator {ref}: layer {ref.layer} needs the carry")
            x = carry[0]
        x = _tensor(modules[f"{c}.layers.{ref.layer}"](x), f"{c}.layers.{ref.layer}")
        if ref.layer == stack.layers - 1 and stack.post is not None:
            x = _tensor(modules[f"{c}.post"](x), f"{c}.post")
        return (x,)

    def _loss(self, task: Task, modules: Mapping[str, nn.Module],
              stage_inputs: Mapping[str, Activation], batch: Mapping[str, torch.Tensor],
              global_batch: int) -> torch.Tensor:
        loss = task.loss
        fn: Callable[..., object] = modules[f"loss.{task.name}"] \
            if isinstance(loss.fn, nn.Module) else loss.fn
        outputs = {s: stage_inputs[s][0] for s in loss.inputs}
        value = _scalar(fn(outputs, dict(batch)), task.name)
        if not loss.coupled:
            rows = next(iter(outputs.values())).shape[0]
            value = value * (rows / global_batch)
        return value * task.weight if task.weight != 1.0 else value

    # --- shapes and costs ------------------------------------------------------------------------
    def probe(self, task: str) -> dict[str, torch.Tensor]:
        """One row of ``task``'s data (its first item), floating fields in float32."""
        got = self._probes.get(task)
        if got is None:
            got = {k: v.float() if v.is_floating_point() else v
                   for k, v in probe(self.workload.task(task)).items()}
            self._probes[task] = got
        return got

    def stage_shapes(self, task: str, stage: str) -> list[tuple[int, ...]]:
        """Per-row shapes entering each layer of ``stage``, then of the last layer's output,
        then of the stage's output (inferred on two meta rows)."""
        return self._shapes_of(task, stage)

    def _shapes_of(self, task: str, stage: str) -> list[tuple[int, ...]]:
        """Per-row shapes entering each layer of ``stage``, then of the last layer's output (what
        ``post`` reads), then of the stage's output."""
        if self._stage_shapes is None:
            self._stage_shapes = {}
            for t in self.workload.tasks:
                self._infer(t)
        return self._stage_shapes[(task, stage)]

    def _infer(self, task: Task) -> None:
        """Run every stage of ``task`` on two meta rows; a part that fails is one line."""
        assert self._stage_shapes is not None
        data = self.probe(task.name)
        outs: dict[str, torch.Tensor] = {}
        for st in task.stages:
            stack = self.stack(st.component)
            where = f"task '{task.name}', stage '{st.name}'"
            missing = [f for f in st.fields if f not in data]
            if missing:
                raise LayerError(f"{where}: dataset items have no field '{missing[0]}'"
                                 f" (they have: {', '.join(sorted(data)) or 'none'})")
            # two rows: a module in training mode may need more than one (BatchNorm)
            args = [_meta(data[f]).expand(2, *data[f].shape[1:]) for f in st.fields] + \
                [outs[s] for s in st.inputs]
            c = st.component
            with torch.device("meta"), torch.no_grad():
                if stack.pre is not None:
                    x = self._infer_call(f"{c}.pre", args, f"{where}: {c}.pre")
                else:
                    x = args[0]
                shapes = [tuple(x.shape[1:])]
                for i in range(stack.layers):
                    x = self._infer_call(f"{c}.layers.{i}", [x], f"{where}: {c}.layers.{i}"
                              f" on the output of {'layer ' + str(i - 1) if i else 'the input'}")
                    shapes.append(tuple(x.shape[1:]))
                if stack.post is not None:
                    x = self._infer_call(f"{c}.post", [x], f"{where}: {c}.post")
                shapes.append(tuple(x.shape[1:]))
            self._stage_shapes[(task.name, st.name)] = shapes
            outs[st.name] = x

    def _infer_call(self, path: str, args: list[torch.Tensor], where: str) -> torch.Tensor:
        """The meta output of ``path`` on ``args`` (once per module key and input)."""
        key = (self.module_key(path), *((tuple(a.shape), a.dtype) for a in args))
        got = self._outs.get(key)
        if got is None:
            got = self._outs[key] = _call(self.build(path), args, where)
        return got

    def operator_cost(self, ref: LayerRef, batch: int) -> OperatorCost:
        key = (ref, batch)
        got = self._costs.get(key)
        if got is None:
            got = self._costs[key] = self._count(ref, batch)
        return got

    def _count(self, ref: LayerRef, batch: int) -> OperatorCost:
        task = self.workload.task(ref.task)
        if ref.is_loss:
            shapes = {s: self._shapes_of(ref.task, s)[-1] for s in task.loss.inputs}
            elements = float(sum(math.prod(s) for s in shapes.values()))
            rows = batch if task.loss.coupled else 1
            count = self._count_loss(task, shapes, rows)
            scale = 1.0 if task.loss.coupled else float(batch)
            kind = LOSS_KIND if task.loss.coupled else ROW_LOSS_KIND
            return OperatorCost(kind, int(elements), 1, 0, 1, 0,
                                layer_flops=count.flops * scale, light_flops=0.0,
                                carry_elements=elements, out_elements=0.0,
                                saved_elements=count.saved / (batch if task.loss.coupled else 1),
                                variant=f"loss:{task.name}")
        _, st, stack = self._stage(ref)
        layer_shapes = self._shapes_of(ref.task, ref.stage)
        c = st.component
        data = self.probe(ref.task)
        # inputs carry a gradient only where something trainable comes before them
        before, through = self.gradient_flow()[ref]
        pre_path, layer_path = f"{c}.pre", f"{c}.layers.{ref.layer}"
        light = 0.0
        into_layer = before
        if ref.layer == 0 and stack.pre is not None:
            inputs = [tuple(data[f].shape[1:]) for f in st.fields] + \
                [self._shapes_of(ref.task, s)[-1] for s in st.inputs]
            dtypes = [data[f].dtype for f in st.fields] + [torch.float32] * len(st.inputs)
            grads = [False] * len(st.fields) + [before] * len(st.inputs)
            light += self._per_row(pre_path, inputs, batch, dtypes, grads).flops
            into_layer = before or self.trainable_size(pre_path) > 0
        layer = self._per_row(layer_path, [layer_shapes[ref.layer]], batch, None, [into_layer])
        if ref.layer == stack.layers - 1 and stack.post is not None:
            light += self._per_row(f"{c}.post", [layer_shapes[-2]], batch, None,
                                   [through]).flops
        carry = float(math.prod(layer_shapes[ref.layer]))
        # what this operator hands on: the stage's output after its last layer, else the next
        # layer's input (a MetaOp may end inside a stage where the layers change)
        last = ref.layer == stack.layers - 1
        out = float(math.prod(layer_shapes[-1] if last else layer_shapes[ref.layer + 1]))
        return OperatorCost(
            f"module:{c}", int(carry), 1, 0, 1, 0, layer_flops=layer.flops, light_flops=light,
            carry_elements=carry, out_elements=out, saved_elements=layer.saved / batch,
            input_elements=0.0, variant=self._variant(f"{c}.layers.{ref.layer}"),
        )

    def _variant(self, path: str) -> str:
        """Layers merge into one MetaOp only when they are the same layer (:meth:`_module_key`)."""
        return self.module_key(path)[:12]

    def module_key(self, path: str) -> str:
        """A hash of the module's class, structure (its repr), parameter shapes and whether they
        train: two paths with one key are the same layer, counted once."""
        got = self._keys.get(path)
        if got is None:
            with torch.device("meta"):
                module = self.build(path)
            frozen = self._frozen_path(path)
            text = type(module).__qualname__ + repr(module) + str(frozen) + "".join(
                f"{n}{tuple(p.shape)}{p.requires_grad}" for n, p in module.named_parameters())
            got = self._keys[path] = hashlib.sha256(text.encode()).hexdigest()
        return got

    def _per_row(self, path: str, shapes: list[tuple[int, ...]], batch: int,
                 dtypes: list[torch.dtype] | None, grads: list[bool]) -> _Count:
        """Forward + backward FLOPs and saved elements of ``path`` on ``batch`` rows, from
        counts at two and three rows (a module in training mode may need more than one row);
        ``grads``: which inputs carry a gradient (floating ones only)."""
        two = self._measure(path, shapes, 2, dtypes, grads)
        three = self._measure(path, shapes, 3, dtypes, grads)
        per_row = max(three.flops - two.flops, 0.0)
        return _Count(max(two.flops + (batch - 2) * per_row, per_row),
                      batch * max(three.saved - two.saved, 0.0))

    def _measure(self, path: str, shapes: list[tuple[int, ...]], rows: int,
                 dtypes: list[torch.dtype] | None, grads: list[bool]) -> _Count:
        key = (self.module_key(path), tuple(shapes), rows, tuple(dtypes or ()), tuple(grads))
        got = self._counts.get(key)
        if got is not None:
            return got
        with torch.device("meta"):
            module = self.build(path)
        if self._frozen_path(path):
            module.requires_grad_(False)
        args = []
        for k, shape in enumerate(shapes):
            dtype = dtypes[k] if dtypes is not None else torch.float32
            t = torch.zeros((rows, *shape), dtype=dtype, device="meta")
            args.append(t.requires_grad_(True) if dtype.is_floating_point and grads[k] else t)
        got = self._counts[key] = _count_call(lambda: module(*args), path)
        return got

    def _count_loss(self, task: Task, shapes: dict[str, tuple[int, ...]], rows: int) -> _Count:
        fn = task.loss.fn
        data = self.probe(task.name)
        with torch.device("meta"):
            outputs = {s: torch.zeros((rows, *shape), device="meta").requires_grad_(True)
                       for s, shape in shapes.items()}
            fields = {f: _meta(data[f]).expand(rows, *data[f].shape[1:]) for f in task.loss.fields}
            module = self.build(f"loss.{task.name}") if isinstance(fn, nn.Module) else None
        call = module if module is not None else fn
        try:
            return _count_call(lambda: call(outputs, fields), f"loss of task '{task.name}'")
        except LayerError:
            return _Count(0.0, 0.0)  # a loss that cannot run on meta tensors costs ~nothing

    # --- checks ----------------------------------------------------------------------------------
    def check_runnable(self) -> None:
        """Every stage chains on its dataset's first item (shapes inferred on meta) and every
        loss gives a scalar (where it runs on meta tensors)."""
        for task in self.workload.tasks:
            missing = [f for f in task.loss.fields if f not in self.probe(task.name)]
            if missing:
                raise LayerError(f"task '{task.name}': the loss reads field '{missing[0]}' that"
                                 " the dataset items do not have")
            for st in task.stages:
                self._shapes_of(task.name, st.name)
            self._check_loss_value(task)

    def _check_loss_value(self, task: Task) -> None:
        data = self.probe(task.name)
        fn = task.loss.fn
        with torch.device("meta"), torch.no_grad():
            outputs = {s: torch.zeros((2, *self._shapes_of(task.name, s)[-1]))
                       for s in task.loss.inputs}
            fields = {f: _meta(data[f]).expand(2, *data[f].shape[1:]) for f in task.loss.fields}
            call = self.build(f"loss.{task.name}") if isinstance(fn, nn.Module) else fn
            try:
                value = call(outputs, fields)
            except Exception:  # a loss that cannot run on meta tensors is checked when it runs
                return
        _scalar(value, task.name)


def _split_name(name: str, workload: Workload) -> tuple[str, str, str]:
    """(module path, '.', name inside the module) of a logical parameter name."""
    head, _, rest = name.partition(".")
    if head == LOSS_STAGE:
        task, _, inner = rest.partition(".")
        return f"{head}.{task}", ".", inner
    part, _, rest2 = rest.partition(".")
    if part == "layers":
        index, _, inner = rest2.partition(".")
        return f"{head}.layers.{index}", ".", inner
    return f"{head}.{part}", ".", rest2


def _scalar(value: object, task: str) -> torch.Tensor:
    """A loss's value as a 0-d tensor, or one line saying what it is instead."""
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        what = type(value).__name__ if not isinstance(value, torch.Tensor) \
            else f"a tensor of shape {list(value.shape)}"
        raise LayerError(f"task '{task}': the loss returned {what}, not a scalar")
    return value.reshape(())


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def _tensor(value: object, path: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise LayerError(f"module '{path}' returned {type(value).__name__}, not one tensor")
    return value


def _call(module: nn.Module, args: list[torch.Tensor], where: str) -> torch.Tensor:
    try:
        out = module(*args)
    except Exception as err:  # the user's module
        text = " ".join(str(err).split())
        raise LayerError(f"{where}: fails: {type(err).__name__}: {text}") from None
    if not isinstance(out, torch.Tensor) or out.dim() == 0:
        raise LayerError(f"{where}: returned {type(out).__name__}, not a batch-first tensor")
    return out


def _count_call(fn: Callable[[], object], where: str) -> _Count:
    saved = [0.0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel()
        return t

    try:
        with FlopCounterMode(display=False) as counter:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = fn()
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.sum().backward()
    except Exception as err:
        raise LayerError(f"{where}: cannot be counted on meta tensors: {err}") from None
    return _Count(float(counter.get_total_flops()), saved[0])
