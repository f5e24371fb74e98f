"""A discrete-event simulator: a schedule plus task costs -> a timeline.

Each device runs its list in order; a task starts when its device is free and every task it
depends on has finished (plus the link time when that task ran on another device). The result
gives the steady-state period per batch, per-device utilisation and the bubble fraction, and
renders as ASCII (one row per device, like TSPipe's figure) or, with matplotlib, as a PNG.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tspipe_fx.plan import Plan
from tspipe_fx.schedule import Schedule, ScheduleError, Task, dependencies, make_schedule

__all__ = ["Timeline", "save_png", "simulate", "simulate_plan", "simulate_stages", "unit_costs"]

CostFn = Callable[[Task], float]


def unit_costs(task: Task) -> float:
    """TSPipe's unit model: forward 1, backward 2, optimizer step 1, loss free."""
    return {"tf": 1.0, "sf": 1.0, "sb": 2.0, "opt": 1.0, "loss": 0.0}[task.kind]


@dataclass(frozen=True)
class Timeline:
    """When every task ran: ``spans[device]`` is a list of ``(start, end, task)``."""

    schedule: Schedule
    spans: tuple[tuple[tuple[float, float, Task], ...], ...]

    @property
    def makespan(self) -> float:
        return max((s[-1][1] for s in self.spans if s), default=0.0)

    def batch_end(self, b: int) -> float:
        """When the last optimizer step of batch ``b`` finished."""
        return max(end for spans in self.spans for _, end, t in spans if t.kind == "opt" and t.batch == b)

    @property
    def period(self) -> float:
        """Steady-state time per batch: the mean gap between consecutive batches' last steps,
        leaving out the first batch (pipeline fill) and the last (drain: no next teacher)."""
        n = self.schedule.n_batches
        if n <= 2:
            return self.batch_end(n - 1) / n
        first = 2 if n >= 4 else 1
        return (self.batch_end(n - 2) - self.batch_end(first - 1)) / (n - 1 - first)

    def utilisation(self) -> list[float]:
        """Busy fraction of each device between the start and the end of the whole run."""
        total = self.makespan
        return [sum(e - s for s, e, _ in spans) / total if total else 0.0 for spans in self.spans]

    def steady_utilisation(self) -> list[float]:
        """Busy fraction of each device within the steady-state window (batches 1..n-2)."""
        n = self.schedule.n_batches
        lo, hi = (self.batch_end(0), self.batch_end(n - 2)) if n >= 3 else (0.0, self.makespan)
        out = []
        for spans in self.spans:
            busy = sum(max(0.0, min(e, hi) - max(s, lo)) for s, e, _ in spans)
            out.append(busy / (hi - lo) if hi > lo else 0.0)
        return out

    @property
    def bubble_fraction(self) -> float:
        """Idle share of the devices in steady state."""
        u = self.steady_utilisation()
        return 1.0 - sum(u) / len(u)

    def ascii(self, *, scale: float = 1.0, width: int | None = None) -> str:
        """One row per device; each character is ``scale`` time units. Student forward digits
        are micro-batch numbers, teacher forwards lower-case letters, backwards upper-case
        letters, ``L`` the loss, ``#`` the optimizer step, ``.`` idle."""
        end = self.makespan
        cols = round(end / scale)
        if width is not None:
            cols = min(cols, width)
        rows = []
        for d, spans in enumerate(self.spans):
            line = ["."] * cols
            for s, e, t in spans:
                mark = _mark(t)
                for c in range(round(s / scale), min(round(e / scale), cols)):
                    line[c] = mark
            rows.append(f"dev{d} |{''.join(line)}|")
        return "\n".join(rows)


