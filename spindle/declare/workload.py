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

Components may also be stacks of the user's own ``nn.Module``s (:class:`ModuleStack`, see
:mod:`spindle.declare.modules`), trained on the tasks' own datasets with their own (``custom``)
losses; such a workload is built in Python, in a ``.py`` file that defines ``workload()``.

Ways to declare a workload: build :class:`Workload` in Python, write a YAML/TOML file with the
same fields, or a ``.py`` file; :func:`load_workload` reads the files.  Every check raises
:class:`WorkloadError` with one line that names the file, the field and the value.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    StrictBool,
    StrictInt,
    Tag,
    ValidationError,
    model_validator,
)

from spindle.declare.limits import (
    MAX_BATCH,
    MAX_LAYERS,
    MAX_OPERATORS,
    MAX_TOKENS,
    MAX_VOCAB,
    MAX_WIDTH,
)
from spindle.declare.modules import ModuleStack, check_custom_loss, check_user_stage
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


def _component_tag(value: Any) -> str:
    if isinstance(value, ModuleStack):
        return "module"
    if isinstance(value, dict) and value.get("kind") == "module":
        return "module"
    return "builtin"


ComponentSpec = Annotated[
    Annotated[Component, Tag("builtin")] | Annotated[ModuleStack, Tag("module")],
    Discriminator(_component_tag),
]
"""A built-in transformer stack, or a stack of the user's modules."""


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
    fields: tuple[str, ...] = Field(default=(), description="dataset fields a user stack's pre"
                                    " module reads (ModuleStack components)")

    @property
    def sources(self) -> tuple[str, ...]:
        """The earlier stages this stage reads: its ``inputs``, then its ``memory``."""
        return (*self.inputs, *([self.memory] if self.memory else []))


class Loss(_Strict):
    """A task's loss: ``contrastive`` or ``lm`` on built-in components, or ``custom``: the
    callable ``fn(outputs, batch)`` over the outputs of the ``inputs`` stages and the dataset
    ``fields`` (:mod:`spindle.declare.modules`); ``coupled`` when it needs the whole batch at
    once (a contrastive loss) rather than being a mean over rows."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    type: Literal["contrastive", "lm", "custom"]
    inputs: tuple[str, ...] = Field(default=(), description="contrastive: the two stages;"
                                    " custom: the stages whose outputs fn reads")
    stage: str | None = Field(default=None, description="lm: the stage whose tokens are predicted")
    fn: Any = Field(default=None, exclude=True, description="custom: (outputs, batch) -> scalar")
    fields: tuple[str, ...] = Field(default=(), description="custom: dataset fields fn reads")
    coupled: StrictBool = False


class Task(_Strict):
    """One data flow.  A task of user stacks reads a map-style ``dataset`` whose items are dicts
    of tensors (``collate`` merges a list of them; default: stacked field by field); task t's
    batch at step s is items [s*B, (s+1)*B), wrapping around, or a seeded permutation per
    epoch with ``shuffle``.  ``weight`` scales the task's loss in the iteration's sum."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    name: str = Field(min_length=1)
    batch_size: StrictInt = Field(gt=0, le=MAX_BATCH)
    stages: tuple[Stage, ...] = Field(min_length=1)
    loss: Loss
    dataset: Any = Field(default=None, exclude=True)
    collate: Any = Field(default=None, exclude=True)
    shuffle: StrictBool = False
    weight: float = Field(default=1.0, gt=0, allow_inf_nan=False)


class Workload(_Strict):
    """The whole multi-task model: shared components and the tasks that flow through them."""

    name: str = Field(min_length=1)
    description: str = ""
    components: dict[str, ComponentSpec] = Field(min_length=1)
    tasks: tuple[Task, ...] = Field(min_length=1)
    _fingerprint: str | None = PrivateAttr(default=None)
    _source: str | None = PrivateAttr(default=None)  # the .py file it was loaded from

    def __reduce__(self) -> Any:
        """A workload of user modules loaded from a ``.py`` file pickles as that file (its
        factories and datasets need not pickle): a spawned process loads it again."""
        if self._source is not None:
            return (load_workload, (self._source,))
        return super().__reduce__()

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
        """The declaration as JSON data (a user stack's modules, datasets and loss callables
        are not in it).  The fields of user models are left out at their defaults, so that a
        workload without them has the same fingerprint as before they existed."""
        data = self.model_dump(mode="json", exclude_none=True)
        for task in data["tasks"]:
            _drop_defaults(task, {"shuffle": False, "weight": 1.0})
            _drop_defaults(task["loss"], {"fields": [], "coupled": False})
            for st in task["stages"]:
                _drop_defaults(st, {"fields": []})
        return data

    def fingerprint(self) -> str:
        """A short hash of the workload's content; plans record it to refuse a mismatch
        (computed once: a workload is immutable)."""
        if self._fingerprint is None:
            self._fingerprint = self._hash()
        return self._fingerprint

    def _hash(self) -> str:
        data = self.to_dict()
        modules = {name: c.signature() for name, c in self.components.items()
                   if isinstance(c, ModuleStack)}
        if modules:  # a user stack's parameters are not in its fields
            data["modules"] = modules
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _drop_defaults(data: dict[str, Any], defaults: dict[str, Any]) -> None:
    for key, value in defaults.items():
        if key in data and data[key] == value:
            del data[key]


