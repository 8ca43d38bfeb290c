"""The settings of one training run, described once.

:class:`RunConfig` is what ``spindle train`` (the launcher), ``python -m spindle.train`` (the
torchrun entry, on every rank) and :class:`spindle.runtime.executor.TrainingRun` share: the
launcher and the entry build their command-line options from its fields
(:meth:`RunConfig.add_arguments`), and the launcher hands the ranks exactly the options that
reproduce its config (:meth:`RunConfig.to_argv`), so an option can never be known to one and
forgotten by the other.  :meth:`RunConfig.check` refuses a bad value in one line before any
process starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from spindle.plan.layout import SYNC_MIN_BUCKET_BYTES

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
}
DEVICES = ("auto", "cpu", "cuda")
SYNC_STARTS = ("auto", "layer", "wave")
PRECISIONS = ("fp32", "bf16-mixed", "fp64")
REDUCE_DTYPES = ("param", "bf16")


class ConfigError(ValueError):
    """A run setting that cannot be used; the message is one line naming the option."""


def _opt(help: str, flag: str | None = None, **argparse_kwargs: Any) -> Any:
    """Field metadata: the option's help, its flag (default ``--field-name``) and argparse's
    other keywords (``choices``, ``metavar``)."""
    return {"help": help, "flag": flag, "argparse": argparse_kwargs}


@dataclass(frozen=True)
class RunConfig:
    """One training run (module docstring).  Defaults are the documented ones."""

    steps: int = field(default=10, metadata=_opt(
        "optimizer steps (the run's total)"))
    seed: int = field(default=0, metadata=_opt("initialisation and data seed"))
    lr: float = field(default=1e-3, metadata=_opt("AdamW learning rate"))
    weight_decay: float = field(default=0.01, metadata=_opt("AdamW weight decay"))
    clip: float = field(default=1.0, metadata=_opt(
        "clip the gradients to this global 2-norm (every parameter counted once)"))
    dtype: str = field(default="float32", metadata=_opt(
        "parameter and compute dtype (the whole model in it; see --precision)",
        choices=sorted(DTYPES)))
    precision: str | None = field(default=None, metadata=_opt(
        "fp32 | fp64 (= --dtype float32 | float64), or bf16-mixed: float32 master weights and"
        " AdamW state, forward and backward under bfloat16 autocast, gradients reduced in"
        " float32 (see --reduce-dtype); default: as --dtype", choices=PRECISIONS))
    reduce_dtype: str = field(default="param", metadata=_opt(
        "dtype of the gradient all-reduce: param (the parameters' dtype) or bf16 (half the"
        " bytes; the sums are rounded to bfloat16)", choices=REDUCE_DTYPES))
    device: str = field(default="auto", metadata=_opt(
        "auto: CUDA (NCCL) when available, else CPU (gloo)", choices=DEVICES))
    save: str | None = field(default=None, metadata=_opt(
        "write the trained parameters to DIR/params.pt (logical name -> tensor)",
        metavar="DIR"))
    metrics: str | None = field(default=None, metadata=_opt(
        "append one JSON line per iteration (rank 0)", metavar="FILE"))
    timeout: float = field(default=120.0, metadata=_opt(
        "seconds a collective may wait before the job fails"))
    overlap_sync: bool = field(default=True, metadata=_opt(
        "all-reduce the gradients after the whole backward instead of each bucket as soon as"
        " the backward waves have made it final", flag="--no-overlap-sync"))
    sync_start: str = field(default="auto", metadata=_opt(
        "when a gradient bucket's all-reduce starts: layer: as soon as the backward has made"
        " its gradients final, inside a wave (post-accumulate-grad hooks); wave: after the"
        " backward of its ready wave; auto: layer on CUDA, wave on CPU (where gloo's"
        " all-reduce shares the cores with the backward: measured no faster, BENCHMARKS.md)",
        choices=SYNC_STARTS))
    min_bucket_bytes: int = field(default=SYNC_MIN_BUCKET_BYTES, metadata=_opt(
        f"a sync bucket ends where the ready wave changes once it holds N bytes (default"
        f" {SYNC_MIN_BUCKET_BYTES}; 0: one bucket per ready point, layer or wave)",
        metavar="N"))
    transfer_chunks: int = field(default=1, metadata=_opt(
        "send a slice's output rows to other ranks in K chunks, each as soon as it is computed"
        " (and its input gradients likewise in backward), from the second iteration on; 1:"
        " everything at the wave boundary (default: what measures best on gloo, BENCHMARKS.md)",
        metavar="K"))
    recompute: bool = field(default=False, metadata=_opt(
        "recompute every operator's activations in backward (torch.utils.checkpoint per layer;"
        " the memory model's --recompute): less memory, one more forward"))
    zero: int | None = field(default=None, metadata=_opt(
        "ZeRO stage for every MetaOp, overriding the plan's choice: 0 none, 1 AdamW state"
        " sharded over each parameter's device group, 2 gradients too (default: as planned)",
        choices=(0, 1, 2), metavar="STAGE"))
    data_workers: int = field(default=0, metadata=_opt(
        "DataLoader worker processes per task and rank for a task's own dataset (0: load in the"
        " rank's process)", metavar="N"))
    progress: bool = field(default=True, metadata=_opt("no progress bar", flag="--no-progress"))
    checkpoint_dir: str | None = field(default=None, metadata=_opt(
        "write checkpoints (torch.distributed.checkpoint) to DIR/step-N", metavar="DIR"))
    checkpoint_every: int = field(default=100, metadata=_opt(
        "checkpoint every K steps, and after the last (0: only after the last)", metavar="K"))
    keep: int = field(default=3, metadata=_opt(
        "keep the newest N checkpoints (0: all)", metavar="N"))
    resume: bool = field(default=False, metadata=_opt(
        "continue from the latest complete checkpoint in --checkpoint-dir, on this plan and"
        " world size (--steps is the run's total)"))

    @property
    def torch_dtype(self) -> torch.dtype:
        """The parameters' dtype (bf16-mixed: float32, the master weights)."""
        if self.precision == "fp64":
            return torch.float64
        if self.precision in ("fp32", "bf16-mixed"):
            return torch.float32
        return DTYPES[self.dtype]

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The compute dtype of forward and backward under autocast (None: no autocast)."""
        return torch.bfloat16 if self.precision == "bf16-mixed" else None

    @property
    def torch_reduce_dtype(self) -> torch.dtype | None:
        """The gradient all-reduce's dtype (None: the parameters')."""
        return torch.bfloat16 if self.reduce_dtype == "bf16" else None

    def sync_start_on(self, device: torch.device) -> str:
        """``sync_start`` with ``auto`` resolved for ``device``."""
        if self.sync_start != "auto":
            return self.sync_start
        return "layer" if device.type == "cuda" else "wave"

    def check(self) -> None:
        """Raise :class:`ConfigError` for the first value that cannot be used."""
        if self.steps < 0:
            raise ConfigError(f"--steps {self.steps}: must be at least 0")
        for name in ("lr", "weight_decay", "clip", "timeout"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (value == 0 and name != "weight_decay"):
                what = "at least 0" if name == "weight_decay" else "above 0"
                raise ConfigError(f"{_flag(name)} {value}: must be a finite number {what}")
        if not 0 <= self.data_workers <= 64:
            raise ConfigError(f"--data-workers {self.data_workers}: must be 0 to 64")
        if self.checkpoint_every < 0:
            raise ConfigError(f"--checkpoint-every {self.checkpoint_every}: must be at least 0")
        if self.keep < 0:
            raise ConfigError(f"--keep {self.keep}: must be at least 0")
        if self.resume and self.checkpoint_dir is None:
            raise ConfigError("--resume: needs --checkpoint-dir DIR (where to resume from)")
        if not 1 <= self.transfer_chunks <= 64:
            raise ConfigError(f"--transfer-chunks {self.transfer_chunks}: must be 1 to 64")
        if self.min_bucket_bytes < 0:
            raise ConfigError(f"--min-bucket-bytes {self.min_bucket_bytes}: must be at least 0")
        implied = {"fp32": "float32", "fp64": "float64", "bf16-mixed": "float32"}
        if self.precision is not None and self.dtype != "float32" and (
                implied[self.precision] != self.dtype):
            what = ("keeps float32 master weights" if self.precision == "bf16-mixed"
                    else f"means --dtype {implied[self.precision]}")
            raise ConfigError(f"--precision {self.precision} with --dtype {self.dtype}: the"
                              f" precision {what}; give one of the two")

    # --- the command line ----------------------------------------------------------------------
    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """One option per field (a boolean field that defaults to True is a ``--no-...``
        switch)."""
        for f in dataclasses.fields(RunConfig):
            meta = f.metadata
            flag = meta["flag"] or _flag(f.name)
            if f.type == "bool":
                action = "store_false" if f.default else "store_true"
                parser.add_argument(flag, dest=f.name, action=action, help=meta["help"])
                continue
            kind = {"int": int, "float": float, "int | None": int}.get(str(f.type), str)
            parser.add_argument(flag, dest=f.name, type=kind, default=f.default,
                                help=_with_default(meta["help"], f.default), **meta["argparse"])

    @staticmethod
    def from_args(args: argparse.Namespace) -> "RunConfig":
        return RunConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)})

    def to_argv(self) -> list[str]:
        """The options that give this config to :meth:`from_args` (defaults left out)."""
        out: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == f.default:
                continue
            flag = f.metadata["flag"] or _flag(f.name)
            out += [flag] if f.type == "bool" else [flag, str(value)]
        return out


def check_autocast(device: torch.device, dtype: torch.dtype) -> None:
    """Refuse (one :class:`ConfigError` line) mixed precision in ``dtype`` on a device that
    cannot compute in it."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported() if dtype == torch.bfloat16 else True
    else:
        try:
            with torch.autocast(device.type, dtype=dtype):
                ok = (torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)).dtype \
                    == dtype
        except (RuntimeError, TypeError):
            ok = False
    if not ok:
        raise ConfigError(f"--precision bf16-mixed: this {device.type.upper()} device cannot"
                          f" compute in {str(dtype).removeprefix('torch.')} (autocast); use"
                          " --precision fp32")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _with_default(help: str, default: object) -> str:
    return help if default is None or "default" in help else f"{help} (default {default})"
