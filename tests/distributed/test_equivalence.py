"""The runtime engine's main contract: any plan, on any world size, trains exactly like one process.

For every shipped tiny workload on 1, 2 and 4 ranks (torchrun, gloo on CPU), the plans of the
``spindle``, ``sequential`` and ``optimus`` planners plus two hand-written plans are trained for
3 optimizer steps in ONE launch per (workload, world size) (``spindle.train`` accepts several
``--plan`` files), each also with ZeRO (:func:`zero_plans`), and every saved parameter must
equal :func:`train_reference`'s in float64 to 1e-9.  One more launch per workload checks
float32 against a float32 reference.

The hand-written plans are :mod:`tests.plans`'.  The multi-rank launches take about 5-15 s each
on 2 CPU cores.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from spindle.declare.workload import load_workload
from spindle.plan.contract import Plan
from tests.plans import (
    SEED,
    STEPS,
    WORKLOADS,
    WORLD_SIZES,
    all_plans,
    assert_matches,
    run_train,
)


@lru_cache(maxsize=None)
def reference(workload: str, dtype_name: str) -> dict[str, torch.Tensor]:
    from spindle.runtime.reference import train_reference

    dtype = getattr(torch, dtype_name)
    return train_reference(load_workload(workload), SEED, STEPS, dtype=dtype)




def _train_plans(tmp_path: Path, workload: str, nproc: int, plans: dict[str, Plan],
                 dtype: str, extra: tuple[str, ...] = ()) -> Path:
    paths = []
    for label, plan in plans.items():
        path = tmp_path / f"{label}.json"
        plan.save(path)
        paths.append(str(path))
    out = tmp_path / "out"
    proc = run_train(nproc, workload, [
        "--plan", *paths, "--steps", str(STEPS), "--seed", str(SEED), "--dtype", dtype,
        "--save", str(out), "--metrics", str(tmp_path / "metrics.jsonl"), "--no-progress",
        "--timeout", "60", *extra,
    ])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def zero_plans(plans: dict[str, Plan]) -> dict[str, Plan]:
    """ZeRO variants: every plan at stage 2, the mixed plan (uneven groups) at stage 1 and with
    a stage per MetaOp (0, 1, 2 in turn: pools of MetaOps that share parameters take the
    highest)."""
    out = {f"{k}-zero2": replace(p, zero={m.id: 2 for m in p.metaops}) for k, p in plans.items()}
    mixed = plans["mixed"]
    out["mixed-zero1"] = replace(mixed, zero={m.id: 1 for m in mixed.metaops})
    out["mixed-zero-each"] = replace(mixed, zero={m.id: m.id % 3 for m in mixed.metaops})
    return out


# --- the equivalence tests ---------------------------------------------------------------------


@pytest.mark.parametrize("nproc", WORLD_SIZES)
@pytest.mark.parametrize("workload", WORKLOADS)
def test_every_plan_trains_like_one_process_float64(
    tmp_path: Path, workload: str, nproc: int
) -> None:
    w = load_workload(workload)
    plans = all_plans(w, nproc)
    plans.update(zero_plans(plans))
    # the most demanding sync schedule: one bucket per ready point, each all-reduced from inside
    # the backward as soon as its layer has run (the default on CUDA; CPU's is "wave")
    out = _train_plans(tmp_path, workload, nproc, plans, "float64",
                       ("--min-bucket-bytes", "0", "--sync-start", "layer"))
    want = reference(workload, "float64")
    for label in plans:
        got = torch.load(out / label / "params.pt")
        assert_matches(got, want, atol=1e-9, rtol=1e-9, label=f"{workload}/{nproc}/{label}")


@pytest.mark.parametrize("sync", [("--no-overlap-sync",), ("--sync-start", "wave"),
                                  ("--recompute",)],
                         ids=["after-backward", "wave-granular", "recompute"])
def test_other_sync_starts_train_like_one_process(tmp_path: Path, sync: tuple[str, ...]) -> None:
    """``--no-overlap-sync`` (every bucket all-reduced after the whole backward),
    ``--sync-start wave`` (a bucket after its ready wave's backward, not inside it) and
    ``--recompute`` (activations recomputed in backward) are the same update as the
    layer-granular sync without recomputation (which the test above runs)."""
    workload = "tiny-ofasys"
    plans = {k: v for k, v in all_plans(load_workload(workload), 2).items()
             if k in ("spindle", "mixed")}
    out = _train_plans(tmp_path, workload, 2, plans, "float64",
                       (*sync, "--min-bucket-bytes", "0"))
    want = reference(workload, "float64")
    for label in plans:
        got = torch.load(out / label / "params.pt")
        assert_matches(got, want, atol=1e-9, rtol=1e-9, label=f"{workload}/2/{label}/{sync}")


def is_gradient_free(name: str) -> bool:
    """Attention key biases: softmax ignores a constant added to every score of a query, so
    their gradient is exactly zero and in float32 only rounding noise, which AdamW turns into
    steps of about ``lr`` in a random direction, different for every summation order."""
    return name.endswith(".k.bias")


@pytest.mark.parametrize("workload", WORKLOADS)
def test_spindle_plan_trains_like_one_process_float32(tmp_path: Path, workload: str) -> None:
    """float32 on 4 ranks: the sums run in another order than on one process, so the result
    equals the float32 reference to float32 rounding (as close as that reference is to the
    float64 one, about 2e-5 here); gradient-free parameters only within AdamW's step bound."""
    w = load_workload(workload)
    plans = {k: v for k, v in all_plans(w, 4).items() if k in ("spindle", "mixed")}
    out = _train_plans(tmp_path, workload, 4, plans, "float32")
    want = reference(workload, "float32")
    lr = 1e-3
    for label in plans:
        got = torch.load(out / label / "params.pt")
        tag = f"{workload}/4/{label}/float32"
        assert sorted(got) == sorted(want), f"{tag}: parameter names differ"
        free = [n for n in want if is_gradient_free(n)]
        assert_matches({n: got[n] for n in want if n not in free},
                       {n: v for n, v in want.items() if n not in free}, 5e-5, 1e-4, tag)
        for n in free:
            assert float((got[n] - want[n]).abs().max()) <= 4 * STEPS * lr, f"{tag}: {n}"


@pytest.mark.parametrize("case", [("tiny-ofasys", 2), ("tiny-multitask-clip", 2),
                                  ("tiny-qwen-val", 2), ("tiny-ofasys", 4)],
                         ids=lambda c: f"{c[0]}-{c[1]}")
def test_chunked_transfers_train_like_one_process(tmp_path: Path, case: tuple[str, int]) -> None:
    """``--transfer-chunks 3``: from the second iteration on, every slice computed in three
    row chunks, each chunk's rows sent as soon as computed and its input gradients likewise
    in backward, with the layer-granular sync (whose hooks must count a gradient final only
    after a slice's last chunk), on every planner's plan and with ZeRO-2 and recomputation."""
    workload, nproc = case
    plans = all_plans(load_workload(workload), nproc)
    plans.update({k: v for k, v in zero_plans(plans).items() if k in ("mixed-zero1",
                                                                          "spindle-zero2")})
    plans["mixed-recompute"] = replace(plans["mixed"],
                                       recompute=tuple(m.id for m in plans["mixed"].metaops))
    out = _train_plans(tmp_path, workload, nproc, plans, "float64",
                       ("--transfer-chunks", "3", "--min-bucket-bytes", "0",
                        "--sync-start", "layer"))
    want = reference(workload, "float64")
    for label in plans:
        got = torch.load(out / label / "params.pt")
        assert_matches(got, want, atol=1e-9, rtol=1e-9, label=f"{workload}/{nproc}/{label}")
