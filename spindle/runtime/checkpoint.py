"""Saving and resuming a training run with torch.distributed.checkpoint (DCP), on any plan.

:class:`Checkpointer` writes, collectively, the folder :mod:`spindle.runtime.checkpoint_files`
describes: each rank hands DCP what it holds (its parameters, their AdamW state, its generator
state); parameters held by several ranks (a device group's replicas) are written once, by DCP's
de-duplication.  Rank 0 then writes the manifest (step, each task's data position, the plan's
planner and world size, the workload fingerprint, every file's size and CRC-32) and publishes
the folder with one rename.

Resuming reads by logical name, so the plan, the planner and the world size may all differ from
the run that saved: each rank loads exactly the parameters and optimizer state it holds now.
When the workload changed (tasks or components added or removed), the parameters both models
have are carried, the new ones keep their fresh initialisation (the same as in a fresh run), and
the checkpoint's others are *set aside*: loaded (spread over the ranks) and written again with
every later checkpoint, so that nothing is lost when old checkpoints are pruned.  A task's data
position continues where it stopped; a new task starts at position 0.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from spindle.io import write_atomic
from spindle.runtime.checkpoint_files import (
    MODEL,
    OPTIM,
    PLAN_FILE,
    RNG,
    CheckpointError,
    Manifest,
    digest,
    find_latest,
    match_model,
    partial_folder,
    prune,
    publish,
    step_folder,
    tensor_specs,
)
from spindle.runtime.executor import TrainingRun

log = logging.getLogger(__name__)

ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")


def model_shapes(run: TrainingRun) -> dict[str, tuple[int, ...]]:
    """Every logical parameter of the run's workload (not only this rank's) with its shape."""
    return {name: tuple(shape) for members in run.local.members.values()
            for name, shape in members.items()}


class Checkpointer:
    """Collective save and resume of ``run`` under ``root`` (every rank builds one)."""

    def __init__(self, run: TrainingRun, root: str | Path, keep: int) -> None:
        self.run = run
        self.root = Path(root)
        self.keep = keep
        self.set_aside: dict[str, torch.Tensor] = {}  # this rank's share of them
        self.set_aside_names: list[str] = []

    # -- saving ---------------------------------------------------------------------------------
    def _state(self) -> dict[str, torch.Tensor]:
        run = self.run
        sd: dict[str, torch.Tensor] = {MODEL + n: p.detach() for n, p in run.local.params.items()}
        for n, state in run.optimizer_state().items():
            for key, value in state.items():
                if key in ADAM_STATE:
                    sd[f"{OPTIM}{key}/{n}"] = value
        sd[f"{RNG}{run.rank}/cpu"] = torch.get_rng_state()
        sd.update(self.set_aside)
        return sd

    def save(self, steps_done: int) -> float:
        """Write the checkpoint of the state after ``steps_done`` steps; returns the seconds it
        took (collective: every rank calls it at the same step)."""
        run = self.run
        t0 = time.perf_counter()
        partial = partial_folder(self.root, steps_done)
        if run.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        self._barrier()
        dcp.save(self._state(), checkpoint_id=str(partial))
        mine = {p.name: digest(p) for p in partial.glob(f"__{run.rank}_*.distcp")}
        everyone: list[dict[str, list[int]] | None] = [None] * run.world_size
        if run.world_size > 1:
            dist.all_gather_object(everyone, mine)
        else:
            everyone = [mine]
        if run.rank == 0:
            write_atomic(partial / PLAN_FILE, run.plan.to_json())
            files = {k: v for part in everyone for k, v in (part or {}).items()}
            files[".metadata"] = digest(partial / ".metadata")
            files[PLAN_FILE] = digest(partial / PLAN_FILE)
            manifest = Manifest(
                step=steps_done, workload=run.workload.name,
                fingerprint=run.workload.fingerprint(), planner=run.plan.planner,
                world_size=run.world_size, seed=run.config.seed,
                data_positions=run.data_positions(steps_done), files=files,
                set_aside=self.set_aside_names)
            write_atomic(partial / "spindle.json", manifest.to_json())
            _sync_folder(partial)
            publish(partial, step_folder(self.root, steps_done))
            _sync_folder(self.root)
            prune(self.root, self.keep)
        self._barrier()
        return time.perf_counter() - t0

    # -- resuming -------------------------------------------------------------------------------
    def resume(self, required: bool) -> int:
        """Load the latest complete checkpoint into the run; returns its step (the first step to
        train).  Without one: raises when ``required``, else returns 0 (a fresh start)."""
        run = self.run
        found: list[object] = [None]
        if run.rank == 0:
            try:
                folder, manifest, skipped = find_latest(self.root)
                for reason in skipped:
                    log.warning("skipping %s", reason)
                found = [(str(folder), manifest)]
            except CheckpointError as err:
                found = [str(err)]
        if run.world_size > 1:
            dist.broadcast_object_list(found, src=0)
        if isinstance(found[0], str):
            if required:
                raise CheckpointError(found[0])
            log.info("no checkpoint to resume in %s: starting from step 0", self.root)
            return 0
        chosen = found[0]
        assert isinstance(chosen, tuple)
        folder, manifest = Path(chosen[0]), chosen[1]
        assert isinstance(manifest, Manifest)
        carry = match_model(folder, manifest, run.workload.name, model_shapes(run))
        if run.rank == 0:
            log.info("%s", carry.describe(folder, manifest.step))
            if manifest.seed != run.config.seed:
                log.warning("the checkpoint was trained with --seed %d, this run uses %d (data"
                            " and new parameters follow the new seed)", manifest.seed,
                            run.config.seed)
        self._load(folder, manifest, carry.set_aside)
        run.set_data_positions(manifest.step, manifest.data_positions)
        return manifest.step

    def _load(self, folder: Path, manifest: Manifest, set_aside: list[str]) -> None:
        run = self.run
        specs = tensor_specs(folder)
        sd: dict[str, torch.Tensor] = {}
        for n, p in run.local.params.items():
            if MODEL + n in specs:
                sd[MODEL + n] = p.detach()
        opt_state: dict[str, dict[str, torch.Tensor]] = {}
        if run.optimizer is not None:
            for n, p in run.local.params.items():
                if not p.requires_grad or f"{OPTIM}exp_avg/{n}" not in specs:
                    continue  # a parameter the saved run had frozen, or did not have
                state = {}
                for key in ADAM_STATE:
                    shape, dtype = specs[f"{OPTIM}{key}/{n}"]
                    state[key] = (torch.empty(shape, dtype=dtype) if key == "step"
                                  else torch.empty_like(p.detach()))
                    sd[f"{OPTIM}{key}/{n}"] = state[key]
                opt_state[n] = state
        rng_key = f"{RNG}{run.rank}/cpu"
        same_world = manifest.world_size == run.world_size
        if same_world and rng_key in specs:
            sd[rng_key] = torch.empty(specs[rng_key][0], dtype=specs[rng_key][1])
        # the set-aside parameters and their state, spread over the ranks (those an earlier
        # resume set aside were written again, so they are among the checkpoint's own)
        self.set_aside_names = sorted(set_aside)
        mine = {n for i, n in enumerate(self.set_aside_names) if i % run.world_size == run.rank}
        self.set_aside = {}
        for key, (shape, dtype) in specs.items():
            name = key.partition("/")[2] if key.startswith(MODEL) else key.split("/", 2)[-1]
            if (key.startswith(MODEL) or key.startswith(OPTIM)) and name in mine:
                self.set_aside[key] = torch.empty(shape, dtype=dtype)
        sd.update(self.set_aside)
        dcp.load(sd, checkpoint_id=str(folder))
        if rng_key in sd:
            torch.set_rng_state(sd[rng_key])
        run.load_optimizer_state(opt_state)

    def _barrier(self) -> None:
        if self.run.world_size > 1:
            dist.barrier()


def _sync_folder(folder: Path) -> None:
    """fsync a folder, so that a rename in it survives a crash."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = ["Checkpointer", "CheckpointError", "model_shapes"]
