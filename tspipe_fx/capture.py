"""Capture a user's ``nn.Module`` as a flat ``fx.GraphModule`` that can still be called like the original.

Two tracers, tried in order by ``method="auto"``:

1. ``torch.fx.symbolic_trace`` (through :class:`_FlatTracer`): module calls stay ``call_module``
   nodes, parameters stay in the user's modules.
2. ``torch.export.export(..., strict=False)``: for models fx cannot trace (Hugging Face
   transformers). The batch dimension of every tensor input, and the sequence dimension of
   integer (token) inputs, are exported as dynamic so other batch sizes run the same graph.

Either way the result's ``graph_module`` takes the tensor leaves of ``(args, kwargs)`` as flat
positional inputs and returns a flat tuple of tensors; :class:`CapturedModel` keeps the pytree
specs to rebuild the original calling convention and output structure (tensor, tuple, dict,
Hugging Face ``ModelOutput``). Non-tensor leaves of the example call (``use_cache=False``) are
baked into the graph as constants and checked on every call.

Parameters: both tracers reference the user's own ``nn.Parameter`` objects (no copies), so
the captured model trains the user's model in place. ``tests/test_capture.py`` checks identity.
"""

from __future__ import annotations

import inspect
import keyword
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import (
    MappingKey,
    SequenceKey,
    TreeSpec,
    tree_flatten,
    tree_flatten_with_path,
    tree_unflatten,
)

from tspipe_fx.errors import CaptureError

__all__ = ["CapturedModel", "capture"]

log = logging.getLogger(__name__)

Method = Literal["auto", "fx", "export"]
_PREFIX = "model."  # the user's model inside the fx wrapper; stripped from every name
_MODULE_ATTR = "_tspipe_module"  # set on an fx tracing error: the module being traced


@dataclass(frozen=True)
class _Constant:
    """A non-tensor leaf of the example call, baked into the graph."""

    position: int  # index among all leaves of (args, kwargs)
    name: str
    value: Any


class CapturedModel(nn.Module):
    """A model captured as a flat ``fx.GraphModule``, callable with the original's arguments.

    Attributes:
        graph_module: the flat graph: tensor leaves in, a tuple of tensors out.
        input_names: one name per flat input, derived from the forward signature.
        method: ``"fx"`` or ``"export"``, the tracer that succeeded.
        model_name: class name of the captured model.
        dynamic_batch: whether the graph is valid for other batch sizes than the example's.

    Example:
        >>> cm = capture(torchvision.models.resnet18(), (torch.randn(2, 3, 64, 64),))
        >>> cm(torch.randn(4, 3, 64, 64)).shape
        torch.Size([4, 1000])
    """

    def __init__(
        self,
        graph_module: fx.GraphModule,
        *,
        in_spec: TreeSpec,
        out_spec: TreeSpec,
        constants: Sequence[_Constant],
        input_names: Sequence[str],
        method: str,
        model_name: str,
        dynamic_batch: bool,
    ) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.in_spec = in_spec
        self.out_spec = out_spec
        self.constants = tuple(constants)
        self.input_names = tuple(input_names)
        self.method = method
        self.model_name = model_name
        self.dynamic_batch = dynamic_batch

    def flatten_inputs(self, args: Sequence[Any], kwargs: dict[str, Any]) -> list[torch.Tensor]:
        """The flat tensor inputs of ``graph_module`` for a call like the original's."""
        leaves, spec = tree_flatten((tuple(args), dict(kwargs)))
        if spec != self.in_spec:
            raise CaptureError(
                f"{self.model_name} was captured for inputs structured as {self.in_spec}, "
                f"but was called with {spec}; hint: pass the same positional and keyword "
                "arguments as the example, or capture again with this call's structure"
            )
        by_position = {c.position: c for c in self.constants}
        tensors: list[torch.Tensor] = []
        for i, leaf in enumerate(leaves):
            const = by_position.get(i)
            if const is None:
                if not isinstance(leaf, torch.Tensor):
                    raise CaptureError(
                        f"input {self.input_names[len(tensors)]!r} of {self.model_name} must be "
                        f"a tensor, got {type(leaf).__name__}"
                    )
                tensors.append(leaf)
            elif not _same_constant(leaf, const.value):
                raise CaptureError(
                    f"{self.model_name} was captured with {const.name}={const.value!r}, which is "
                    f"baked into the graph, but was called with {const.name}={leaf!r}; hint: "
                    "capture again with this value"
                )
        return tensors

    def unflatten_outputs(self, flat: Sequence[Any]) -> Any:
        """Rebuild the original output structure from the graph's flat outputs."""
        return tree_unflatten(list(flat), self.out_spec)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.unflatten_outputs(self.graph_module(*self.flatten_inputs(args, kwargs)))


