"""What is checked before a training run starts any process: one place for ``spindle train`` and
for the torchrun entry, so that a bad plan or an unwritable output is one line, at once.

* the plan is for this workload and world size, and its MetaOps are exactly the workload's
  contraction (a hand-edited plan that drops a layer or changes a batch is refused, naming the
  first difference);
* the workload's modules can run it: every stage chains on a probe row, every loss gives a
  scalar, and every module whose batch the plan splits over several devices is row-wise
  (:func:`check_model`);
* the run options are usable (:meth:`spindle.runtime.config.RunConfig.check`);
* the outputs can be written: ``--save`` is a folder (or can be made one) that takes a file,
  ``--metrics`` a file that can be appended to;
* ``--resume``: the newest complete checkpoint belongs to this workload and its shared
  parameters have this model's shapes (:func:`check_resume`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from spindle.costs.graph import contract
from spindle.declare.workload import LayerRef, Workload
from spindle.layers import provider_for
from spindle.layers.provider import parameter_index
from spindle.layers.rowwise import check_rows
from spindle.layers.user import UserProvider
from spindle.plan.checks import validate_plan
from spindle.plan.contract import Plan, PlanError
from spindle.plan.layout import iter_slices
from spindle.runtime.checkpoint_files import find_latest, match_model
from spindle.runtime.config import ConfigError, RunConfig, check_autocast


def check_plan(plan: Plan, workload: Workload, world_size: int, source: str) -> None:
    """Refuse a plan made for another workload or world size, or whose MetaOps are not exactly
    ``workload``'s contraction; ``source`` names the plan in the message."""
    if plan.workload_fingerprint != workload.fingerprint():
        raise PlanError(
            f"{source}: plan is for workload '{plan.workload}' (fingerprint"
            f" {plan.workload_fingerprint}), not '{workload.name}' ({workload.fingerprint()})"
        )
    if plan.num_devices != world_size:
        raise PlanError(
            f"{source}: plan is for {plan.num_devices} devices but {world_size} ranks were"
            f" launched (use --nproc-per-node {plan.num_devices})"
        )
    validate_plan(plan, contract(workload).metaops, source=source)


def check_model(plan: Plan, workload: Workload, rows: bool = True) -> None:
    """The workload's modules can run ``plan`` (module docstring); ``rows``: also probe the
    modules whose batch the plan splits (the launcher and one rank do; it builds one of each
    distinct module on the CPU)."""
    provider = provider_for(workload)
    provider.check_runnable()
    if not rows or not isinstance(provider, UserProvider):
        return
    split: dict[LayerRef, int] = {}
    for _, s in iter_slices(plan.waves):
        m = plan.metaops[s.metaop]
        if s.n > 1 and not m.is_loss:  # a coupled loss runs on one device
            for ref in m.layers[s.layer_start:s.layer_end]:
                split[ref] = max(split.get(ref, 0), s.n)
    check_rows(provider, split.items())


def check_run(config: RunConfig) -> None:
    """The run options, then every output the run will write."""
    config.check()
    if config.autocast_dtype is not None:
        cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
        check_autocast(torch.device("cuda" if cuda else "cpu"), config.autocast_dtype)
    if config.save is not None:
        _check_folder(Path(config.save), "--save")
    if config.checkpoint_dir is not None and not config.resume:
        _check_folder(Path(config.checkpoint_dir), "--checkpoint-dir")
    if config.metrics is not None:
        _check_appendable(Path(config.metrics), "--metrics")


def _check_folder(folder: Path, option: str) -> None:
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{option} {folder}: exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".spindle-check-"):
            pass
    except OSError as err:
        raise ConfigError(f"{option} {folder}: cannot write there: {err.strerror}") from None


def _check_appendable(path: Path, option: str) -> None:
    if path.is_dir():
        raise ConfigError(f"{option} {path}: is a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        os.close(fd)
    except OSError as err:
        raise ConfigError(f"{option} {path}: cannot write there: {err.strerror}") from None


def check_resume(root: str | Path, workload: Workload) -> str:
    """Before any process starts: the latest complete checkpoint of ``root`` can be resumed
    by ``workload`` (sizes checked, not contents: the ranks do that); returns the line that
    says what will be carried.  Raises :class:`CheckpointError`."""
    provider = provider_for(workload)
    index = parameter_index(provider, contract(workload).metaops)
    shapes = {n: tuple(s) for path in index.names
              for n, s in provider.parameter_shapes(path).items()}
    folder, manifest, _ = find_latest(Path(root), contents=False)  # rank 0 says what it skips
    return match_model(folder, manifest, workload.name, shapes).describe(folder, manifest.step)
