"""Simulated timelines drawn: ASCII rows (like TSPipe's figure) and Gantt charts (matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence

from tspipe_fx.errors import TspipeError
from tspipe_fx.schedule.simulator import Timeline
from tspipe_fx.schedule.task import Task

__all__ = ["render_timeline", "save_png"]


def render_timeline(timeline: Timeline, *, scale: float = 1.0, width: int | None = None) -> str:
    """One row per device; each character is ``scale`` time units. Student forward digits are
    micro-batch numbers, teacher forwards lower-case letters, backwards upper-case letters, ``L``
    the loss, ``#`` the optimizer step, ``.`` idle."""
    cols = round(timeline.makespan / scale)
    if width is not None:
        cols = min(cols, width)
    rows = []
    for d, spans in enumerate(timeline.spans):
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
        raise TspipeError("save_png needs matplotlib; hint: pip install tspipe-fx[viz]") from e
    timelines = [timeline] if isinstance(timeline, Timeline) else list(timeline)
    if not timelines:
        raise TspipeError("save_png needs at least one timeline")
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
