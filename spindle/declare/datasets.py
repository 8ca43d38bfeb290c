"""Reading a task's dataset: which items make a step's batch, and merging items into fields.

Items of a task's map-style dataset are dicts of tensors.  Task t's batch at step s is the items
at global positions [s*B, (s+1)*B) of an endless stream: position g is item ``g mod N``, or, with
``shuffle``, item ``perm_e[g mod N]`` where ``perm_e`` is a permutation of the N items drawn
from (seed, task, epoch e = g // N).  :func:`collate` merges a list of items into the batch's
fields (the task's ``collate``, or stacked field by field) and checks what it got.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from spindle.declare.workload import Task, WorkloadError


def item_indices(task: Task, seed: int, step: int, start: int, end: int) -> list[int]:
    """Dataset indices of rows [start, end) of ``task``'s batch at ``step``."""
    n = len(task.dataset)
    if n == 0:
        raise WorkloadError(f"task '{task.name}': the dataset is empty")
    base = step * task.batch_size
    positions = range(base + start, base + end)
    if not task.shuffle:
        return [g % n for g in positions]
    out: list[int] = []
    perms: dict[int, torch.Tensor] = {}
    for g in positions:
        epoch = g // n
        if epoch not in perms:
            gen = torch.Generator().manual_seed(_epoch_seed(seed, task.name, epoch))
            perms[epoch] = torch.randperm(n, generator=gen)
        out.append(int(perms[epoch][g % n]))
    return out


def collate(task: Task, items: Sequence[Any], indices: Sequence[int] | None = None
            ) -> dict[str, torch.Tensor]:
    """The batch made of ``items`` (``indices``: their indices in the dataset, for messages): a
    dict of batch-first tensors, by field."""
    index = list(indices) if indices is not None else list(range(len(items)))
    where = f"task '{task.name}'"
    for k, item in enumerate(items):
        if not isinstance(item, dict):
            raise WorkloadError(f"{where}: dataset item {index[k]} is a {type(item).__name__},"
                                " not a dict of tensors")
    if task.collate is not None:
        try:
            batch = task.collate(list(items))
        except Exception as err:  # the user's code
            raise WorkloadError(f"{where}: collate fails: {type(err).__name__}: {err}") from None
    else:
        batch = _stack(where, items, index)
    if not isinstance(batch, dict):
        raise WorkloadError(f"{where}: collate returned a {type(batch).__name__}, not a dict")
    for name, value in batch.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or \
                value.shape[0] != len(items):
            raise WorkloadError(f"{where}: field '{name}' of the batch is not a batch-first tensor"
                                f" of {len(items)} rows")
    return batch


def probe(task: Task) -> dict[str, torch.Tensor]:
    """The batch of the dataset's first item alone (shapes and dtypes of every field)."""
    if len(task.dataset) == 0:
        raise WorkloadError(f"task '{task.name}': the dataset is empty")
    return collate(task, [task.dataset[0]])


def check_fields(task: Task, batch: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                 first: int) -> None:
    """Every field a batch must have, with the probe's dtype and per-row shape."""
    for name, want in reference.items():
        got = batch.get(name)
        if got is None:
            raise WorkloadError(f"task '{task.name}': dataset rows from item {first} have no"
                                f" field '{name}'")
        if got.dtype != want.dtype or got.shape[1:] != want.shape[1:]:
            raise WorkloadError(
                f"task '{task.name}': field '{name}' of the rows from item {first} is"
                f" {got.dtype} {list(got.shape[1:])}, item 0's is {want.dtype}"
                f" {list(want.shape[1:])}")


def _stack(where: str, items: Sequence[dict[str, Any]], index: list[int]
           ) -> dict[str, torch.Tensor]:
    keys = list(items[0])
    out: dict[str, torch.Tensor] = {}
    for name in keys:
        values = []
        for k, item in enumerate(items):
            value = item.get(name)
            if not isinstance(value, torch.Tensor):
                what = "no field" if value is None else f"a {type(value).__name__} in field"
                raise WorkloadError(f"{where}: dataset item {index[k]} has {what} '{name}'"
                                    + ("" if value is None else " (tensors only)"))
            values.append(value)
        shapes = {tuple(v.shape) for v in values}
        dtypes = {v.dtype for v in values}
        if len(shapes) > 1 or len(dtypes) > 1:
            k = next(k for k, v in enumerate(values)
                     if (v.dtype, v.shape) != (values[0].dtype, values[0].shape))
            raise WorkloadError(
                f"{where}: field '{name}' of dataset item {index[k]} is {values[k].dtype}"
                f" {list(values[k].shape)}, item {index[0]}'s is {values[0].dtype}"
                f" {list(values[0].shape)}; pad them or give the task a 'collate'")
        out[name] = torch.stack(values)
    return out


def _epoch_seed(seed: int, task: str, epoch: int) -> int:
    import hashlib

    digest = hashlib.sha256(f"{seed}:shuffle:{task}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
