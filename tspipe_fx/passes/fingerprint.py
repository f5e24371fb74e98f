"""A graph's identity: a hash of its ops, targets and how its nodes feed each other.

Profiles and plans are keyed by it. It is computed once per graph (remembered for the graph
object as long as its node count is unchanged) however many checks ask for it.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from typing import Any

import torch
import torch.fx as fx

__all__ = ["graph_fingerprint", "target_name"]

_known: weakref.WeakKeyDictionary[fx.Graph, tuple[int, str]] = weakref.WeakKeyDictionary()


def target_name(target: Any) -> str:
    """A node target as text: a module path, an op overload, or a function's qualified name."""
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    module = getattr(target, "__module__", None) or ""
    return f"{module}.{getattr(target, '__qualname__', getattr(target, '__name__', repr(target)))}"


def graph_fingerprint(gm: fx.GraphModule) -> str:
    """A hash of the graph's structure: ops, targets and how nodes feed each other."""
    graph = gm.graph
    size = len(graph.nodes)
    known = _known.get(graph)
    if known is not None and known[0] == size:
        return known[1]
    index: dict[fx.Node, int] = {}
    rows = []
    for i, n in enumerate(graph.nodes):
        index[n] = i
        args = fx.node.map_arg((n.args, n.kwargs), lambda a: f"%{index[a]}")
        rows.append([n.op, target_name(n.target), repr(args)])
    digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]
    _known[graph] = (size, digest)
    return digest
