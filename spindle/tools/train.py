"""Train a plan for real: the torchrun entry point of the runtime engine.

    torchrun --nproc-per-node N -m spindle.train WORKLOAD --plan plan.json [run options]

The run options are :class:`spindle.runtime.config.RunConfig`'s (``--steps``, ``--seed``,
``--lr``, ``--weight-decay``, ``--clip``, ``--dtype``, ``--save``, ``--metrics``, ...), the same
``spindle train`` takes.  Every rank reads the same plan, builds only its own modules, and runs
the plan's waves
(:class:`spindle.runtime.executor.TrainingRun`).  Backend: gloo on CPU, NCCL on CUDA (device
``cuda:LOCAL_RANK``), with the same code.  Rank 0 shows a progress bar with the per-task losses,
writes one JSON line per iteration to ``--metrics`` and, with ``--save DIR``, the trained
parameters to ``DIR/params.pt`` (logical name -> tensor, the same names whatever the plan or
world size).  Several ``--plan`` files are trained one after the other in one launch, each from
the same initial parameters; with ``--save`` each goes to ``DIR/<plan file stem>/params.pt``.
With ``--checkpoint-dir`` (one plan) the run writes checkpoints and, with ``--resume`` or when
torchrun restarts it (``--max-restarts``), continues from the newest complete one
(:mod:`spindle.runtime.checkpoint`).

Failures (a plan for another world size or workload, a missing or invalid plan file, any error
on any rank) end every rank with one line ``spindle.train: rank R: <reason>`` on stderr and a
non-zero exit status, within the process-group timeout: the failing rank exits at once with
``os._exit`` and torchrun stops the others.  Run without torchrun, it trains on one process.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import re
import signal
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import NoReturn


def _die(rank: int | str, reason: str, status: int = 1) -> NoReturn:
    """Write the one line and leave at once, without running Python's shutdown (a collective
    stuck in another thread must not keep this process alive)."""
    try:
        sys.stderr.flush()
        sys.stderr.write(f"spindle.train: rank {rank}: {reason}\n")
        sys.stderr.flush()
    finally:
        os._exit(status)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """torchrun stops the other ranks with SIGTERM when one fails (or on Ctrl-C): remove any
    half-written output, and say so in one line."""
    from spindle.io import discard_pending  # light, and this may run before the imports below

    discard_pending()
    _die(os.environ.get("RANK", "0"), "stopped by the launcher (another rank failed)",
         128 + signum)


if __name__ == "__main__":
    # Before the heavy imports below: torchrun may stop this rank while it is still importing.
    signal.signal(signal.SIGTERM, _on_sigterm)
    # torch's C++ warnings (a peer's socket closing, say) would come before the one line that
    # says why this rank stops; --verbose shows them (the variable is read when torch loads)
    if "--verbose" not in sys.argv and "-v" not in sys.argv:
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402

from spindle.declare.workload import Workload, WorkloadError, load_workload  # noqa: E402
from spindle.io import OutputError, write_atomic  # noqa: E402
from spindle.layers.provider import LayerError  # noqa: E402
from spindle.plan.checks import load_plan  # noqa: E402
from spindle.plan.contract import Plan, PlanError  # noqa: E402
from spindle.runtime.checkpoint import Checkpointer  # noqa: E402
from spindle.runtime.checkpoint_files import CheckpointError  # noqa: E402
from spindle.runtime.config import ConfigError, RunConfig  # noqa: E402
from spindle.runtime.executor import TrainingRun  # noqa: E402
from spindle.runtime.metrics import MetricsWriter, combine_ranks, vector_length  # noqa: E402
from spindle.tools.preflight import check_model, check_plan, check_run  # noqa: E402

log = logging.getLogger("spindle.train")



class TrainError(RuntimeError):
    """A reason to stop training, reported as one line."""


@dataclass(frozen=True)
class RankEnv:
    """This process's place in the job, from torchrun's environment."""

    rank: int
    world_size: int
    local_rank: int
    launched: bool  # started by torchrun (env:// rendezvous available)

    @staticmethod
    def from_environ() -> "RankEnv":
        launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        return RankEnv(
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            launched=launched,
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m spindle.train",
        description="Train a Spindle plan on torch.distributed (launch with torchrun).",
    )
    p.add_argument("workload", help="a shipped workload name or a YAML/TOML file")
    p.add_argument("--plan", nargs="+", required=True, metavar="PLAN",
                   help="plan JSON file(s); several are trained one after the other")
    RunConfig.add_arguments(p)
    p.add_argument("--verbose", "-v", action="store_true", help="log more")
    return p


# --- set-up ------------------------------------------------------------------------------------


def _setup_logging(rank: int, verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(name)s: rank {rank}: %(message)s"))
    root = logging.getLogger("spindle")
    root.handlers[:] = [handler]
    root.propagate = False
    if verbose:
        root.setLevel(logging.DEBUG if rank == 0 else logging.INFO)
    else:
        root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def choose_device(choice: str, env: RankEnv) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise TrainError("--device cuda: no CUDA device is available")
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def init_distributed(env: RankEnv, device: torch.device, timeout_s: float) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if env.launched and restart > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # a restarted attempt talks through torchrun's store, which still holds the previous
        # attempt's keys (the process groups' peer addresses): give this attempt keys of its own
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                              env.world_size, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=dist.PrefixStore(f"spindle/attempt-{restart}",
                                                                store),
                                rank=env.rank, world_size=env.world_size, timeout=timeout)
    elif env.launched:
        dist.init_process_group(backend, timeout=timeout)
    else:  # one process without torchrun: an in-memory store, no network
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)


def _barrier(device: torch.device) -> None:
    if device.type == "cuda":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


def _plan_labels(paths: list[str]) -> list[str]:
    stems = [Path(p).stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{i}-{s}" for i, s in enumerate(stems)]


# --- training ----------------------------------------------------------------------------------


def train_plan(
    config: RunConfig, workload: Workload, plan: Plan, label: str, env: RankEnv,
    device: torch.device, metrics: MetricsWriter, several: bool,
) -> dict[str, torch.Tensor] | None:
    """Train ``plan`` for ``config.steps`` iterations; returns the parameters on rank 0 when
    ``--save`` is given (None otherwise and on other ranks)."""
    run = TrainingRun(workload, plan, env.rank, env.world_size, device, config)
    tasks = run.task_names
    first, ckpt = 0, None
    if config.checkpoint_dir is not None:
        ckpt = Checkpointer(run, config.checkpoint_dir, config.keep)
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        if config.resume or restarts > 0:
            if restarts > 0:
                log.info("restart %d: resuming from the latest checkpoint", restarts)
            first = ckpt.resume(required=config.resume)
            if first >= config.steps:
                log.info("the checkpoint is at step %d, --steps %d: nothing left to train",
                         first, config.steps)
    desc = f"{label} ({plan.planner})" if several else plan.planner
    bar = tqdm(total=config.steps, initial=min(first, config.steps), desc=desc, unit="it",
               file=sys.stderr, leave=True, disable=env.rank != 0 or not config.progress,
               dynamic_ncols=True)
    times: list[float] = []
    every = config.checkpoint_every
    try:
        for step in range(first, config.steps):
            outcome = run.step(step)
            vec = torch.tensor(outcome.rank_iteration.to_vector(tasks), dtype=torch.float64,
                               device=device)
            if env.world_size > 1:
                gathered = [torch.empty(vector_length(len(tasks)), dtype=torch.float64,
                                        device=device) for _ in range(env.world_size)]
                dist.all_gather(gathered, vec)
                vectors = [g.tolist() for g in gathered]
            else:
                vectors = [vec.tolist()]
            record = combine_ranks(label, plan.planner, step, tasks, vectors, outcome.grad_norm)
            times.append(record.time_s)
            done = step + 1
            if ckpt is not None and (done == config.steps or (every and done % every == 0)):
                record.checkpoint_s = ckpt.save(done)
                if env.rank == 0:
                    log.debug("checkpoint of step %d written in %.3f s", done,
                              record.checkpoint_s)
            if env.rank == 0:
                metrics.write(record)
                bar.set_postfix({t: f"{v:.3f}" for t, v in record.losses.items()}, refresh=False)
                bar.update(1)
    finally:
        bar.close()
    if times:
        tail = times[1:] or times
        log.info("%s: %d steps, mean iteration %.4f s (after the first)", label, len(times),
                 sum(tail) / len(tail))
    if config.save is None:
        return None
    return run.gather_parameters()


def save_parameters(path: Path, params: dict[str, torch.Tensor]) -> str | None:
    """``path`` = a dict logical name -> tensor, written atomically.  When that fails (a full
    disk, a folder made read-only during the run), the trained parameters go to a file of their
    own in the temporary folder instead, and the returned line says where (None: saved)."""
    buf = io.BytesIO()
    torch.save(params, buf)
    try:
        write_atomic(path, buf.getvalue())
        return None
    except OSError as err:
        fd, rescue = tempfile.mkstemp(prefix="spindle-params-", suffix=".pt")
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
        return f"{err}; the trained parameters are in {rescue}"


def run(args: argparse.Namespace, env: RankEnv) -> None:
    config = RunConfig.from_args(args)
    if env.rank == 0:
        check_run(config)  # the outputs are rank 0's
    else:
        config.check()
    workload = load_workload(args.workload)
    plans = [load_plan(p) for p in args.plan]
    if config.checkpoint_dir is not None and len(plans) > 1:
        raise TrainError("--checkpoint-dir: trains one plan (several --plan files were given)")
    for plan, path in zip(plans, args.plan):
        check_plan(plan, workload, env.world_size, path)
        check_model(plan, workload, rows=env.rank == 0)
    device = choose_device(config.device, env)
    init_distributed(env, device, config.timeout)
    if env.world_size > 1:  # the first collective involves everyone (NCCL's P2P needs it)
        _barrier(device)
    metrics = MetricsWriter(config.metrics if env.rank == 0 else None)
    labels = _plan_labels(args.plan)
    failures: list[str] = []
    for plan, label in zip(plans, labels):
        params = train_plan(config, workload, plan, label, env, device, metrics, len(plans) > 1)
        if params is not None and env.rank == 0:
            out = Path(str(config.save)) / ("" if len(plans) == 1 else label) / "params.pt"
            failed = save_parameters(out, params)
            if failed is not None:
                failures.append(failed)
            else:
                log.info("saved %d parameters to %s", len(params), out)
    if env.world_size > 1:
        _barrier(device)  # nobody leaves while another rank may still talk to it
    dist.destroy_process_group()
    if failures:
        raise TrainError(failures[0])


_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
              "Timed out", "timed out", "NCCL", "gloo", "Gloo")


def _one_line(err: BaseException) -> str:
    """The reason of a failure in one line: our own errors as they are, a communication error
    as 'lost contact with another rank', anything else with its type."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(err, (TrainError, PlanError, WorkloadError, LayerError, ConfigError,
                        OutputError, CheckpointError)):
        return first or type(err).__name__
    if isinstance(err, KeyboardInterrupt):
        return "interrupted"
    if isinstance(err, dist.DistError) or any(k in first for k in _PEER_LOST):
        detail = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0]
        return f"lost contact with another rank (it failed or stopped): {detail[:200]}"
    return f"{type(err).__name__}: {first[:300]}" if first else type(err).__name__


def main(argv: list[str] | None = None) -> NoReturn:
    """The process entry: train, then leave with status 0, or 1 after one line."""
    args = build_parser().parse_args(argv)
    env = RankEnv.from_environ()
    _setup_logging(env.rank, args.verbose)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        run(args, env)
    except BaseException as err:  # noqa: BLE001 - every failure becomes one line
        log.debug("failure", exc_info=True)
        _die(env.rank, _one_line(err))
    # Leave without the interpreter's teardown: with gloo, destructors of the communication
    # threads at exit sometimes abort ("terminate called without an active exception") after
    # all work has finished successfully.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
