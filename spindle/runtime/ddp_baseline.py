"""The baseline a user would run today: plain DistributedDataParallel over ALL ranks.

The whole model (every component of every task) is replicated on every rank; one iteration runs
the tasks in turn, each rank on its rows [r*B/W, (r+1)*B/W) of every task's batch, then one
backward, DDP's bucketed gradient all-reduce (averaging), clipping and an AdamW step.  Losses are
scaled so that the update equals the single-process one of :func:`train_reference`:

- LM task: a rank's loss is its rows' share of the task's mean (sum over its rows / global token
  count); DDP averages gradients over W ranks, so the share is multiplied by W.
- Contrastive task: the loss needs the whole batch, so each rank gathers both embeddings with
  the autograd-aware ``torch.distributed.nn.functional.all_gather`` (as open_clip does) and
  computes the full loss.  Its backward sums the W identical gradients of a rank's rows, which
  DDP's averaging divides by W again: no scaling needed.

Unused parameters: the model holds only parameters some operator uses, and one forward runs all
tasks, so every parameter gets a gradient every iteration; ``find_unused_parameters`` (an extra
graph traversal per iteration) and ``static_graph`` are therefore not needed.  A workload with a
parameter left out of some iterations would need ``find_unused_parameters=True``.

Run: ``torchrun --nproc-per-node N -m spindle.runtime.ddp_baseline WORKLOAD --steps K``; rank 0
prints one JSON line.  Backend: NCCL with CUDA (one GPU per rank, ``LOCAL_RANK``), else gloo.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from spindle.declare.workload import Workload, load_workload
from spindle.runtime.config import RunConfig
from spindle.runtime.reference import ReferenceModel

log = logging.getLogger(__name__)

RawBatch = dict[str, dict[str, torch.Tensor]]  # task -> field -> this rank's rows


def rank_rows(batch: int, rank: int, world: int) -> slice:
    """Rows of a batch of ``batch`` samples that ``rank`` of ``world`` processes."""
    if batch % world:
        raise ValueError(f"batch size {batch} is not divisible by {world} ranks")
    per = batch // world
    return slice(rank * per, (rank + 1) * per)


def _gather_rows(x: torch.Tensor) -> torch.Tensor:
    return torch.cat(dist_fn.all_gather(x), dim=0)


class ShardedTasks(nn.Module):
    """Wraps a :class:`ReferenceModel`; ``forward(step, raw)`` returns this rank's objective
    (scaled for DDP's gradient averaging) and the detached per-task values."""

    def __init__(self, model: ReferenceModel, rank: int, world: int) -> None:
        super().__init__()
        self.model = model
        self.rank = rank
        self.world = world

    def rows(self, task: str) -> slice:
        return rank_rows(self.model.workload.task(task).batch_size, self.rank, self.world)

    def forward(self, step: int, raw: RawBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts: list[torch.Tensor] = []
        values: dict[str, torch.Tensor] = {}
        for task in self.model.workload.tasks:
            coupled = self.model.coupled(task.name)
            loss = self.model.task_loss(
                task.name, step, self.rows(task.name),
                gather=_gather_rows if coupled else None, batch=raw[task.name],
            )
            values[task.name] = loss.detach()
            parts.append(loss if coupled else loss * self.world)
        return torch.stack(parts).sum(), values


def _init_distributed() -> tuple[bool, torch.device]:
    """Join (or create from torchrun's environment) the default process group."""
    created = False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        created = True
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return created, device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_ddp_baseline(
    workload: Workload, config: RunConfig, warmup: int = 1, return_parameters: bool = False,
) -> dict[str, Any]:
    """Train ``warmup + config.steps`` iterations (data of steps 0, 1, ...) with DDP over all
    ranks and time the last ``config.steps`` (seed, dtype, AdamW and clipping from ``config``).
    Every rank returns the same dict: ``iteration_s`` (per timed iteration, the slowest rank's),
    ``mean_iteration_s``, ``median_iteration_s``, ``losses`` (each task's loss at the last
    iteration), ``grad_norms`` (the total gradient norm before clipping, every iteration), and
    with ``return_parameters`` the final ``parameters`` (logical name -> CPU tensor).  The same
    hyperparameters as :func:`spindle.runtime.reference.train_reference` give the same
    parameters."""
    steps, seed, dtype = config.steps, config.seed, config.torch_dtype
    created, device = _init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        model = ReferenceModel(workload, seed, dtype).to(device)
        sharded = ShardedTasks(model, rank, world)
        ddp = DistributedDataParallel(
            sharded, device_ids=[device] if device.type == "cuda" else None,
            find_unused_parameters=False,
        )
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        times: list[float] = []
        grad_norms: list[float] = []
        values: Mapping[str, torch.Tensor] = {}
        for step in range(warmup + steps):
            # data loading is not timed: a real input pipeline prefetches it
            raw = {
                t.name: model.batch_rows(t.name, step, sharded.rows(t.name))
                for t in workload.tasks
            }
            _sync(device)
            dist.barrier()
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            objective, values = ddp(step, raw)
            objective.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            opt.step()
            _sync(device)
            if step >= warmup:
                times.append(time.perf_counter() - start)
            grad_norms.append(float(norm))
        slowest = torch.tensor(times, dtype=torch.float64, device=device)
        if times:
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        losses = _task_losses(workload, values, world, device)
        result: dict[str, Any] = {
            "workload": workload.name,
            "world_size": world,
            "backend": dist.get_backend(),
            "device": str(device.type),
            "steps": steps,
            "warmup": warmup,
            "iteration_s": slowest.tolist(),
            "mean_iteration_s": statistics.fmean(slowest.tolist()) if times else 0.0,
            "median_iteration_s": statistics.median(slowest.tolist()) if times else 0.0,
            "losses": losses,
            "grad_norms": grad_norms,
        }
        if return_parameters:
            result["parameters"] = {
                n: p.detach().cpu().clone() for n, p in model.named_logical_parameters().items()
            }
        return result
    finally:
        if created:
            dist.destroy_process_group()


def _task_losses(
    workload: Workload, values: Mapping[str, torch.Tensor], world: int, device: torch.device
) -> dict[str, float]:
    """Each task's full loss from the ranks' values: LM shares are summed over ranks, the
    contrastive loss is already whole on every rank."""
    if not values:
        return {}
    vec = torch.stack([values[t.name].to(torch.float64) for t in workload.tasks]).to(device)
    total = vec.clone()
    dist.all_reduce(total)
    return {
        t.name: float(total[i] if t.loss.type == "lm" else vec[i])
        for i, t in enumerate(workload.tasks)
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", help="shipped workload name or YAML/TOML path")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    RunConfig.add_arguments(parser)  # --steps: the timed iterations
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = run_ddp_baseline(load_workload(args.workload), RunConfig.from_args(args),
                              warmup=args.warmup)
    if int(os.environ.get("RANK", "0")) == 0:
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # torch 2.13 + gloo sometimes aborts or hangs in interpreter shutdown after a process group
    # was used; leave directly, as spindle.train does
    os._exit(code)
