"""A discrete-event simulator: a schedule plus task costs -> a timeline.

Each device runs its list in order; a task starts when its device is free and every task it
depends on has finished (plus the link time when that task ran on another device). The result
gives the steady-state period per batch, per-device utilisation and the bubble fraction, and
renders as ASCII (one row per device, like TSPipe's figure) or, with matplotlib, as a PNG.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tspipe_fx.schedule import Schedule, ScheduleError, Task, dependencies

__all__ = ["Timeline", "save_png", "simulate", "unit_costs"]

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


def save_png(timeline: Timeline, path: str, *, title: str | None = None) -> None:
    """A Gantt chart of the timeline (needs matplotlib: ``pip install tspipe-fx[viz]``).

    Teacher forwards grey, student forwards blue, backwards orange, loss red, optimizer steps
    green; one row per device, device 0 on top.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ScheduleError("save_png needs matplotlib; hint: pip install tspipe-fx[viz]") from e
    colours = {"tf": "#9e9e9e", "sf": "#1f77b4", "sb": "#ff7f0e", "loss": "#d62728", "opt": "#2ca02c"}
    n = len(timeline.spans)
    fig, ax = plt.subplots(figsize=(12, 0.6 * n + 1.6))
    for d, spans in enumerate(timeline.spans):
        for start, end, t in spans:
            ax.broken_barh(
                [(start, end - start)],
                (n - 1 - d - 0.4, 0.8),
                facecolors=colours[t.kind],
                edgecolor="white",
                linewidth=0.5,
            )
            if end - start >= timeline.makespan / 80 and t.kind != "loss":
                ax.text(
                    (start + end) / 2,
                    n - 1 - d,
                    str(t.batch),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white",
                )
    ax.set_yticks(range(n), [f"dev{d}" for d in reversed(range(n))])
    ax.set_xlabel("time")
    s = timeline.schedule
    ax.set_title(title or f"{s.name}: {s.n_stages} stages, {s.micro_batches} micro-batches, {s.views} view(s), {s.mode}; "
                 f"period {timeline.period:.3g}, bubbles {100 * timeline.bubble_fraction:.0f}%", fontsize=9)  # fmt: skip
    from matplotlib.patches import Rectangle

    handles = [Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    ax.legend(
        handles,
        ["teacher fwd", "student fwd", "student bwd", "loss", "optimizer"],
        ncol=5,
        fontsize=7,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.2),
        frameon=False,
    )
    fig.tight_layout()
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
