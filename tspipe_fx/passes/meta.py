"""What tspipe_fx's graph passes record on each node: ``node.meta["tspipe"]``, one dataclass.

A pass reads the graph and writes its results here; later passes and cost models only read.
Fields and the pass that writes them (all in :mod:`tspipe_fx.passes`):

=====================  ==============================================================
``module_path``        structure: dotted path of the innermost user module ("layer3.1")
``module_type``        structure: that module's class name
``param_names``        structure: parameters and buffers the node reads directly
``param_bytes``        structure: their bytes (each tensor counted once per node)
``output_bytes``       symbolic: bytes of the node's tensor outputs at the example size
``output_bytes_expr``  symbolic: the same as a sympy expression of ``B`` (and ``S``)
``fwd_flops``          symbolic: forward FLOPs at the example size (FlopCounterMode)
``flops_expr``         symbolic: forward FLOPs as a sympy expression of ``B`` (and ``S``)
``tensor_container``   symbolic: the output is a tuple or list holding tensors (``unbind``)
``view``               symbolic: every output tensor shares an input's storage and nothing was
                       written (a view, an identity, dropout with p=0): no kernel, no bytes moved
``on_grad_path``       measure: the node's output requires grad in training
``bwd_flops``          measure: FLOPs of the node's backward (FlopCounterMode)
``saved_bytes``        measure: activation bytes autograd keeps for backward (no parameters)
``fwd_ops``, ``bwd_ops`` measure: ATen operations one forward / backward of the node dispatches
                       (a GPU's kernel launches, each paying the host's launch cost)
``fwd_ms``             measure: median forward time, grad enabled
``bwd_ms``             measure: median backward time (0 off the gradient path)
=====================  ==============================================================
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch.fx as fx

__all__ = ["META_KEY", "NodeInfo", "info", "update"]

META_KEY = "tspipe"


@dataclass(frozen=True)
class NodeInfo:
    """Everything the passes know about one node (see the module docstring for who writes what)."""

    module_path: str = ""
    module_type: str = ""
    param_names: tuple[str, ...] = ()
    param_bytes: int = 0
    output_bytes: int = 0
    output_bytes_expr: str = "0"
    fwd_flops: int = 0
    flops_expr: str = "0"
    tensor_container: bool = False
    view: bool = False
    on_grad_path: bool = False
    bwd_flops: int = 0
    saved_bytes: int = 0
    fwd_ms: float | None = None
    bwd_ms: float | None = None
    fwd_ops: int = 0
    bwd_ops: int = 0


def info(node: fx.Node) -> NodeInfo:
    """The node's :class:`NodeInfo`, empty where no pass has run."""
    value = node.meta.get(META_KEY)
    return value if isinstance(value, NodeInfo) else NodeInfo()


def update(node: fx.Node, **fields: Any) -> NodeInfo:
    """Replace some fields of the node's :class:`NodeInfo` (passes call this)."""
    new = dataclasses.replace(info(node), **fields)
    node.meta[META_KEY] = new
    return new