def capture(
    model: nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor,
    *,
    example_kwargs: dict[str, Any] | None = None,
    leaf_modules: Sequence[type[nn.Module] | str] = (),
    method: Method = "auto",
) -> CapturedModel:
    """Trace ``model`` to a flat ``fx.GraphModule``.

    Args:
        model: the user's module; it is not modified and its parameters are shared.
        example_inputs: positional arguments of one example call (a tensor is one argument).
        example_kwargs: keyword arguments of that call.
        leaf_modules: module classes or qualified names that fx keeps as opaque
            ``call_module`` nodes (fx only; ``torch.export`` inlines every module).
        method: ``"auto"`` (fx, then export), ``"fx"`` or ``"export"``.

    Returns:
        A :class:`CapturedModel` that is called like ``model``.

    Raises:
        CaptureError: bad arguments, or no tracer could capture the model; the message names
            the model, where tracing broke, each tracer's reason and a hint.

    Example:
        >>> cm = capture(BertForMaskedLM(cfg), (), example_kwargs={"input_ids": ids})
        >>> cm.method
        'export'
    """
    args, kwargs = _validate(model, example_inputs, example_kwargs, method)
    name = type(model).__name__
    reasons: dict[str, BaseException] = {}
    tracers: dict[str, Callable[[], CapturedModel]] = {
        "fx": lambda: _capture_fx(model, args, kwargs, leaf_modules),
        "export": lambda: _capture_export(model, args, kwargs),
    }
    for which in ("fx", "export") if method == "auto" else (method,):
        try:
            captured = tracers[which]()
        except Exception as e:  # noqa: BLE001 - each tracer's failure is reported together below
            log.debug("capture of %s with %s failed: %s", name, which, e)
            reasons[which] = e
            continue
        log.info("captured %s with %s: %d nodes", name, which, len(captured.graph_module.graph.nodes))
        return captured
    raise CaptureError(_failure_message(name, reasons))


# --- validation ----------------------------------------------------------------------------


