"""Is a user's module row-wise in the batch?  Checked on two probe rows before a plan that
splits the module's batch runs.

A plan that runs an operator on several devices gives each a share of the batch's rows, which
is only the same computation if row ``i`` of the output depends on row ``i`` of the input alone.
BatchNorm in training mode is not (it normalises with the batch's statistics), nor a layer that
mixes rows.  Each distinct module (one per :meth:`UserProvider.module_key`) is built on the CPU
in float64, run in training mode on two rows and on each row alone, and the outputs compared.
A module whose output is random (dropout) cannot be told apart this way and is passed over.
A row-wise loss (not ``coupled``) must give the mean of its two rows' losses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import torch

from spindle.declare.datasets import collate
from spindle.declare.workload import LayerRef
from spindle.layers.provider import LayerError
from spindle.layers.user import UserProvider

log = logging.getLogger(__name__)

RTOL, ATOL = 1e-7, 1e-9  # float64: a row-wise module agrees to rounding


def check_rows(provider: UserProvider, refs: Iterable[tuple[LayerRef, int]]) -> None:
    """Raise :class:`LayerError` (one line, the component named) for the first operator of
    ``refs`` (operator, devices its batch is split over) that is not row-wise."""
    done: set[str] = set()
    for ref, devices in refs:
        for path, args in _cases(provider, ref):
            key = path if ref.is_loss else provider.module_key(path)
            if key in done:
                continue
            done.add(key)
            what = f"'{ref.task}/{ref.stage}'" if not ref.is_loss else f"task '{ref.task}'"
            if ref.is_loss:
                _check_loss(provider, ref, args, devices)
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                module = provider.create(path, 0, torch.float64).train()
            gap = _row_gap(lambda *a: module(*a), args)
            if gap is not None:
                raise LayerError(
                    f"component '{ref.component}': module '{path}' is not row-wise in the batch"
                    f" (row 0's output changes by {gap:.3g} when row 1 is in the batch; BatchNorm"
                    f" in training mode?), but the plan splits the batch of {what} over"
                    f" {devices} devices")


def _cases(provider: UserProvider, ref: LayerRef) -> list[tuple[str, list[torch.Tensor]]]:
    """(module path, two rows of its inputs) for each module operator ``ref`` runs."""
    task = provider.workload.task(ref.task)
    rows = _two_rows(provider, ref.task)
    gen = torch.Generator().manual_seed(0)

    def random(shape: Sequence[int]) -> torch.Tensor:
        return torch.randn((2, *shape), generator=gen, dtype=torch.float64)

    if ref.is_loss:
        outs = [random(provider.output_shapes(ref.task, s)[0]) for s in task.loss.inputs]
        return [(f"loss.{ref.task}", outs + [rows[f] for f in task.loss.fields])]
    st = next(s for s in task.stages if s.name == ref.stage)
    stack = provider.stack(st.component)
    shapes = provider.stage_shapes(ref.task, ref.stage)
    c = st.component
    out: list[tuple[str, list[torch.Tensor]]] = []
    if ref.layer == 0 and stack.pre is not None:
        args = [rows[f] for f in st.fields] + \
            [random(provider.output_shapes(ref.task, s)[0]) for s in st.inputs]
        out.append((f"{c}.pre", args))
    out.append((f"{c}.layers.{ref.layer}", [random(shapes[ref.layer])]))
    if ref.layer == stack.layers - 1 and stack.post is not None:
        out.append((f"{c}.post", [random(shapes[-2])]))
    return out


def _two_rows(provider: UserProvider, task_name: str) -> dict[str, torch.Tensor]:
    """Items 0 and 1 of the task's dataset (item 0 twice if it has one), floating fields in
    float64."""
    task = provider.workload.task(task_name)
    n = len(task.dataset)
    items = [task.dataset[0], task.dataset[1 % n]]
    return {k: v.double() if v.is_floating_point() else v
            for k, v in collate(task, items).items()}


def _row_gap(fn: Callable[..., object], args: list[torch.Tensor]) -> float | None:
    """How far ``fn`` on both rows is from ``fn`` on each row alone (None: row-wise, or
    random and so not decidable)."""
    with torch.no_grad():
        both = fn(*args)
        again = fn(*args)
        if not isinstance(both, torch.Tensor) or not isinstance(again, torch.Tensor):
            return None
        if not torch.equal(both, again):
            return None  # random (dropout): the check cannot tell
        try:
            alone = torch.cat([_tensor(fn(*[a[i:i + 1] for a in args])) for i in range(2)])
        except Exception:  # runs on two rows, fails on one: needs the batch (BatchNorm)
            return float("inf")
    if alone.shape != both.shape:
        return float("inf")
    if torch.allclose(alone, both, rtol=RTOL, atol=ATOL):
        return None
    return float((alone - both).abs().max())


def _check_loss(provider: UserProvider, ref: LayerRef, args: list[torch.Tensor],
                devices: int) -> None:
    """A row-wise loss on two rows is the mean of its losses on each row."""
    task = provider.workload.task(ref.task)
    loss = task.loss
    fn = loss.fn
    if isinstance(fn, torch.nn.Module):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            fn = provider.create(f"loss.{ref.task}", 0, torch.float64).train()
    k = len(loss.inputs)

    def call(*a: torch.Tensor) -> torch.Tensor:
        value = fn(dict(zip(loss.inputs, a[:k])), dict(zip(loss.fields, a[k:])))
        return _tensor(value).reshape(1)

    try:
        with torch.no_grad():
            both = call(*args)
            alone = (call(*[a[:1] for a in args]) + call(*[a[1:] for a in args])) / 2
    except Exception as err:  # random outputs may not suit the loss: it cannot be checked
        log.debug("task '%s': the loss cannot be checked on probe rows: %s", ref.task, err)
        return
    if not torch.allclose(alone, both, rtol=1e-6, atol=1e-9):
        raise LayerError(
            f"task '{ref.task}': the loss is not a mean over rows (two rows give"
            f" {float(both):.6g}, the mean of each row alone {float(alone):.6g}), but the plan"
            f" splits it over {devices} devices; declare it coupled=True if it needs the whole"
            " batch")


def _tensor(value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise LayerError(f"returned {type(value).__name__}, not a tensor")
    return value
