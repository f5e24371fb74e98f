"""Capture through ``torch.fx.symbolic_trace``: module calls stay ``call_module`` nodes and the
parameters stay in the user's modules.

A flat wrapper takes the tensor leaves of the call; the traced graph is then unwrapped so the
``GraphModule`` owns the user's modules under their own names.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from tspipe_fx.errors import CaptureError
from tspipe_fx.stage import ModelIO, copy_buffer_persistence
from tspipe_fx.tracing.functions import functions_kept
from tspipe_fx.tracing.inputs import split_leaves
from tspipe_fx.tracing.model import CapturedModel

__all__ = ["MODULE_ATTR", "capture_fx"]

PREFIX = "model."  # the user's model inside the fx wrapper; stripped from every name
MODULE_ATTR = "_tspipe_module"  # set on an fx tracing error: the module being traced


class _FlatCall(nn.Module):
    """Calls ``model`` from flat tensor leaves; traced by fx, then unwrapped."""

    def __init__(self, model: nn.Module, leaves: list[Any], in_spec: TreeSpec, tensor_pos: list[int]):
        super().__init__()
        self.model = model
        self.leaves = leaves
        self.in_spec = in_spec
        self.tensor_pos = tensor_pos
        self.out_spec: TreeSpec | None = None

    def forward(self, *flat: Any) -> tuple[Any, ...]:
        leaves = list(self.leaves)
        for pos, x in zip(self.tensor_pos, flat, strict=True):
            leaves[pos] = x
        args, kwargs = tree_unflatten(leaves, self.in_spec)
        out_leaves, self.out_spec = tree_flatten(self.model(*args, **kwargs))
        return tuple(out_leaves)


class _FlatTracer(fx.Tracer):
    """An fx tracer whose root takes ``*flat`` and gets one named placeholder per input."""

    def __init__(
        self,
        names: Sequence[str],
        leaf_modules: Sequence[type[nn.Module] | str],
        *,
        proxy_buffers: bool = True,
    ):
        super().__init__()
        # Buffers become get_attr nodes: an in-place update (timm's BatchNormAct2d counts its
        # batches with num_batches_tracked.add_(1)) is then a graph op, not a change made once
        # to the user's buffer while tracing.
        self.proxy_buffer_attributes = proxy_buffers
        self.names = list(names)
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_names = {f"model.{m}" for m in leaf_modules if isinstance(m, str)}

    def create_args_for_root(
        self, root_fn: Callable[..., Any], is_module: bool, concrete_args: Any = None
    ) -> tuple[Any, list[Any]]:
        return root_fn, [self.root, *(self.create_proxy("placeholder", n, (), {}) for n in self.names)]

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as e:
            if not hasattr(e, MODULE_ATTR):  # the innermost module is the one that broke
                path = self.path_of_module(m)
                path = "" if path == PREFIX[:-1] else path.removeprefix(PREFIX)
                setattr(e, MODULE_ATTR, f"{path or '(root)'} ({type(m).__name__})")
            raise

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.leaf_types) or module_qualified_name in self.leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _forget_proxies(model: nn.Module, before: dict[int, dict[str, Any]]) -> None:
    """Undo what tracing stored on the user's modules (``self.cache = x`` leaves a Proxy)."""
    for m in model.modules():
        old = before.get(id(m), {})
        for name, value in list(vars(m).items()):
            if any(isinstance(x, fx.Proxy) for x in tree_flatten(value)[0]):
                if name in old:
                    object.__setattr__(m, name, old[name])
                else:
                    object.__delattr__(m, name)


def _trace(model: nn.Module, wrapper: nn.Module, tracer: fx.Tracer) -> fx.Graph:
    before = {id(m): dict(vars(m)) for m in model.modules()}
    try:
        with functions_kept():
            return tracer.trace(wrapper)
    finally:
        _forget_proxies(model, before)


def capture_fx(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    leaf_modules: Sequence[type[nn.Module] | str],
) -> CapturedModel:
    leaves, in_spec, tensor_pos, names, constants = split_leaves(model, args, kwargs)
    wrapper = _FlatCall(model, leaves, in_spec, tensor_pos)
    try:
        graph = _trace(model, wrapper, _FlatTracer(names, leaf_modules))
    except Exception:  # noqa: BLE001 - Python that reads a buffer's value: buffers as constants
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        graph = _trace(model, wrapper, _FlatTracer(names, leaf_modules, proxy_buffers=False))
        written = [n for n, b in model.named_buffers() if n in buffers and not torch.equal(b, buffers[n])]
        if written:  # its updates would have happened once, now, and never in the graph
            with torch.no_grad():
                for n, b in model.named_buffers():
                    b.copy_(buffers[n])
            raise CaptureError(
                f"{type(model).__name__} both reads a buffer's value in Python and writes buffers in "
                f"Python ({', '.join(written[:3])}): fx can keep neither as a graph op"
            ) from None
    if wrapper.out_spec is None:
        raise CaptureError("fx tracing produced no output")
    # Unwrap: every target "model.x.y" becomes "x.y" so the GraphModule owns the user's modules
    # under their own names (GraphModule copies references, not tensors). Tensor constants fx
    # made while tracing ("_tensor_constant0") live on the wrapper, never on the user's model.
    owned: dict[str, Any] = {}
    for node in graph.nodes:
        if node.name.startswith("model_"):
            node._rename(node.name.removeprefix("model_"))
        if node.op in ("call_module", "get_attr"):
            owner = model if node.target.startswith(PREFIX) else wrapper
            node.target = node.target.removeprefix(PREFIX)
            owned[node.target] = functools.reduce(getattr, node.target.split("."), owner)
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                k: (path.removeprefix(PREFIX) if path != "model" else "", t) for k, (path, t) in stack.items()
            }
    gm = fx.GraphModule(owned, graph, class_name=f"{type(model).__name__}Graph")
    gm.training = model.training  # the mode it was traced in (its submodules are the user's)
    copy_buffer_persistence(model, gm)
    io = ModelIO(in_spec, wrapper.out_spec, tuple(constants), tuple(names), type(model).__name__)
    return CapturedModel(gm, io, method="fx", dynamic_batch=True)
