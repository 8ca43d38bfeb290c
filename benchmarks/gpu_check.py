"""What only a GPU shows, in one short run: the figures BENCHMARKS.md quotes for a CUDA machine.

Sections (``--sections``, all by default), each writing its rows to ``OUT/gpu_check.json`` as it
finishes (a later section's failure loses nothing), under one deadline (``--budget-s``):

* ``env``: torch, CUDA, NCCL, the GPU; a bf16 8192^3 matrix product's rate (the achievable peak)
  and a device-to-device copy's bandwidth.
* ``layers``: forward + backward of one bare built-in block of every distinct MetaOp signature of
  the shipped paper workloads, at the per-device batch of n = 1, 2, 4, ... devices, with float32
  parameters under bf16 autocast (the runtime's bf16-mixed), timed with CUDA synchronisation;
  next to each, the hardware model's prediction (:meth:`HardwareModel.compute_time` of the block's
  FLOPs) for ``--hardware``.  Also the runtime's optimizer step (``AdamW(foreach=True)``) over
  a few parameter counts: the figures a measured GPU preset is fitted from.
* ``train``: the CUDA path end to end: ``spindle train`` (torchrun, NCCL, one process) on a small
  workload for 50 steps in fp32 and in bf16-mixed (the two loss curves side by side), and a paper
  workload planned with the default options (the planner picks the memory strategy).
* ``memory``: one process (NCCL, world size 1), bf16-mixed: the memory model's figure for the
  device against ``torch.cuda.max_memory_allocated`` over the third step, per workload and
  strategy (none, recompute).
* ``overlap``: whether a gradient all-reduce on its own stream runs alongside compute: matrix
  products on the default stream, a collective (NCCL all-reduce; with world size 1, also a
  memory-bound reduction kernel standing in for one) on a side stream, each alone and together;
  share hidden = (compute + communication - together) / communication.

    python benchmarks/gpu_check.py --out DIR [--sections env layers ...] [--quick]

``--quick`` (any machine, CPU too) runs every section at toy sizes: a check of the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

SECTIONS = ("env", "layers", "train", "memory", "overlap")
PAPER = ("qwen-val-3", "multitask-clip-10", "ofasys-7")
SMALL = ("small-multitask-clip", "small-ofasys", "small-qwen-val")


class Report:
    """The rows so far, rewritten atomically to ``out/gpu_check.json`` after every section."""

    def __init__(self, out: Path, budget_s: float) -> None:
        self.out, self.path = out, out / "gpu_check.json"
        self.deadline = time.monotonic() + budget_s
        self.data: dict[str, Any] = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


def timed(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of ``fn`` (device synchronised around each run)."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def autocast(device: torch.device, enabled: bool) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


# --- env ---------------------------------------------------------------------------------------


def section_env(device: torch.device, quick: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"torch": torch.__version__, "python": sys.version.split()[0]}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        row |= {"gpu": p.name, "memory_bytes": p.total_memory, "sms": p.multi_processor_count,
                "cuda": torch.version.cuda, "nccl": ".".join(map(str, torch.cuda.nccl.version())),
                "bf16": torch.cuda.is_bf16_supported()}
    n = 512 if quick else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = timed(lambda: a @ b, device, 3, 10)
    row["matmul_n"], row["matmul_flops"] = n, 2 * n**3 / t
    x = torch.empty(2**28 if not quick else 2**20, device=device, dtype=torch.float32)
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x), device, 3, 10)
    row["copy_bytes_per_s"] = 2 * x.nbytes / t  # read + write
    return row


# --- layers ------------------------------------------------------------------------------------


def _time_block(block: torch.nn.Module, kind: str, rows: int, tokens: int, memory_tokens: int,
                hidden: int, device: torch.device) -> float:
    """Median seconds of one forward + backward of ``block`` on ``rows`` sequences (float32
    parameters, bf16 autocast on CUDA)."""
    params = list(block.parameters())
    x = torch.randn(rows, tokens, hidden, device=device, requires_grad=True)
    mem = torch.randn(rows, memory_tokens, hidden, device=device) if kind == "decoder" else None
    g = torch.randn(rows, tokens, hidden, device=device)

    def step() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        with autocast(device, device.type == "cuda"):
            y = block(x, mem)
        y.float().backward(g)

    return timed(step, device, 2, 5)


def section_layers(device: torch.device, quick: bool, hardware: str, report: Report
                   ) -> dict[str, Any]:
    from spindle.costs.graph import contract
    from spindle.costs.hardware import load_hardware
    from spindle.costs.scalability import signature
    from spindle.declare.workload import load_workload
    from spindle.layers.blocks import Block
    from spindle.tools.profile import block_flops

    hw = load_hardware(hardware)
    rows: list[dict[str, Any]] = []
    seen: set[tuple[Any, ...]] = set()
    counts = (1, 2, 4, 8, 16, 32, 64)
    for name in (SMALL[:1] if quick else PAPER):
        for op in contract(load_workload(name)).metaops:
            if op.is_loss or signature(op) in seen:
                continue
            seen.add(signature(op))
            c = op.cost
            block = Block(op.kind, c.hidden, c.heads, c.ffn).to(device)
            for n in counts:
                b = op.batch // n
                if b < 1 or report.left() < 60:
                    break
                flops = block_flops(op) * b / op.batch
                t = _time_block(block, op.kind, b, c.tokens, c.memory_tokens, c.hidden, device)
                rows.append({"workload": name, "signature": list(signature(op)), "n": n,
                             "rows": b, "flops": flops, "measured_s": t,
                             "predicted_s": hw.compute_time(flops)})
            del block
            if device.type == "cuda":
                torch.cuda.empty_cache()
    opt_rows = []
    for count in ((2**16, 2**18) if quick else (2**24, 2**26, 2**28)):
        ps = [torch.nn.Parameter(torch.randn(count // 16, device=device)) for _ in range(16)]
        for p in ps:
            p.grad = torch.randn_like(p)
        opt = torch.optim.AdamW(ps, lr=1e-3, foreach=True)
        t = timed(opt.step, device, 2, 5)
        opt_rows.append({"params": count, "seconds": t, "predicted_s": hw.optimizer_time(count)})
        del ps, opt
    return {"hardware": hardware, "layers": rows, "optimizer": opt_rows,
            "fit": fit_preset(rows, opt_rows)}


def fit_preset(rows: list[dict[str, Any]], opt_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The hardware model's compute constants fitted to the measured layer calls: least
    squares (relative) of ``t = a + w / b`` over the rows, so ``b = peak * max_efficiency``
    and ``a`` the fixed part per call; ``layer_overhead_s`` is the smallest call's time less
    its work at ``b`` (what is left when the work vanishes), the rest of ``a`` goes to
    ``efficiency_half_work_flops``; the AdamW rows give ``memory_bandwidth`` at 28 B/param.
    Paste the result into hardware.yaml with the run's date as the source."""
    import numpy as np

    if len(rows) < 2:
        return {}
    w = np.array([r["flops"] for r in rows])
    t = np.array([r["measured_s"] for r in rows])
    # minimise sum ((a + w/b - t) / t)^2: linear in (a, 1/b)
    A = np.stack([1.0 / t, w / t], axis=1)
    (a, inv_b), *_ = np.linalg.lstsq(A, np.ones_like(t), rcond=None)
    b = 1.0 / inv_b if inv_b > 0 else float("inf")
    small = int(np.argmin(w))
    overhead = float(max(min(t[small] - w[small] / b, a), 0.0))
    err = (a + w / b - t) / t
    out = {"a_s": float(a), "b_flops": float(b), "layer_overhead_s": overhead,
           "efficiency_half_work_flops": float(max(a - overhead, 0.0) * b),
           "median_abs_error": float(np.median(np.abs(err))), "max_abs_error":
           float(np.max(np.abs(err)))}
    if opt_rows:
        per_param = max(r["seconds"] / r["params"] for r in opt_rows)
        out["memory_bandwidth"] = 28.0 / per_param
    return out


