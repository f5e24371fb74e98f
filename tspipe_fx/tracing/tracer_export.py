"""Capture through ``torch.export.export(..., strict=False)``: for models fx cannot trace
(Hugging Face transformers).

The batch dimension of every tensor input, and the sequence dimension of integer (token)
inputs, are exported as dynamic so other batch sizes run the same graph. Export's pytree
input/output code is replaced by plain flat code: the graph takes the tensor leaves and returns
a flat tuple, as fx's does.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from tspipe_fx.errors import CaptureError
from tspipe_fx.stage import ModelIO
from tspipe_fx.tracing.functions import functions_seen
from tspipe_fx.tracing.inputs import split_leaves
from tspipe_fx.tracing.model import CapturedModel

__all__ = ["capture_export"]

log = logging.getLogger(__name__)


def _dynamic_shapes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Batch dim dynamic on every tensor, sequence dim too on integer (token) tensors."""
    from torch.export import Dim

    def spec(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return None
        dims = {0: Dim.AUTO}
        if x.dim() >= 2 and not x.is_floating_point():
            dims[1] = Dim.AUTO
        return dims

    def over(tree: Any) -> Any:
        leaves, s = tree_flatten(tree)
        return tree_unflatten([spec(x) for x in leaves], s)

    return tuple(over(a) for a in args) + tuple(over(v) for v in kwargs.values())


def capture_export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CapturedModel:
    _, in_spec, _, names, constants = split_leaves(model, args, kwargs)
    seen: list[str] = []
    with functions_seen(seen):
        try:
            ep = torch.export.export(
                model, args, kwargs, dynamic_shapes=_dynamic_shapes(args, kwargs), strict=False
            )
            dynamic = True
        except Exception as e:  # noqa: BLE001 - fall back to static shapes before giving up
            log.info("dynamic-shape export of %s failed (%s); exporting static", type(model).__name__, e)
            ep = torch.export.export(model, args, kwargs, strict=False)
            dynamic = False
    if seen:
        raise CaptureError(
            f"{type(model).__name__} calls the custom autograd.Function {', '.join(seen)}: torch.export "
            "differentiates its forward and drops its backward; hint: capture with fx (method='fx'), "
            "which keeps it whole"
        )
    gm = ep.module()
    assert isinstance(gm, fx.GraphModule)
    out_spec = gm.graph._codegen.pytree_info.out_spec  # type: ignore[attr-defined]
    graph = gm.graph
    # Drop export's input guard call (it checks the example's shape constraints) and the
    # placeholders of constant inputs; then emit plain flat code instead of pytree code.
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.erase_node(node)
    tensor_placeholders = [n for n in placeholders if isinstance(n.meta.get("val"), torch.Tensor)]
    for n in placeholders:
        if n not in tensor_placeholders:
            if n.users:
                raise CaptureError(f"export kept constant input {n.name} as a graph input")
            graph.erase_node(n)
    if len(tensor_placeholders) != len(names):
        raise CaptureError(f"export produced {len(tensor_placeholders)} tensor inputs, expected {len(names)}")
    for n, name in zip(tensor_placeholders, names, strict=True):
        n.target = name
    # Dim.AUTO silently falls back to a static size where the model needs one (Swin's windows).
    dynamic = dynamic and all(
        isinstance(n.meta["val"].shape[0], torch.SymInt) for n in tensor_placeholders if n.meta["val"].dim()
    )
    graph._codegen = fx.graph.CodeGen()
    # A fresh GraphModule over the same graph: it references the same parameter objects as
    # the unlifted module, without export's input-checking hooks.
    flat = fx.GraphModule(gm, graph, class_name=f"{type(model).__name__}Graph")
    io = ModelIO(in_spec, out_spec, tuple(constants), tuple(names), type(model).__name__)
    return CapturedModel(flat, io, method="export", dynamic_batch=dynamic)
