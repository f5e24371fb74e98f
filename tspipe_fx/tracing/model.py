"""A captured model: its flat graph, its calling convention, and how it was traced."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from tspipe_fx.stage import ModelIO

__all__ = ["CapturedModel"]


class CapturedModel(nn.Module):
    """A model captured as a flat ``fx.GraphModule``, callable with the original's arguments.

    Attributes:
        graph_module: the flat graph: tensor leaves in, a tuple of tensors out.
        io: its calling convention (:class:`~tspipe_fx.stage.ModelIO`): input names, the
            pytree specs of the call and the result, the constants baked in.
        method: ``"fx"`` or ``"export"``, the tracer that succeeded.
        dynamic_batch: whether the graph is valid for other batch sizes than the example's.

    Example:
        >>> cm = capture(torchvision.models.resnet18(), (torch.randn(2, 3, 64, 64),))
        >>> cm(torch.randn(4, 3, 64, 64)).shape
        torch.Size([4, 1000])
    """

    def __init__(
        self, graph_module: fx.GraphModule, io: ModelIO, *, method: str, dynamic_batch: bool
    ) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.io = io
        self.method = method
        self.dynamic_batch = dynamic_batch

    @property
    def model_name(self) -> str:
        return self.io.model_name

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.io.input_names

    def flatten_inputs(self, args: Sequence[Any], kwargs: dict[str, Any]) -> list[torch.Tensor]:
        """The flat tensor inputs of ``graph_module`` for a call like the original's."""
        return self.io.flatten_inputs(args, kwargs)

    def unflatten_outputs(self, flat: Sequence[Any]) -> Any:
        """Rebuild the original output structure from the graph's flat outputs."""
        return self.io.unflatten_outputs(flat)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.unflatten_outputs(self.graph_module(*self.flatten_inputs(args, kwargs)))
