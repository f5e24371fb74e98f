"""compile's first step: each model captured, and its shapes and symbolic costs annotated on its
example, with a failure that names the model's role and what it was given."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from tspipe_fx.errors import CaptureError, TspipeError
from tspipe_fx.passes import annotate_symbolic
from tspipe_fx.tracing import CapturedModel, capture

__all__ = ["captured", "check_shapes"]


def captured(role: str, model: nn.Module, example: tuple[tuple[Any, ...], dict[str, Any]]) -> CapturedModel:
    """The model as captured (as given if it already is); a failure names the role."""
    if isinstance(model, CapturedModel):
        return model
    try:
        return capture(model, example[0], example_kwargs=example[1])
    except CaptureError as e:
        raise CaptureError(f"the {role}: {e}") from None


def check_shapes(role: str, cap: CapturedModel, flat: list[torch.Tensor]) -> None:
    """Shapes and symbolic costs of one model; an example it cannot run on is named in one line."""
    try:
        annotate_symbolic(cap.graph_module, flat)
    except Exception as e:  # noqa: BLE001 - whatever the model raised, the user needs where and why
        text = str(e).strip()
        node = re.search(r"While executing %(\S+)", text)
        shapes = ", ".join(f"{n}={tuple(x.shape)}" for n, x in zip(cap.input_names, flat, strict=False))
        raise TspipeError(
            f"the {role} ({cap.model_name}) cannot run on its example inputs ({shapes}): "
            f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
            f"{f' (at node {node.group(1)})' if node else ''}; hint: the example must be one batch the "
            f"{role} takes; a teacher that takes other inputs than the student gets its own "
            "(compile(..., teacher_example_inputs=...), trainer.step(..., teacher_inputs=...))"
        ) from None
