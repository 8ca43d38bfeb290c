"""Training data: each task's rows at a step, by field (:func:`task_data`).

A workload of user stacks reads each task's own dataset (:class:`DatasetData`: the rows of
:func:`spindle.declare.datasets.item_indices`, loaded through a ``torch.utils.data.DataLoader``
that prefetches the next steps, with worker processes if asked).  A built-in workload trains on
generated data (:class:`GeneratedData`), whose field for a stage's raw tokens is the stage's
name.

Generated data: synthetic, learnable, deterministic from (seed, task, stage, step).

Every sample of a task's batch at a step has a hidden *class* in [0, NUM_CLASSES), drawn from
(seed, task, step), so all stages of one sample agree on it.  Each component renders a class as
a fixed prototype (from (seed, component, tokens)): a token sequence for a ``tokens`` adapter, a
[tokens, dim] feature map for a ``features`` adapter.  A stage's raw input is its component's
prototype of each sample's class with per-sample noise (token substitutions / Gaussian noise)
drawn from (seed, task, stage, step).  So paired modalities carry the same information (the
contrastive loss can fall) and token sequences are predictable (the LM loss can fall), while no
two steps see the same batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from spindle.declare.datasets import check_fields, collate, item_indices, probe
from spindle.declare.workload import Component, ModuleStack, Task, Workload
from spindle.layers.provider import LayerError, keyed_generator

NUM_CLASSES = 16
TOKEN_NOISE = 0.1  # probability that a token is replaced by a random one
FEATURE_NOISE = 0.5  # std of the Gaussian noise added to a feature prototype


def sample_classes(workload: Workload, task: str, step: int, seed: int) -> torch.Tensor:
    """The hidden class of every sample of ``task``'s batch at ``step``: LongTensor [B]."""
    batch = workload.task(task).batch_size
    g = keyed_generator(seed, "classes", task, step)
    return torch.randint(0, NUM_CLASSES, (batch,), generator=g)


def token_range(workload: Workload, component: str) -> int:
    """Tokens are drawn in [0, token_range): inside both the embedding and the LM head."""
    comp = workload.components[component]
    assert isinstance(comp, Component)
    if comp.input is None or comp.input.vocab is None:
        raise LayerError(f"component '{component}' has no 'tokens' input adapter")
    return min(comp.input.vocab, comp.vocab) if comp.vocab is not None else comp.input.vocab


def make_raw(
    workload: Workload, task: str, stage: str, step: int, seed: int
) -> torch.Tensor | None:
    """The FULL batch of raw input of ``stage`` of ``task`` at ``step`` (CPU), or ``None`` if
    the stage reads no raw tokens: LongTensor [B, tokens] in [0, vocab) for a ``tokens``
    adapter, float32 [B, tokens, dim] for a ``features`` adapter."""
    st = next((s for s in workload.task(task).stages if s.name == stage), None)
    if st is None:
        raise LayerError(f"task '{task}' has no stage '{stage}'")
    if st.tokens == 0:
        return None
    comp = workload.components[st.component]
    assert isinstance(comp, Component)
    if comp.input is None:  # the workload validator already refuses this
        raise LayerError(f"{task}/{stage}: tokens {st.tokens} but no input adapter")
    classes = sample_classes(workload, task, step, seed)
    batch = classes.shape[0]
    proto_gen = keyed_generator(seed, "prototype", st.component, st.tokens)
    noise_gen = keyed_generator(seed, "raw", task, stage, step)
    if comp.input.type == "tokens":
        vocab = token_range(workload, st.component)
        proto = torch.randint(0, vocab, (NUM_CLASSES, st.tokens), generator=proto_gen)
        tokens = proto[classes]
        replace = torch.rand(batch, st.tokens, generator=noise_gen) < TOKEN_NOISE
        random_tokens = torch.randint(0, vocab, (batch, st.tokens), generator=noise_gen)
        return torch.where(replace, random_tokens, tokens)
    dim = int(comp.input.dim or 0)
    proto = torch.randn(NUM_CLASSES, st.tokens, dim, generator=proto_gen)
    noise = torch.randn(batch, st.tokens, dim, generator=noise_gen)
    return proto[classes] + FEATURE_NOISE * noise


class TaskData:
    """One task's data: :meth:`rows` gives rows [start, end) of its batch at a step, by field
    (CPU tensors)."""

    def rows(self, step: int, start: int, end: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class GeneratedData(TaskData):
    """The generated data of a built-in task: one field per stage that reads raw tokens."""

    def __init__(self, workload: Workload, task: str, seed: int) -> None:
        self.workload, self.task, self.seed = workload, task, seed
        self._step: int | None = None
        self._full: dict[str, torch.Tensor] = {}

    def rows(self, step: int, start: int, end: int) -> dict[str, torch.Tensor]:
        if self._step != step:
            self._full = {}
            for st in self.workload.task(self.task).stages:
                raw = make_raw(self.workload, self.task, st.name, step, self.seed)
                if raw is not None:
                    self._full[st.name] = raw
            self._step = step
        return {name: full[start:end] for name, full in self._full.items()}


class _StepRows:
    """Batch sampler: the dataset indices of rows [start, end) of every step from ``first``."""

    def __init__(self, task: Task, seed: int, first: int, start: int, end: int) -> None:
        self.task, self.seed, self.first, self.start, self.end = task, seed, first, start, end

    def __iter__(self) -> Iterator[list[int]]:
        step = self.first
        while True:
            yield item_indices(self.task, self.seed, step, self.start, self.end)
            step += 1


class _Indexed(torch.utils.data.Dataset[tuple[int, Any]]):
    """The task's dataset, each item with its index (so that a message can name it)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return i, self.dataset[i]


class DatasetData(TaskData):
    """A user task's dataset, read through a DataLoader per row range (its iterator runs ahead
    by ``prefetch`` steps per worker when ``workers`` > 0)."""

    def __init__(self, task: Task, seed: int, workers: int = 0, prefetch: int = 2) -> None:
        self.task, self.seed, self.workers, self.prefetch = task, seed, workers, prefetch
        self.reference = probe(task)
        self._streams: dict[tuple[int, int], tuple[int, Iterator[Any]]] = {}

    def _collate(self, pairs: list[tuple[int, Any]]) -> dict[str, torch.Tensor]:
        return collate(self.task, [item for _, item in pairs], [i for i, _ in pairs])

    def rows(self, step: int, start: int, end: int) -> dict[str, torch.Tensor]:
        key = (start, end)
        got = self._streams.get(key)
        if got is None or got[0] != step:
            loader = DataLoader(
                _Indexed(self.task.dataset),
                batch_sampler=_StepRows(self.task, self.seed, step, start, end),
                collate_fn=self._collate, num_workers=self.workers,
                prefetch_factor=self.prefetch if self.workers else None,
                persistent_workers=False,
            )
            got = (step, iter(loader))
        batch: dict[str, torch.Tensor] = next(got[1])
        self._streams[key] = (step + 1, got[1])
        first = item_indices(self.task, self.seed, step, start, start + 1)[0]
        check_fields(self.task, batch, self.reference, first)
        return batch


def task_data(workload: Workload, task: str, seed: int, workers: int = 0) -> TaskData:
    """The data of ``task``: its dataset for user stacks, else generated."""
    if any(isinstance(c, ModuleStack) for c in workload.components.values()):
        return DatasetData(workload.task(task), seed, workers)
    return GeneratedData(workload, task, seed)
