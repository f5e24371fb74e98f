"""Which nodes write their inputs in place, and which stage inputs such writes reach.

The measure pass clones a node's inputs before each timed run of a node that may write them;
the split pass records on each :class:`~tspipe_fx.stage.Stage` the inputs an in-place op
writes, directly or through identities and views (timm's ``ReLU(inplace=True)`` right after a
cut), so that the runtime clones those gradient leaves first.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

__all__ = ["may_mutate", "written_inputs"]

_INPLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
    operator.ilshift, operator.irshift, operator.imatmul, operator.setitem,
}  # fmt: skip


def may_mutate(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether running ``node`` may write to its inputs (then each timed run gets clones)."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(str(node.target)), "inplace", False))
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            return bool(target._schema.is_mutable)
        if target in _INPLACE_OPERATORS:
            return True
        name = getattr(target, "__name__", "")
        return name.endswith("_") and not name.endswith("__")
    return False


# Ops whose output shares its input's memory: an in-place op on the result writes the input.
_ALIAS_METHODS = {
    "view", "view_as", "reshape", "flatten", "unflatten", "transpose", "permute", "t", "expand",
    "expand_as", "squeeze", "unsqueeze", "narrow", "select", "unbind", "split", "chunk", "detach",
    "__getitem__", "contiguous", "as_strided", "movedim", "swapaxes", "diagonal", "unfold",
}  # fmt: skip
_ALIAS_FUNCTIONS = {
    operator.getitem, torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze,
    torch.unsqueeze, torch.narrow, torch.select, torch.unbind, torch.split, torch.chunk, torch.t,
    torch.movedim, torch.swapaxes, torch.diagonal, torch.detach,
}  # fmt: skip


def _aliases(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node``'s output may share memory with its first argument."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), nn.Identity)
    if node.op == "call_method":
        return str(node.target) in _ALIAS_METHODS
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):  # export's aten ops: their schemas say it
            returns = target._schema.returns
            return bool(returns) and returns[0].alias_info is not None and not returns[0].alias_info.is_write
        return target in _ALIAS_FUNCTIONS or getattr(target, "__name__", "") in _ALIAS_METHODS
    return False


def written_inputs(gm: fx.GraphModule) -> set[str]:
    """Stage inputs an in-place op writes to, directly or through identities and views."""
    written = set()
    for p in gm.graph.nodes:
        if p.op != "placeholder":
            continue
        reach, todo = {p}, [p]
        while todo:
            for u in todo.pop().users:
                if u.args and u.args[0] in reach and u not in reach:
                    if may_mutate(u, gm):
                        written.add(str(p.target))
                    if _aliases(u, gm):
                        reach.add(u)
                        todo.append(u)
    return written