# --- train -------------------------------------------------------------------------------------


def _train(args: list[str], timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp) / "m.jsonl"
        plan = Path(tmp) / "plan.json"
        cmd = [sys.executable, "-m", "spindle", "train", *args, "--metrics", str(metrics),
               "--save-plan", str(plan), "--no-progress"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        row: dict[str, Any] = {"args": args, "rc": proc.returncode,
                               "wall_s": time.perf_counter() - t0}
        if proc.returncode:
            row["stderr"] = proc.stderr[-3000:]
            return row
        lines = [json.loads(s) for s in metrics.read_text().splitlines() if s.strip()]
        row["iterations"] = lines
        saved = json.loads(plan.read_text())
        row["plan"] = {k: saved.get(k) for k in ("planner", "recompute", "zero")}
        row["log"] = proc.stderr[-1500:]
        return row


def section_train(device: torch.device, quick: bool, report: Report) -> dict[str, Any]:
    dev = ["--device", device.type, "--nproc", "1"]
    steps = "5" if quick else "50"
    out: dict[str, Any] = {}
    precisions = ("fp32",) if device.type != "cuda" else ("fp32", "bf16-mixed")
    for precision in precisions:
        out[precision] = _train(["small-ofasys", *dev, "--steps", steps, "--precision", precision],
                                timeout=min(240.0, report.left()))
    if not quick and report.left() > 150:
        # a paper workload at its real size on one device: the planner (memory check on, the
        # hardware model's 80 GB device) picks the memory strategy, the runtime trains it
        out["ofasys-4"] = _train(["ofasys-4", *dev, "--steps", "4", "--precision", "bf16-mixed",
                                  "--hardware", "h100"],
                                 timeout=min(300.0, report.left() - 30))
    return out


# --- memory ------------------------------------------------------------------------------------


def _init_single(device: torch.device) -> None:
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                store=dist.HashStore(), rank=0, world_size=1)


