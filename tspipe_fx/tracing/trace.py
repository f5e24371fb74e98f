"""``tspipe_fx.capture``: try the tracers in order, validate the call, explain a failure."""

from __future__ import annotations

import inspect
import logging
import traceback
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from tspipe_fx.errors import CaptureError
from tspipe_fx.tracing.model import CapturedModel
from tspipe_fx.tracing.tracer_export import capture_export
from tspipe_fx.tracing.tracer_fx import MODULE_ATTR, capture_fx

__all__ = ["Method", "capture"]

log = logging.getLogger(__name__)

Method = Literal["auto", "fx", "export"]


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
        "fx": lambda: capture_fx(model, args, kwargs, leaf_modules),
        "export": lambda: capture_export(model, args, kwargs),
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


def _failure_message(name: str, reasons: dict[str, BaseException]) -> str:
    lines = [f"could not capture {name}:"]
    for which, err in reasons.items():
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        module = getattr(err, MODULE_ATTR, None)
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
    return list(traceback.extract_tb(err.__traceback__))
