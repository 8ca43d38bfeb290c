"""Checkpoint folders on disk: their layout and manifest, finding the latest complete one, and
reading one back without a process group (for ``spindle export`` and the launcher's checks).

A checkpoint directory ``DIR`` holds one folder per saved step::

    DIR/step-00000006/
        .metadata, __R_I.distcp    torch.distributed.checkpoint (DCP) files
        plan.json                  the plan that was trained
        spindle.json               the manifest (this module's), written last

Keys of the DCP state dict, every one by logical name (the same whatever the plan or world size):

* ``model/<name>``: every parameter, frozen ones too;
* ``optim/<state>/<name>``: AdamW's state of a trainable parameter (``step``, ``exp_avg``,
  ``exp_avg_sq``);
* ``rng/<rank>/cpu``: each rank's torch generator state.

A checkpoint is complete or absent: the ranks write into ``DIR/.partial-step-N``, then rank 0
writes the manifest (every file's size and CRC-32) and renames the folder to ``step-N``.  A
folder without a manifest, or whose files do not match it, is not a checkpoint: resuming skips
it for the previous complete one and says so.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "spindle.json"
PLAN_FILE = "plan.json"
MODEL, OPTIM, RNG = "model/", "optim/", "rng/"
_STEP = re.compile(r"^step-(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the folder."""


@dataclass(frozen=True)
class Manifest:
    """What a checkpoint folder holds besides the tensors."""

    step: int  # optimizer steps completed
    workload: str
    fingerprint: str
    planner: str
    world_size: int
    seed: int
    data_positions: dict[str, int]  # task -> batches it has consumed
    files: dict[str, list[int]]  # file name -> [size, crc32]
    set_aside: list[str] = field(default_factory=list)  # parameters of no current component
    format: int = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @staticmethod
    def read(folder: Path) -> "Manifest":
        path = folder / MANIFEST
        if not path.is_file():
            raise CheckpointError(f"{folder}: no {MANIFEST} (a save that did not finish)")
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != FORMAT:
                raise CheckpointError(f"{path}: format {raw.get('format')!r}, expected {FORMAT}")
            return Manifest(**raw)
        except CheckpointError:
            raise
        except (ValueError, TypeError, OSError) as err:
            raise CheckpointError(f"{path}: unreadable manifest: {err}") from None


def step_folder(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def partial_folder(root: Path, step: int) -> Path:
    return Path(root) / f".partial-step-{step:08d}"


def digest(path: Path) -> list[int]:
    """[size, CRC-32] of a file."""
    crc = 0
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return [size, crc]


def verify(folder: Path, contents: bool = True) -> Manifest:
    """The folder's manifest, after checking that every file it lists is there with its size
    (and, with ``contents``, its CRC-32)."""
    manifest = Manifest.read(folder)
    for name, (size, crc) in sorted(manifest.files.items()):
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{folder}: {name} is missing")
        if path.stat().st_size != size:
            raise CheckpointError(f"{folder}: {name} has {path.stat().st_size} bytes, the"
                                  f" manifest says {size} (truncated?)")
        if contents and digest(path)[1] != crc:
            raise CheckpointError(f"{folder}: {name} is corrupted (CRC-32 differs)")
    return manifest


def checkpoints(root: Path) -> list[tuple[int, Path]]:
    """The ``step-N`` folders of ``root``, newest first."""
    found = [(int(m.group(1)), p) for p in Path(root).iterdir()
             if p.is_dir() and (m := _STEP.match(p.name))]
    return sorted(found, reverse=True)


def find_latest(root: Path, contents: bool = True) -> tuple[Path, Manifest, list[str]]:
    """The newest complete checkpoint of ``root``: (folder, manifest, why each newer one was
    skipped).  Raises :class:`CheckpointError` when there is none."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"--checkpoint-dir {root}: no such folder")
    skipped: list[str] = []
    for _, folder in checkpoints(root):
        try:
            return folder, verify(folder, contents), skipped
        except CheckpointError as err:
            skipped.append(str(err))
    if skipped:
        raise CheckpointError(f"--checkpoint-dir {root}: no complete checkpoint ({skipped[0]})")
    if any(root.iterdir()):
        raise CheckpointError(f"--checkpoint-dir {root}: not a Spindle checkpoint folder (no"
                              " step-N folders)")
    raise CheckpointError(f"--checkpoint-dir {root}: empty, nothing to resume")


def tensor_specs(folder: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor key of the checkpoint with its shape and dtype (from DCP's metadata)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        meta = FileSystemReader(str(folder)).read_metadata()
    except Exception as err:  # noqa: BLE001 - any unreadable metadata is one line
        raise CheckpointError(f"{folder}: unreadable DCP metadata: {err}") from None
    return {k: (tuple(v.size), v.properties.dtype)
            for k, v in meta.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


def read_tensors(folder: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """The checkpoint's tensors whose key starts with ``prefix`` (the prefix removed), read
    into this process's memory without a process group."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    specs = tensor_specs(folder)
    sd = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in specs.items()
          if k.startswith(prefix)}
    try:
        _load_state_dict(sd, storage_reader=FileSystemReader(str(folder)), no_dist=True)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{folder}: cannot read: {str(err).splitlines()[0][:200]}") from None
    return {k[len(prefix):]: v for k, v in sorted(sd.items())}


