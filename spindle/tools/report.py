"""Reports: a readable plan summary and a Gantt chart of devices against time."""

from __future__ import annotations

import io
from pathlib import Path

from spindle.io import OutputError, write_atomic
from spindle.plan.contract import Plan
from spindle.planner.pipeline import PlanResult


def _ms(s: float) -> str:
    return f"{s * 1e3:9.2f} ms"


def memory_strategy(plan: Plan) -> str:
    """What the plan recomputes and shards, in a few words (its ``choice["memory"]`` when the
    planner recorded one)."""
    if "memory" in plan.choice:
        return plan.choice["memory"]
    stages = sorted(set(plan.zero.values()))
    parts = ([f"recompute {len(plan.recompute)} MetaOps"] if plan.recompute else []) + (
        [f"zero-{'/'.join(map(str, stages))} {len(plan.zero)} MetaOps"] if plan.zero else [])
    return " + ".join(parts) or "none"


def summary_text(res: PlanResult, baselines: dict[str, PlanResult | str]) -> str:
    p, sim = res.plan, res.simulation
    lines = [
        f"workload {p.workload}  planner {p.planner}  devices {p.num_devices}"
        f" ({p.devices_per_node} per node, {p.hardware})",
        f"  waves              {len(p.waves)}",
        f"  schedule           {_ms(sim.schedule_s)}   (planner's view: sum of wave lengths)",
        f"  relaxed optimum C* {_ms(res.relaxed_optimum_s)}   schedule / C* = "
        f"{sim.schedule_s / res.relaxed_optimum_s:.3f}",
        f"  lower bound        {_ms(res.lower_bound_s)}   schedule / LB = "
        f"{sim.schedule_s / res.lower_bound_s:.3f}",
        f"  simulated iteration{_ms(sim.makespan_s)}   = compute {sim.compute_s * 1e3:.2f}"
        f" + send/recv {sim.send_recv_s * 1e3:.2f} + param sync {sim.sync_s * 1e3:.2f}"
        f" + optimizer {sim.optimizer_s * 1e3:.2f}"
        + (f" + param gather {sim.gather_s * 1e3:.2f}" if sim.gather_s else "") + " ms",
        f"  send/recv          {res.send_recv_bytes / 1e9:9.3f} GB per iteration"
        f" ({res.send_recv_time_s * 1e3:.2f} ms)",
        f"  peak memory        {res.peak_memory_gb:9.2f} GB per device"
        f" (imbalance max/mean {res.memory_imbalance:.2f})",
        f"  planning time      {res.planning_time_s * 1e3:9.1f} ms",
    ]
    if p.choice:
        lines.append(f"  chosen             {p.choice.get('schedule', '?')} schedule,"
                     f" {p.choice.get('placement', '?')} placement"
                     f" ({p.choice.get('searched', '')})")
    lines.append(f"  memory strategy    {memory_strategy(p)}")
    comm = sim.send_recv_s + sim.sync_serial_s + sim.gather_s
    if comm > 0:
        lines.append(f"  communication      {100 * sim.hidden_share:9.0f}% hidden under compute"
                     f" (send/recv + sync {comm * 1e3:.2f} ms, exposed"
                     f" {(sim.send_recv_s + sim.sync_s + sim.gather_s) * 1e3:.2f} ms)")
    if baselines:
        lines.append("  baselines (simulated iteration, speedup of this plan):")
        for name, b in baselines.items():
            if isinstance(b, str):
                lines.append(f"    {name:<11} does not fit: {b}")
                continue
            lines.append(
                f"    {name:<11} {_ms(b.simulation.makespan_s)}   "
                f"x{b.simulation.makespan_s / sim.makespan_s:.2f}   ({memory_strategy(b.plan)})"
            )
    lines.append("  waves (MetaOp[layers] x devices):")
    names = {m.id: m.name for m in p.metaops}
    for i, w in enumerate(p.waves[:40]):
        parts = ", ".join(
            f"{names[s.metaop]}[{s.layer_start}:{s.layer_end}]x{s.n}" for s in w.slices
        )
        lines.append(f"    {i:3d} {_ms(w.duration_s)}  {parts}")
    if len(p.waves) > 40:
        lines.append(f"    ... {len(p.waves) - 40} more waves")
    return "\n".join(lines)


GANTT_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg")


def gantt_format(path: str | Path) -> str:
    """The image format a Gantt chart at ``path`` is written in: its extension's, one of
    :data:`GANTT_FORMATS` (anything else is one :class:`OutputError` line)."""
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in GANTT_FORMATS:
        raise OutputError(f"--gantt {path}: write .png, .pdf, .svg or .jpg (got"
                          f" '{Path(path).suffix or 'no extension'}')")
    return fmt


def gantt(plan: Plan, path: str | Path, title: str | None = None) -> None:
    """:func:`render_gantt` of ``plan``, written atomically to ``path`` in its format."""
    write_atomic(Path(path), render_gantt(plan, gantt_format(path), title))


def render_gantt(plan: Plan, fmt: str = "png", title: str | None = None) -> bytes:
    """Devices (rows) against time (forward waves, estimator time); one colour per MetaOp,
    each slice labelled with its MetaOp and layer range; the image in format ``fmt``."""
    import matplotlib  # here: plotting is the only use, and costs half a second to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = {m.id: m.name for m in plan.metaops}
    cmap = matplotlib.colormaps["tab20"]
    fig_h = min(2 + 0.25 * plan.num_devices, 14)
    fig, ax = plt.subplots(figsize=(14, fig_h))
    t = 0.0
    for w in plan.waves:
        for s in w.slices:
            color = cmap(s.metaop % 20)
            devs = sorted(s.devices)
            # draw contiguous runs of devices as one bar
            runs: list[list[int]] = []
            for d in devs:
                if runs and d == runs[-1][-1] + 1:
                    runs[-1].append(d)
                else:
                    runs.append([d])
            for run in runs:
                ax.broken_barh([(t * 1e3, s.time_s * 1e3)], (run[0], len(run)),
                               facecolors=color, edgecolors="black", linewidth=0.4)
                if s.time_s > 0.02 * max(plan.schedule_s, 1e-12):
                    ax.text((t + s.time_s / 2) * 1e3, run[0] + len(run) / 2,
                            f"{names[s.metaop]}\n[{s.layer_start}:{s.layer_end}]",
                            ha="center", va="center", fontsize=6, clip_on=True)
        t += w.duration_s
        ax.axvline(t * 1e3, color="grey", linewidth=0.3)
    ax.set_xlim(0, max(t * 1e3, 1e-9))
    ax.set_ylim(plan.num_devices, 0)
    ax.set_xlabel("time in the forward+backward schedule (ms, estimator)")
    ax.set_ylabel("device")
    ax.set_title(title or f"{plan.workload}: {plan.planner} plan on {plan.num_devices} devices,"
                 f" {len(plan.waves)} waves")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=110)
    plt.close(fig)
    return buf.getvalue()