def save_png(timeline: Timeline | Sequence[Timeline], path: str, *, title: str | None = None) -> None:
    """A Gantt chart of a timeline, or of several one above the other on one time axis (needs
    matplotlib: ``pip install tspipe-fx[viz]``).

    Teacher forwards grey, student forwards blue, backwards orange, loss red, optimizer steps
    green; one row per device, device 0 on top; each bar is labelled with its batch.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle
    except ImportError as e:
        raise ScheduleError("save_png needs matplotlib; hint: pip install tspipe-fx[viz]") from e
    timelines = [timeline] if isinstance(timeline, Timeline) else list(timeline)
    if not timelines:
        raise ScheduleError("save_png needs at least one timeline")
    colours = {"tf": "#9e9e9e", "sf": "#1f77b4", "sb": "#ff7f0e", "loss": "#d62728", "opt": "#2ca02c"}
    heights = [0.6 * len(tl.spans) + 0.9 for tl in timelines]
    fig, axes = plt.subplots(len(timelines), 1, figsize=(12, sum(heights) + 0.8), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": heights})  # fmt: skip
    span = max(tl.makespan for tl in timelines)
    for ax, tl in zip(axes[:, 0], timelines, strict=True):
        n = len(tl.spans)
        for d, spans in enumerate(tl.spans):
            for start, end, t in spans:
                ax.broken_barh([(start, end - start)], (n - 1 - d - 0.4, 0.8), facecolors=colours[t.kind],
                               edgecolor="white", linewidth=0.5)  # fmt: skip
                if end - start >= span / 80 and t.kind != "loss":
                    ax.text((start + end) / 2, n - 1 - d, str(t.batch), ha="center", va="center", fontsize=6,
                            color="white")  # fmt: skip
        ax.set_yticks(range(n), [f"dev{d}" for d in reversed(range(n))])
        s = tl.schedule
        ax.set_title(title if title and len(timelines) == 1 else
                     f"{s.name}: {s.n_stages} stages, {s.micro_batches} micro-batches, {s.views} view(s), {s.mode}; "
                     f"period {tl.period:.3g}, idle {100 * tl.bubble_fraction:.0f}%", fontsize=9)  # fmt: skip
    if title and len(timelines) > 1:
        fig.suptitle(title, fontsize=10)
    axes[-1, 0].set_xlabel("time (ms where the costs are ms)")
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    fig.legend(handles, ["teacher fwd", "student fwd", "student bwd", "loss", "optimizer"], ncol=5, fontsize=7,
               loc="lower center", frameon=False)  # fmt: skip
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _mark(t: Task) -> str:
    if t.kind == "sf":
        return str(t.micro % 10)
    if t.kind == "tf":
        return "abcdefghij"[t.micro % 10]
    if t.kind == "sb":
        return "ABCDEFGHIJ"[t.micro % 10]
    return "L" if t.kind == "loss" else "#"


def simulate(
    s: Schedule, cost: CostFn = unit_costs, *, link: Callable[[Task, Task], float] | None = None
) -> Timeline:
    """Run the schedule's lists against ``cost(task)``; ``link(dep, task)`` is the transfer time
    when ``dep`` ran on another device (default 0)."""
    device_of = {t: d for d, t in s.tasks()}
    finish: dict[Task, float] = {}
    free = [0.0] * len(s.devices)
    heads = [0] * len(s.devices)
    spans: list[list[tuple[float, float, Task]]] = [[] for _ in s.devices]
    remaining = sum(len(d) for d in s.devices)
    while remaining:
        progressed = False
        for d, tasks in enumerate(s.devices):
            while heads[d] < len(tasks):
                t = tasks[heads[d]]
                deps = dependencies(s, t)
                if any(dep not in finish for dep in deps):
                    break
                ready = max(
                    (finish[dep] + (link(dep, t) if link and device_of[dep] != d else 0.0) for dep in deps),
                    default=0.0,
                )
                start = max(free[d], ready)
                end = start + cost(t)
                finish[t] = end
                free[d] = end
                spans[d].append((start, end, t))
                heads[d] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise ScheduleError(f"{s.name}: deadlock in simulation; run schedule.validate() for details")
    return Timeline(s, tuple(tuple(x) for x in spans))


def simulate_plan(
    plan: Plan,
    schedule: str = "tspipe",
    *,
    views: int | None = None,
    n_batches: int = 6,
    link: tuple[float, float] | None = None,
) -> Timeline:
    """The plan's per-stage costs through a schedule.

    Args:
        plan: a compiled plan; its stage times are per micro-batch.
        schedule: ``tspipe``, ``gpipe``, ``1f1b`` or ``sequential``. ``sequential`` (inter-layer
            model parallelism, one micro-batch per batch) runs each stage on the whole batch,
            costed as the plan's micro-batch costs times its ``micro_batches`` (linear in the
            batch: a GPU's better efficiency on larger batches is not counted).
        views: 1 or 2 (default: 2 in momentum mode, as BYOL and MoCo v3 train, else 1).
        link: ``(GB/s, latency µs)`` per transfer between neighbouring devices
            (:data:`tspipe_fx.devices.LINKS`); None: transfers are free.

    Example:
        >>> simulate_plan(pipe.plan, "tspipe").period / simulate_plan(pipe.plan, "gpipe").period
    """
    if views is None:
        views = 2 if plan.mode == "momentum" else 1
    whole = schedule == "sequential"
    scale = plan.micro_batches if whole else 1
    s = make_schedule(schedule, plan.n_stages, 1 if whole else plan.micro_batches, views=views, mode=plan.mode,
                      n_batches=n_batches)  # fmt: skip
    gbs, latency_us = link if link is not None else (float("inf"), 0.0)

    def send_ms(cut_bytes: int) -> float:
        return cut_bytes * scale / (gbs * 1e6) + latency_us / 1e3 if link is not None else 0.0

    pairs = list(zip(plan.student.stages, plan.teacher.stages, strict=True))
    return simulate_stages(
        s,
        student_fwd_ms=[st.fwd_ms * scale for st, _ in pairs],
        student_bwd_ms=[st.bwd_ms * scale for st, _ in pairs],
        teacher_fwd_ms=[te.fwd_ms * scale for _, te in pairs],
        student_send_ms=[send_ms(st.cut_out_bytes) for st, _ in pairs],
        teacher_send_ms=[send_ms(te.cut_out_bytes) for _, te in pairs],
    )


def simulate_stages(
    schedule: Schedule,
    *,
    student_fwd_ms: Sequence[float],
    student_bwd_ms: Sequence[float],
    teacher_fwd_ms: Sequence[float],
    student_send_ms: Sequence[float] | None = None,
    teacher_send_ms: Sequence[float] | None = None,
) -> Timeline:
    """Per-stage costs through ``schedule``: stage ``j``'s student forward, backward and teacher
    forward of one micro-batch on device ``j``, and the time to send that stage's activations
    to the next device (a gradient travels back as large as the activation it belongs to; none
    given: free). Optimizer steps and the loss take no time."""
    n = len(student_fwd_ms)
    s_send = list(student_send_ms) if student_send_ms is not None else [0.0] * n
    t_send = list(teacher_send_ms) if teacher_send_ms is not None else [0.0] * n
    work = {
        (kind, j): ms
        for kind, values in (("sf", student_fwd_ms), ("sb", student_bwd_ms), ("tf", teacher_fwd_ms))
        for j, ms in enumerate(values)
    }

    def transfer(dep: Task, task: Task) -> float:
        if dep.kind == "sf":
            return s_send[dep.stage]
        if dep.kind == "sb":
            return s_send[task.stage]
        return t_send[dep.stage] if dep.kind == "tf" else 0.0

    return simulate(schedule, lambda t: work.get((t.kind, t.stage), 0.0), link=transfer)
