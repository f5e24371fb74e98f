"""Structure pass: which user module each node belongs to and which parameters it reads."""

from __future__ import annotations

import torch
import torch.fx as fx

from tspipe_fx.passes.meta import update

__all__ = ["annotate_structure", "module_of"]


_NO_MODULE = "_empty_nn_module_stack"  # torch.export's stack entry for a node of no module


def module_of(node: fx.Node) -> tuple[str, str]:
    """``(path, class name)`` of the innermost user module that produced ``node``.

    fx records ``nn_module_stack`` values as ``(path, type)``, torch.export as
    ``(path, "pkg.module.Class")``; both are normalised here.
    """
    stack = [
        v for v in (node.meta.get("nn_module_stack") or {}).values() if not str(v[0]).startswith(_NO_MODULE)
    ]
    if node.op == "call_module":
        return str(node.target), _class_name(stack[-1][1] if stack else "")
    if not stack:
        if node.op == "get_attr":
            return str(node.target).rpartition(".")[0], ""
        return "", ""
    path, kind = stack[-1]
    return str(path), _class_name(kind)


def _class_name(kind: object) -> str:
    if isinstance(kind, type):
        return kind.__name__
    return str(kind).rpartition(".")[2].strip("'>")


def annotate_structure(gm: fx.GraphModule) -> fx.GraphModule:
    """Write ``module_path``, ``module_type``, ``param_names`` and ``param_bytes`` on every node."""
    for node in gm.graph.nodes:
        path, kind = module_of(node)
        names: list[str] = []
        tensors: list[torch.Tensor] = []
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            for n, t in [*mod.named_parameters(), *mod.named_buffers()]:
                names.append(f"{node.target}.{n}")
                tensors.append(t)
        elif node.op == "get_attr":
            value = _get_attr(gm, str(node.target))
            if isinstance(value, torch.Tensor):
                names.append(str(node.target))
                tensors.append(value)
        unique = {id(t): t for t in tensors}.values()
        update(
            node,
            module_path=path,
            module_type=kind,
            param_names=tuple(names),
            param_bytes=sum(t.numel() * t.element_size() for t in unique),
        )
    return gm


def _get_attr(gm: fx.GraphModule, target: str) -> object:
    obj: object = gm
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj
