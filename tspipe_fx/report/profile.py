"""A profile as text: cost tables per module or per node, and its totals and fidelity."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from tabulate import tabulate

from tspipe_fx.cost.profile import Profile, format_inputs
from tspipe_fx.errors import ProfileError
from tspipe_fx.passes.meta import NodeInfo

__all__ = ["render_profile", "render_summary"]


def render_profile(
    prof: Profile,
    by: Literal["module", "node"] = "module",
    *,
    top: int | None = None,
    depth: int | None = None,
) -> str:
    """Cost table as a string: per module (at ``depth``, automatic if None) or per node, then
    :func:`render_summary`.

    ``top`` keeps the N most expensive rows (by forward+backward time); otherwise rows come in
    graph order.

    Example:
        >>> print(render_profile(tspipe_fx.profile(model, (x,)), by="module", top=10))
    """
    if by not in ("module", "node"):
        raise ProfileError(f"render_profile(by=...) must be 'module' or 'node', got {by!r}")
    rows = _node_rows(prof) if by == "node" else _module_rows(prof, depth)
    if top is not None:
        rows = sorted(rows, key=lambda r: -(r[-6] + r[-5]))[:top]
    headers = (["node", "op", "module"] if by == "node" else ["module", "type", "nodes"]) + [
        "fwd ms", "bwd ms", "GFLOP fwd", "params MB", "out MB", "saved MB",
    ]  # fmt: skip
    table = tabulate(rows, headers=headers, floatfmt=".3f", intfmt=",")
    return f"{table}\n{render_summary(prof)}"


def render_summary(prof: Profile) -> str:
    """Totals and fidelity, one line each."""
    gflops = sum(n.info.fwd_flops for n in prof.nodes) / 1e9
    params = sum(n.info.param_bytes for n in prof.nodes) / 2**20
    return "\n".join(
        [
            f"{prof.model_name} on {prof.device_name} (torch {prof.torch_version}), inputs "
            f"{format_inputs(prof.inputs)}: {len(prof.nodes)} nodes, {gflops:.3f} GFLOP fwd, "
            f"{params:.1f} MB params",
            f"forward:          sum of nodes {prof.sum_fwd_ms:9.3f} ms, whole model "
            f"{prof.model_fwd_ms:9.3f} ms, fidelity {prof.fidelity_fwd:.2f}",
            f"forward+backward: sum of nodes {prof.sum_fwd_ms + prof.sum_bwd_ms:9.3f} ms, whole model "
            f"{prof.model_fwd_bwd_ms:9.3f} ms, fidelity {prof.fidelity_fwd_bwd:.2f}",
        ]
    )


def _node_rows(prof: Profile) -> list[list[Any]]:
    return [
        [n.name, n.op, n.info.module_path, *_figures([n.info])]
        for n in prof.nodes
        if n.op not in ("placeholder", "output")
    ]


def _module_rows(prof: Profile, depth: int | None) -> list[list[Any]]:
    paths = [n.info.module_path for n in prof.nodes if n.op not in ("placeholder", "output")]
    if depth is None:
        depth = _auto_depth(paths)
    groups: dict[str, list[NodeInfo]] = {}
    types: dict[str, set[str]] = {}
    for n in prof.nodes:
        if n.op in ("placeholder", "output"):
            continue
        key = ".".join(n.info.module_path.split(".")[:depth]) if n.info.module_path else "(top)"
        groups.setdefault(key, []).append(n.info)
        if n.info.module_path.count(".") + 1 == len(key.split(".")):
            types.setdefault(key, set()).add(n.info.module_type)
    return [
        [key, ",".join(sorted(types.get(key, set()) - {""})), len(infos), *_figures(infos)]
        for key, infos in groups.items()
    ]


def _figures(infos: Sequence[NodeInfo]) -> list[float]:
    return [
        sum(i.fwd_ms or 0.0 for i in infos),
        sum(i.bwd_ms or 0.0 for i in infos),
        sum(i.fwd_flops for i in infos) / 1e9,
        sum(i.param_bytes for i in infos) / 2**20,
        sum(i.output_bytes for i in infos) / 2**20,
        sum(i.saved_bytes for i in infos) / 2**20,
    ]


def _auto_depth(paths: Sequence[str], max_rows: int = 40) -> int:
    """The deepest module level (up to 6) that still gives at most ``max_rows`` groups."""
    best = 1
    for depth in range(1, 7):
        if len({".".join(p.split(".")[:depth]) for p in paths}) <= max_rows:
            best = depth
    return best