def _group(name: str) -> str:
    """The component a logical parameter belongs to (``loss.<task>`` for a loss's own)."""
    head, _, rest = name.partition(".")
    return f"loss.{rest.partition('.')[0]}" if head == "loss" else head


@dataclass(frozen=True)
class Carry:
    """How a checkpoint's parameters meet the model being resumed."""

    carried: list[str]
    added: list[str]  # the model's, absent from the checkpoint: initialised fresh
    set_aside: list[str]  # the checkpoint's, of no current component: kept in later saves

    def describe(self, folder: Path, step: int) -> str:
        def part(names: list[str]) -> str:
            groups = sorted({_group(n) for n in names})
            return f"{', '.join(groups)} ({len(names)} tensors)" if names else "none"

        return (f"resumed from {folder} at step {step}: carried {part(self.carried)}; added"
                f" {part(self.added)} (initialised fresh); set aside {part(self.set_aside)}"
                " (kept in the checkpoints)")


def match_model(folder: Path, manifest: Manifest, workload: str,
                shapes: dict[str, tuple[int, ...]]) -> Carry:
    """Compare the checkpoint's parameters with the model's (logical name -> shape); raises
    :class:`CheckpointError` for a checkpoint of another workload (by name: a changed task set
    keeps its workload's name) or model (no parameter in common), or for shared parameters whose
    shapes differ (naming them)."""
    if manifest.workload != workload:
        raise CheckpointError(f"{folder}: a checkpoint of workload '{manifest.workload}', not"
                              f" '{workload}'")
    specs = tensor_specs(folder)
    saved = {k[len(MODEL):]: s for k, (s, _) in specs.items() if k.startswith(MODEL)}
    common = sorted(set(saved) & set(shapes))
    if not common:
        raise CheckpointError(f"{folder}: a checkpoint of another model (none of its"
                              f" {len(saved)} parameters is this model's)")
    wrong = [n for n in common if tuple(saved[n]) != tuple(shapes[n])]
    if wrong:
        shown = ", ".join(f"{n} {list(saved[n])} vs {list(shapes[n])}" for n in wrong[:3])
        more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        raise CheckpointError(f"{folder}: parameters differ in shape (checkpoint vs model):"
                              f" {shown}{more}")
    return Carry(common, sorted(set(shapes) - set(saved)), sorted(set(saved) - set(shapes)))


def prune(root: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` complete checkpoints (0: keep all) and any partial
    folder."""
    for p in Path(root).glob(".partial-step-*"):
        shutil.rmtree(p, ignore_errors=True)
    if keep <= 0:
        return
    for _, folder in checkpoints(root)[keep:]:
        shutil.rmtree(folder, ignore_errors=True)


def publish(partial: Path, final: Path) -> None:
    """Make ``partial`` the checkpoint ``final`` in one rename (an older folder of that name,
    from a run that went back to an earlier step, is replaced)."""
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        partial.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        partial.rename(final)


__all__ = ["CheckpointError", "Manifest", "Carry", "find_latest", "verify", "read_tensors",
           "tensor_specs", "match_model", "prune", "publish", "step_folder", "partial_folder",
           "digest", "checkpoints", "MODEL", "OPTIM", "RNG", "MANIFEST", "PLAN_FILE"]