def section_memory(device: torch.device, quick: bool, report: Report) -> list[dict[str, Any]]:
    from spindle.costs.graph import contract
    from spindle.costs.memory import memory_model_for, memory_report
    from spindle.declare.workload import load_workload
    from spindle.planner.pipeline import make_plan
    from spindle.runtime.config import RunConfig
    from spindle.runtime.executor import TrainingRun

    _init_single(device)
    cuda = device.type == "cuda"
    precision = "bf16-mixed" if cuda else "fp32"
    cases = [(w, rc) for w in (*SMALL, "ofasys-4", "multitask-clip-4") for rc in (False, True)]
    if quick:
        cases = [("tiny-ofasys", False), ("tiny-ofasys", True)]
    rows = []
    for name, rc in cases:
        if report.left() < 90:
            break
        w = load_workload(name)
        plan = make_plan(w, "sequential", 1, 1, "h100", check_memory=False, recompute=rc)
        model = memory_report(plan, contract(w), memory_model_for(precision, recompute=rc))
        modelled = model.devices[0].total_bytes
        if cuda and modelled > 0.9 * torch.cuda.get_device_properties(device).total_memory:
            rows.append({"workload": name, "recompute": rc, "modelled": modelled,
                         "skipped": "the model says it does not fit"})
            continue
        row: dict[str, Any] = {"workload": name, "recompute": rc, "modelled": modelled}
        try:
            t0 = time.perf_counter()
            run = TrainingRun(w, plan, 0, 1, device, RunConfig(seed=0, precision=precision))
            row["setup_s"] = time.perf_counter() - t0
            times = []
            for s in range(3):
                run.prepare_data(s)
                if cuda:
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    row["held"] = torch.cuda.memory_allocated(device)
                t0 = time.perf_counter()
                outcome = run.step(s)
                if cuda:
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - t0)
            row["step_s"] = times[-1]
            row["loss"] = outcome.rank_iteration.task_losses
            if cuda:
                row["measured"] = torch.cuda.max_memory_allocated(device)
                row["error"] = (modelled - row["measured"]) / row["measured"]
            del run
        except Exception as e:  # one case's failure (out of memory, say) is a row, not the end
            row["failed"] = f"{type(e).__name__}: {str(e)[:500]}"
        rows.append(row)
        if cuda:
            torch.cuda.empty_cache()
    return rows


# --- overlap -----------------------------------------------------------------------------------


def section_overlap(device: torch.device, quick: bool) -> dict[str, Any]:
    _init_single(device)
    cuda = device.type == "cuda"
    n = 512 if quick else 8192
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    buf = torch.randn(2**20 if quick else 2**28, device=device)  # 1 GiB of fp32 gradients
    other = torch.randn_like(buf)
    side = torch.cuda.Stream(device) if cuda else None
    reps = 20

    def compute() -> None:
        for _ in range(reps):
            a @ b

    def collective() -> None:
        for _ in range(4):
            dist.all_reduce(buf)

    def reduction() -> None:  # what a ring all-reduce's reduction kernel does to memory
        for _ in range(8):
            buf.add_(other)

    def on_side(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            if side is None:
                fn()
                return
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream(device).wait_stream(side)
        return run

    def together(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            if side is None:
                fn()
                compute()
                return
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                fn()
            compute()
            torch.cuda.current_stream(device).wait_stream(side)
        return run

    out: dict[str, Any] = {"world_size": dist.get_world_size(),
                           "compute_s": timed(compute, device, 2, 5)}
    for label, fn in (("nccl_all_reduce", collective), ("reduction_kernel", reduction)):
        alone = timed(on_side(fn), device, 2, 5)
        both = timed(together(fn), device, 2, 5)
        out[label] = {"alone_s": alone, "with_compute_s": both,
                      "hidden_share": (out["compute_s"] + alone - both) / alone if alone else None}
    return out


# --- main --------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--hardware", default="h200", help="preset whose predictions to compare")
    ap.add_argument("--quick", action="store_true", help="toy sizes (a check of the script)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    report = Report(args.out, args.budget_s)
    for name in args.sections:
        t0 = time.perf_counter()
        print(f"== {name} ({report.left():.0f} s left)", flush=True)
        try:
            if name == "env":
                result: Any = section_env(device, args.quick)
            elif name == "layers":
                result = section_layers(device, args.quick, args.hardware, report)
            elif name == "train":
                result = section_train(device, args.quick, report)
            elif name == "memory":
                result = section_memory(device, args.quick, report)
            else:
                result = section_overlap(device, args.quick)
        except Exception:
            result = {"failed": traceback.format_exc()[-3000:]}
        report.data[name] = result
        report.data.setdefault("seconds", {})[name] = time.perf_counter() - t0
        report.save()
        print(json.dumps(result, default=str)[:1500], flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