def _check_tasks(w: Workload) -> None:
    operators = sum(w.components[st.component].layers for t in w.tasks for st in t.stages
                    if st.component in w.components)
    if operators > MAX_OPERATORS:
        raise ValueError(f"{operators} operators (layers over every stage of every task): at most"
                         f" {MAX_OPERATORS} are planned")
    user = {isinstance(c, ModuleStack) for c in w.components.values()}
    if len(user) > 1:
        raise ValueError("a workload mixes built-in components and user stacks (ModuleStack);"
                         " make every component one or the other")
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
            if isinstance(comp, ModuleStack):
                check_user_stage(where, st, comp)
            else:
                _check_builtin_stage(where, st, comp)
            seen[st.name] = st
        if user == {True} and task.loss.type != "custom":
            raise ValueError(f"{where}: a task of user stacks needs a custom loss (type 'custom',"
                             f" not '{task.loss.type}')")
        if task.loss.type == "custom":
            check_custom_loss(where, task, seen, user == {True})
        else:
            _check_builtin_loss(w, where, task, seen)
        loss = task.loss
        consumed = {r for s in task.stages for r in s.sources}
        consumed |= set(loss.inputs) | ({loss.stage} if loss.stage else set())
        for st in task.stages:
            if st.name not in consumed:
                raise ValueError(f"{where}: stage '{st.name}' feeds nothing (no loss reaches it)")


def _check_builtin_stage(where: str, st: Stage, comp: Component) -> None:
    where = f"{where}, stage '{st.name}'"
    if st.fields:
        raise ValueError(f"{where}: 'fields' is for user stacks; a built-in component reads"
                         " 'tokens'")
    if st.tokens == 0 and not st.inputs:
        raise ValueError(f"{where}: reads nothing (tokens 0, no inputs)")
    if st.tokens > 0 and comp.input is None:
        raise ValueError(
            f"{where}: tokens {st.tokens} but component '{st.component}' has no 'input' adapter")
    if comp.kind == "decoder" and st.memory is None:
        raise ValueError(f"{where}: decoder component needs 'memory'")
    if comp.kind != "decoder" and st.memory is not None:
        raise ValueError(f"{where}: 'memory' needs a decoder component")


def _check_builtin_loss(w: Workload, where: str, task: Task, seen: dict[str, Stage]) -> None:
    loss = task.loss
    if loss.fn is not None or loss.fields or loss.coupled:
        raise ValueError(f"{where}: 'fn', 'fields' and 'coupled' are for custom losses")
    if task.dataset is not None or task.collate is not None or task.shuffle:
        raise ValueError(f"{where}: a task of built-in components trains on generated data;"
                         " 'dataset' needs user stacks (ModuleStack)")
    if task.weight != 1.0:
        raise ValueError(f"{where}: 'weight' is for custom losses")
    if loss.type == "contrastive":
        if len(loss.inputs) != 2:
            raise ValueError(f"{where}: contrastive loss needs exactly 2 inputs")
        for ref in loss.inputs:
            if ref not in seen:
                raise ValueError(f"{where}: loss input '{ref}' is not a stage")
            if _builtin(w, seen[ref].component).output_dim is None:
                raise ValueError(f"{where}: loss input '{ref}' has no output_dim projection")
        dims = {_builtin(w, seen[r].component).output_dim for r in loss.inputs}
        if len(dims) != 1:
            raise ValueError(f"{where}: contrastive inputs have different output_dim {dims}")
        return
    if loss.stage not in seen:
        raise ValueError(f"{where}: lm loss stage '{loss.stage}' is not a stage")
    st = seen[loss.stage]
    comp = _builtin(w, st.component)
    if comp.vocab is None or comp.input is None or comp.input.type != "tokens":
        raise ValueError(f"{where}: lm loss stage '{st.name}' needs a component with 'vocab' and"
                         " a 'tokens' input")
    if st.tokens < 2:
        raise ValueError(f"{where}: lm loss stage '{st.name}' needs at least 2 tokens")


def _builtin(w: Workload, component: str) -> Component:
    comp = w.components[component]
    assert isinstance(comp, Component)
    return comp


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
        raise WorkloadError(format_validation_error(source, err, ("builtin", "module"))) from None


def load_workload(name_or_path: str | Path) -> Workload:
    """Load a shipped workload by name, a ``.yaml``/``.yml``/``.toml`` file by path, or a ``.py``
    file that defines ``workload()`` returning a :class:`Workload`."""
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
    if path.suffix == ".py":
        return load_python_workload(path)
    data = read_user_file(path, "toml" if path.suffix == ".toml" else "yaml", WorkloadError)
    return workload_from_dict(data, str(path))


def load_python_workload(path: Path) -> Workload:
    """Run the Python file ``path`` (as its own module; its folder stays importable, for the
    factories it may call later) and call its ``workload()``; anything that goes wrong is one
    line naming the file.  Both run with PyTorch's global RNG seeded to 0 (the caller's state is
    kept), so modules the file builds as instances have the same values in every process."""
    import runpy
    import sys

    import torch

    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            namespace = runpy.run_path(str(path), run_name=f"spindle_workload_{path.stem}")
        except Exception as err:  # the user's code: any error is theirs, said in one line
            raise WorkloadError(f"{path}: fails to import: {_one_line(err)}") from None
        make = namespace.get("workload")
        if not callable(make):
            raise WorkloadError(f"{path}: defines no workload() function")
        try:
            w = make()
        except ValidationError as err:
            raise WorkloadError(format_validation_error(f"{path}: workload()", err,
                                                        ("builtin", "module"))) from None
        except Exception as err:
            raise WorkloadError(f"{path}: workload() fails: {_one_line(err)}") from None
    if not isinstance(w, Workload):
        raise WorkloadError(f"{path}: workload() returned {type(w).__name__}, not a"
                            " spindle Workload")
    w._source = str(path.resolve())
    return w


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
