"""Pictures of a plan: each device's costs as bars (PNG, matplotlib) and both graphs coloured by
stage (DOT text; PNG where pydot and graphviz are installed).

(Schedule timelines are drawn by :func:`tspipe_fx.simulate.save_png`.)
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from tspipe_fx.errors import TspipeError
from tspipe_fx.plan import Plan

__all__ = ["check_graph_output", "check_plot_output", "graph_dot", "save_graph", "save_stage_bars"]

# One colour per stage (matplotlib's tab10), shared by both pictures.
STAGE_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                 "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")  # fmt: skip


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise TspipeError("drawing needs matplotlib; hint: pip install 'tspipe-fx[viz]'") from e
    return plt


def save_stage_bars(plan: Plan, path: str | os.PathLike[str]) -> None:
    """Each device's load per batch as stacked bars: student forward, student backward, teacher
    forward (M micro-batches each) and the transfers, with the period and the ideal lower bound
    as lines (needs matplotlib)."""
    plt = _pyplot()
    m = plan.micro_batches
    parts: dict[str, list[float]] = {"student fwd": [], "student bwd": [], "teacher fwd": [], "transfers": []}
    for j, (s, t) in enumerate(zip(plan.student.stages, plan.teacher.stages, strict=True)):
        compute = [m * s.fwd_ms, m * s.bwd_ms, m * t.fwd_ms]
        for key, value in zip(parts, [*compute, max(0.0, plan.loads_ms[j] - sum(compute))], strict=True):
            parts[key].append(value)
    colours = {
        "student fwd": "#1f77b4",
        "student bwd": "#ff7f0e",
        "teacher fwd": "#9e9e9e",
        "transfers": "#d62728",
    }
    n = plan.n_stages
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * n + 2), 3.6))
    bottom = [0.0] * n
    for key, values in parts.items():
        ax.bar(range(n), values, bottom=bottom, color=colours[key], label=key, width=0.6)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.axhline(
        plan.max_load_ms, color="black", linewidth=1, label=f"busiest device {plan.max_load_ms:.3g} ms"
    )
    ax.axhline(plan.lower_bound_ms, color="black", linewidth=1, linestyle="--",
               label=f"lower bound {plan.lower_bound_ms:.3g} ms")  # fmt: skip
    ax.set_xticks(range(n), [f"dev{j}\n{d}" for j, d in enumerate(plan.devices)], fontsize=8)
    ax.set_ylabel("ms per batch")
    ax.set_title(
        f"{plan.student.model_name} <- {plan.teacher.model_name} ({plan.mode}), batch {plan.batch_size} in {m} "
        f"micro-batches, {plan.cost_model} costs",
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def graph_dot(pipe: Any, *, max_nodes: int = 400) -> str:
    """Both captured graphs as one DOT digraph, every node filled with its stage's colour, the
    edges that cross a cut drawn bold (what travels between devices).

    Graphs longer than ``max_nodes`` keep the cut edges and every ``k``-th node, so the picture
    stays readable.
    """
    lines = ["digraph tspipe {", '  rankdir=TB; node [shape=box, style="rounded,filled", fontsize=9];']
    for role, plan_model, gm in (
        ("student", pipe.plan.student, pipe.student.graph_module),
        ("teacher", pipe.plan.teacher, pipe.teacher.graph_module),
    ):
        stage_of = {name: k for k, st in enumerate(plan_model.stages) for name in st.nodes}
        nodes = [n for n in gm.graph.nodes if n.op not in ("get_attr",)]
        crossing = {
            (src.name, n.name)
            for n in nodes
            for src in n.all_input_nodes
            if src.name in stage_of and n.name in stage_of and stage_of[src.name] != stage_of[n.name]
        }
        step = max(1, len(nodes) // max_nodes)
        keep = {n.name for i, n in enumerate(nodes) if i % step == 0 or n.op in ("placeholder", "output")}
        keep |= {a for a, _ in crossing} | {b for _, b in crossing}
        lines.append(f'  subgraph "cluster_{role}" {{ label="{role}: {plan_model.model_name}";')
        for n in nodes:
            if n.name not in keep:
                continue
            k = stage_of.get(n.name)
            colour = STAGE_COLOURS[k % len(STAGE_COLOURS)] if k is not None else "#ffffff"
            label = n.name if k is None else f"{n.name}\\nstage {k}"
            lines.append(
                f'    "{role}.{n.name}" [label="{label}", fillcolor="{colour}40", color="{colour}"];'
            )
        lines.append("  }")
        for n in nodes:
            if n.name not in keep:
                continue
            for src in _kept_sources(n, keep):
                bold = ' [penwidth=2.5, color="black"]' if (src, n.name) in crossing else ' [color="#999999"]'
                lines.append(f'  "{role}.{src}" -> "{role}.{n.name}"{bold};')
    lines.append("}")
    return "\n".join(lines)


def _kept_sources(node: Any, keep: set[str]) -> list[str]:
    """The nearest kept ancestors of ``node`` along each input (skipping thinned-out nodes)."""
    out: list[str] = []
    seen: set[str] = set()
    todo = list(node.all_input_nodes)
    while todo:
        src = todo.pop()
        if src.name in seen:
            continue
        seen.add(src.name)
        if src.name in keep:
            out.append(src.name)
        elif src.op != "get_attr":
            todo.extend(src.all_input_nodes)
    return sorted(out)


def check_graph_output(path: str | os.PathLike[str]) -> None:
    """Raise now if :func:`save_graph` could not write ``path`` here (missing pydot or graphviz)."""
    name = os.fspath(path)
    if name.endswith(".dot"):
        return
    try:
        import pydot  # noqa: F401 - only whether it is there
    except ImportError as e:
        raise TspipeError(
            "drawing the graph needs pydot and graphviz; hint: pip install pydot, apt install graphviz "
            "(or write .dot text, which needs neither)"
        ) from e
    if shutil.which("dot") is None:
        raise TspipeError(
            "graphviz's dot program is not installed; hint: apt install graphviz (or write .dot text)"
        )


def check_plot_output() -> None:
    """Raise now if the pictures drawn with matplotlib could not be (matplotlib missing)."""
    _pyplot()


def save_graph(pipe: Any, path: str | os.PathLike[str], **options: Any) -> None:
    """Render :func:`graph_dot` to ``path`` (``.png``, ``.svg`` or ``.dot``); PNG and SVG need
    pydot and graphviz's ``dot`` program."""
    dot = graph_dot(pipe, **options)
    path = os.fspath(path)
    if path.endswith(".dot"):
        with open(path, "w") as f:
            f.write(dot)
        return
    check_graph_output(path)
    import pydot

    graphs = pydot.graph_from_dot_data(dot)
    if not graphs:  # our own DOT text: pydot failing to parse it is a bug, not a user error
        raise TspipeError("pydot could not parse the DOT text of graph_dot(); please report this")
    graph = graphs[0]
    fmt = path.rsplit(".", 1)[-1]
    try:
        graph.write(path, format=fmt)
    except FileNotFoundError as e:  # pydot is there, graphviz's dot program is not
        raise TspipeError(f"graphviz's dot program is not installed ({e}); hint: apt install graphviz") from e
