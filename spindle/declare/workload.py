"""Workload declaration: components (stacks of identical layers) and tasks (DAGs of stages).

A *component* is a stack of identical transformer blocks with the light parts around it: an
input adapter (token embedding or a linear patch/feature projection), an optional output
projection (e.g. the 1024-d CLIP embedding) and an optional LM head.  Components are shared
between tasks: every task that runs ``text`` uses the same parameters.

A *task* is one data flow: a DAG of *stages*.  A stage runs one component on one task's data.
It reads ``tokens`` raw tokens of its own through the component's input adapter, and/or the
outputs of earlier stages listed in ``inputs`` (each projected to the component's hidden size and
concatenated along the token axis).  A decoder stage names a ``memory`` stage it cross-attends to.
Each task has one loss: ``contrastive`` (symmetric InfoNCE between two stages' pooled, projected
outputs, with a learnable temperature) or ``lm`` (next-token cross entropy over a stage's own
raw tokens).

Two equal ways to declare a workload: build :class:`Workload` in Python, or write a YAML/TOML
file with the same fields and call :func:`load_workload`.  Every check raises
:class:`WorkloadError` with one line that names the file, the field and the value.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator

from spindle.validation import format_validation_error, read_user_file

BlockKind = Literal["encoder", "decoder", "llm"]
"""``encoder``: pre-LN bidirectional self-attention + GELU MLP.  ``decoder``: causal
self-attention + cross-attention to a memory + GELU MLP.  ``llm``: causal self-attention + SwiGLU
MLP (Qwen/LLaMA style)."""


LOSS_STAGE = "loss"
"""The ``stage`` of a contrastive loss operator (its ``component`` is ``""``)."""


@dataclass(frozen=True, order=True)
class LayerRef:
    """One operator (SPINDLE's unit of work): layer ``layer`` of ``component`` in ``stage`` of
    ``task``.  A task's contrastive loss is the operator ``(task, "loss", "", 0)``."""

    task: str
    stage: str
    component: str
    layer: int

    @property
    def is_loss(self) -> bool:
        return self.stage == LOSS_STAGE and self.component == ""


# Limits of a description, so that every step of planning stays polynomial in its size (a limit
# is far above any real model: Qwen-7B has 32 layers, hidden 4096, a 151,936-token vocabulary).
MAX_LAYERS = 100_000
MAX_WIDTH = 1_000_000  # hidden, ffn, feature dim, output_dim, heads
MAX_VOCAB = 100_000_000
MAX_TOKENS = 100_000_000
MAX_BATCH = 1_000_000_000
MAX_OPERATORS = 1_000_000  # layers over every stage of every task


class WorkloadError(ValueError):
    """A workload that cannot be used; the message is one line naming the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputAdapter(_Strict):
    """How raw data enters a component: ``tokens`` (an embedding table of ``vocab`` rows) or
    ``features`` (a linear projection of ``dim`` features per token, e.g. flattened patches)."""

    type: Literal["tokens", "features"]
    vocab: StrictInt | None = Field(default=None, gt=0, le=MAX_VOCAB)
    dim: StrictInt | None = Field(default=None, gt=0, le=MAX_WIDTH)

    @model_validator(mode="after")
    def _check(self) -> "InputAdapter":
        if self.type == "tokens" and self.vocab is None:
            raise ValueError("input of type 'tokens' needs 'vocab'")
        if self.type == "features" and self.dim is None:
            raise ValueError("input of type 'features' needs 'dim'")
        return self


class Component(_Strict):
    """A stack of ``layers`` identical blocks plus its adapter, projection and head."""

    kind: BlockKind = "encoder"
    layers: StrictInt = Field(gt=0, le=MAX_LAYERS)
    hidden: StrictInt = Field(gt=0, le=MAX_WIDTH)
    heads: StrictInt = Field(gt=0, le=MAX_WIDTH)
    ffn: StrictInt | None = Field(default=None, gt=0, le=MAX_WIDTH,
                            description="MLP size; default 4 * hidden")
    input: InputAdapter | None = None
    output_dim: StrictInt | None = Field(default=None, gt=0, le=MAX_WIDTH,
                                   description="final projection size")
    vocab: StrictInt | None = Field(default=None, gt=0, le=MAX_VOCAB,
                              description="LM head size (lm loss)")

    @model_validator(mode="after")
    def _check(self) -> "Component":
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        return self

    @property
    def ffn_size(self) -> int:
        return self.ffn if self.ffn is not None else 4 * self.hidden


class Stage(_Strict):
    """One component run on one task's data."""

    name: str = Field(min_length=1)
    component: str = Field(min_length=1)
    tokens: StrictInt = Field(default=0, ge=0, le=MAX_TOKENS,
                        description="raw tokens read through the input adapter")
    inputs: tuple[str, ...] = Field(default=(), description="earlier stages, concatenated")
    memory: str | None = Field(default=None, description="stage a decoder cross-attends to")
    pool_to: StrictInt | None = Field(default=None, gt=0, le=MAX_TOKENS,
                                description="average-pool output tokens")

    @property
    def sources(self) -> tuple[str, ...]:
        """The earlier stages this stage reads: its ``inputs``, then its ``memory``."""
        return (*self.inputs, *([self.memory] if self.memory else []))


class Loss(_Strict):
    type: Literal["contrastive", "lm"]
    inputs: tuple[str, ...] = Field(default=(), description="contrastive: the two stages")
    stage: str | None = Field(default=None, description="lm: the stage whose tokens are predicted")


class Task(_Strict):
    name: str = Field(min_length=1)
    batch_size: StrictInt = Field(gt=0, le=MAX_BATCH)
    stages: tuple[Stage, ...] = Field(min_length=1)
    loss: Loss


class Workload(_Strict):
    """The whole multi-task model: shared components and the tasks that flow through them."""

    name: str = Field(min_length=1)
    description: str = ""
    components: dict[str, Component] = Field(min_length=1)
    tasks: tuple[Task, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_references(self) -> "Workload":
        _check_tasks(self)
        return self

    # --- derived facts -------------------------------------------------------------------------
    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    def stage_tokens(self, task: Task) -> dict[str, int]:
        """Sequence length inside each stage (input tokens) of ``task``."""
        seq: dict[str, int] = {}
        out: dict[str, int] = {}
        for st in task.stages:
            n = st.tokens + sum(out[i] for i in st.inputs)
            seq[st.name] = n
            out[st.name] = st.pool_to if st.pool_to is not None else n
        return seq

    def stage_output_tokens(self, task: Task) -> dict[str, int]:
        seq = self.stage_tokens(task)
        return {st.name: st.pool_to if st.pool_to is not None else seq[st.name]
                for st in task.stages}

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def fingerprint(self) -> str:
        """A short hash of the workload's content; plans record it to refuse a mismatch."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _check_tasks(w: Workload) -> None:
    operators = sum(w.components[st.component].layers for t in w.tasks for st in t.stages
                    if st.component in w.components)
    if operators > MAX_OPERATORS:
        raise ValueError(f"{operators} operators (layers over every stage of every task): at most"
                         f" {MAX_OPERATORS} are planned")
    names = set()
    for task in w.tasks:
        where = f"task '{task.name}'"
        if task.name in names:
            raise ValueError(f"{where}: duplicate task name")
        names.add(task.name)
        seen: dict[str, Stage] = {}
        for st in task.stages:
            if st.name in seen:
                raise ValueError(f"{where}: duplicate stage name '{st.name}'")
            comp = w.components.get(st.component)
            if comp is None:
                raise ValueError(
                    f"{where}, stage '{st.name}': unknown component '{st.component}'"
                    f" (known: {', '.join(sorted(w.components))})"
                )
            for ref in st.sources:
                if ref == st.name:
                    raise ValueError(f"{where}, stage '{st.name}': cycle (stage reads itself)")
                if ref not in seen:
                    later = {s.name for s in task.stages}
                    what = "cycle or out-of-order reference" if ref in later else "unknown stage"
                    raise ValueError(f"{where}, stage '{st.name}': {what} '{ref}'")
            if st.tokens == 0 and not st.inputs:
                raise ValueError(f"{where}, stage '{st.name}': reads nothing (tokens 0, no inputs)")
            if st.tokens > 0 and comp.input is None:
                raise ValueError(
                    f"{where}, stage '{st.name}': tokens {st.tokens} but component"
                    f" '{st.component}' has no 'input' adapter"
                )
            if comp.kind == "decoder" and st.memory is None:
                raise ValueError(f"{where}, stage '{st.name}': decoder component needs 'memory'")
            if comp.kind != "decoder" and st.memory is not None:
                raise ValueError(f"{where}, stage '{st.name}': 'memory' needs a decoder component")
            seen[st.name] = st
        loss = task.loss
        if loss.type == "contrastive":
            if len(loss.inputs) != 2:
                raise ValueError(f"{where}: contrastive loss needs exactly 2 inputs")
            for ref in loss.inputs:
                if ref not in seen:
                    raise ValueError(f"{where}: loss input '{ref}' is not a stage")
                if w.components[seen[ref].component].output_dim is None:
                    raise ValueError(f"{where}: loss input '{ref}' has no output_dim projection")
            dims = {w.components[seen[r].component].output_dim for r in loss.inputs}
            if len(dims) != 1:
                raise ValueError(f"{where}: contrastive inputs have different output_dim {dims}")
        else:
            if loss.stage not in seen:
                raise ValueError(f"{where}: lm loss stage '{loss.stage}' is not a stage")
            st = seen[loss.stage]
            comp = w.components[st.component]
            if comp.vocab is None or comp.input is None or comp.input.type != "tokens":
                raise ValueError(
                    f"{where}: lm loss stage '{st.name}' needs a component with 'vocab' and a"
                    " 'tokens' input"
                )
            if st.tokens < 2:
                raise ValueError(f"{where}: lm loss stage '{st.name}' needs at least 2 tokens")
        consumed = {r for s in task.stages for r in s.sources}
        consumed |= set(loss.inputs) | ({loss.stage} if loss.stage else set())
        for st in task.stages:
            if st.name not in consumed:
                raise ValueError(f"{where}: stage '{st.name}' feeds nothing (no loss reaches it)")


# --- loading ---------------------------------------------------------------------------------

SHIPPED_DIR = Path(__file__).parent / "workloads"


def shipped_workloads() -> list[str]:
    """Names of the workloads that ship with the package."""
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml"))



def workload_from_dict(data: Any, source: str = "<workload>") -> Workload:
    if not isinstance(data, dict):
        raise WorkloadError(f"{source}: expected a mapping at the top level")
    try:
        return Workload.model_validate(data)
    except ValidationError as err:
        raise WorkloadError(format_validation_error(source, err)) from None


def load_workload(name_or_path: str | Path) -> Workload:
    """Load a shipped workload by name, or a ``.yaml``/``.yml``/``.toml`` file by path."""
    text_name = str(name_or_path)
    path = Path(text_name)
    if not path.exists():
        shipped = SHIPPED_DIR / f"{text_name}.yaml"
        if shipped.exists():
            path = shipped
        else:
            raise WorkloadError(
                f"workload '{text_name}': no such file and no shipped workload of that name"
                f" (shipped: {', '.join(shipped_workloads())})"
            )
    data = read_user_file(path, "toml" if path.suffix == ".toml" else "yaml", WorkloadError)
    return workload_from_dict(data, str(path))