def _validate(
    model: Any, example_inputs: Any, example_kwargs: Any, method: str
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if not isinstance(model, nn.Module):
        raise CaptureError(
            f"capture() needs an nn.Module, got {type(model).__name__}; hint: wrap a function "
            "in an nn.Module whose forward calls it"
        )
    if method not in ("auto", "fx", "export"):
        raise CaptureError(f"method must be 'auto', 'fx' or 'export', got {method!r}")
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(args, (tuple, list)):
        raise CaptureError(
            f"example_inputs must be a tensor or a tuple of arguments, got {type(example_inputs).__name__}"
        )
    kwargs = {} if example_kwargs is None else example_kwargs
    if not isinstance(kwargs, dict):
        raise CaptureError(f"example_kwargs must be a dict, got {type(kwargs).__name__}")
    leaves = [x for x in tree_flatten((tuple(args), kwargs))[0] if isinstance(x, torch.Tensor)]
    if not leaves:
        raise CaptureError(f"the example call of {type(model).__name__} has no tensor input")
    devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
    for x in leaves:
        if devices and x.device not in devices:
            raise CaptureError(
                f"example input on {x.device} but {type(model).__name__}'s parameters are on "
                f"{sorted(map(str, devices))}; hint: move the inputs with .to(device)"
            )
    try:
        inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as e:
        raise CaptureError(
            f"the example call does not fit {type(model).__name__}.forward"
            f"{inspect.signature(model.forward)}: {e}"
        ) from None
    return tuple(args), dict(kwargs)


def _same_constant(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - incomparable values are simply not the same
        return False


def _failure_message(name: str, reasons: dict[str, BaseException]) -> str:
    lines = [f"could not capture {name}:"]
    for which, err in reasons.items():
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        module = getattr(err, _MODULE_ATTR, None)
        where = f" in module {module}" if module else ""
        lines.append(f"  {which}: {type(err).__name__}: {first}{where}{_where(err)}")
    lines.append(
        "hint: mark the module that breaks tracing as a leaf (leaf_modules=[...], fx only), "
        "pass data-dependent Python arguments as constants in example_kwargs, or make "
        "control flow independent of tensor values"
    )
    return "\n".join(lines)


def _where(err: BaseException) -> str:
    """The innermost frame of ``err``'s traceback that is user or library model code."""
    frames = [f for f in _walk_tb(err) if "/torch/" not in f.filename and "tspipe_fx" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {f.filename}:{f.lineno} in {f.name})"


def _walk_tb(err: BaseException) -> list[Any]:
    import traceback

    return list(traceback.extract_tb(err.__traceback__))


# --- input naming ----------------------------------------------------------------------------


def _leaf_names(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    """One identifier per leaf of ``(args, kwargs)``: the forward parameter it belongs to."""
    params = list(inspect.signature(model.forward).parameters)
    names: list[str] = []
    for path, _ in tree_flatten_with_path((args, kwargs))[0]:
        top, key, *rest = path
        if isinstance(top, SequenceKey) and top.idx == 0 and isinstance(key, SequenceKey):
            base = params[key.idx] if key.idx < len(params) else f"arg{key.idx}"
        elif isinstance(key, MappingKey):
            base = str(key.key)
        else:
            base = "input"
        parts = [base] + [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", "")))) for k in rest]
        names.append(_identifier("_".join(parts)))
    seen: dict[str, int] = {}
    unique = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        unique.append(n if seen[n] == 1 else f"{n}_{seen[n] - 1}")
    return unique


def _identifier(s: str) -> str:
    s = re.sub(r"\W", "_", s)
    if not s or s[0].isdigit() or keyword.iskeyword(s):
        s = f"x_{s}"
    return s


def _split_leaves(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[list[Any], TreeSpec, list[int], list[str], list[_Constant]]:
    leaves, in_spec = tree_flatten((args, kwargs))
    names = _leaf_names(model, args, kwargs)
    tensor_pos = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
    constants = [_Constant(i, names[i], x) for i, x in enumerate(leaves) if not isinstance(x, torch.Tensor)]
    return leaves, in_spec, tensor_pos, [names[i] for i in tensor_pos], constants


# --- fx ------------------------------------------------------------------------------------


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

    def __init__(self, names: Sequence[str], leaf_modules: Sequence[type[nn.Module] | str]):
        super().__init__()
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
            if not hasattr(e, _MODULE_ATTR):  # the innermost module is the one that broke
                path = self.path_of_module(m)
                path = "" if path == _PREFIX[:-1] else path.removeprefix(_PREFIX)
                setattr(e, _MODULE_ATTR, f"{path or '(root)'} ({type(m).__name__})")
            raise

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.leaf_types) or module_qualified_name in self.leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _capture_fx(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    leaf_modules: Sequence[type[nn.Module] | str],
) -> CapturedModel:
    leaves, in_spec, tensor_pos, names, constants = _split_leaves(model, args, kwargs)
    wrapper = _FlatCall(model, leaves, in_spec, tensor_pos)
    graph = _FlatTracer(names, leaf_modules).trace(wrapper)
    if wrapper.out_spec is None:
        raise CaptureError("fx tracing produced no output")
    # Unwrap: every target "model.x.y" becomes "x.y" so the GraphModule owns the user's modules
    # under their own names (GraphModule copies references, not tensors).
    for node in graph.nodes:
        if node.name.startswith("model_"):
            node._rename(node.name.removeprefix("model_"))
        if node.op in ("call_module", "get_attr"):
            node.target = node.target.removeprefix(_PREFIX)
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                k: (path.removeprefix(_PREFIX) if path != "model" else "", t)
                for k, (path, t) in stack.items()
            }
    gm = fx.GraphModule(model, graph, class_name=f"{type(model).__name__}Graph")
    return CapturedModel(
        gm,
        in_spec=in_spec,
        out_spec=wrapper.out_spec,
        constants=constants,
        input_names=names,
        method="fx",
        model_name=type(model).__name__,
        dynamic_batch=True,
    )


# --- torch.export ----------------------------------------------------------------------------


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


def _capture_export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CapturedModel:
    _, in_spec, _, names, constants = _split_leaves(model, args, kwargs)
    try:
        ep = torch.export.export(
            model, args, kwargs, dynamic_shapes=_dynamic_shapes(args, kwargs), strict=False
        )
        dynamic = True
    except Exception as e:  # noqa: BLE001 - fall back to static shapes before giving up
        log.info("dynamic-shape export of %s failed (%s); exporting static", type(model).__name__, e)
        ep = torch.export.export(model, args, kwargs, strict=False)
        dynamic = False
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
    return CapturedModel(
        flat,
        in_spec=in_spec,
        out_spec=out_spec,
        constants=constants,
        input_names=names,
        method="export",
        model_name=type(model).__name__,
        dynamic_batch=dynamic,
    )
