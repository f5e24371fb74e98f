"""The shapes of the messages between ranks, known without asking: every rank runs the stage
modules on fake tensors for the batch's shapes, and a gradient has the shape of its output."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from tspipe_fx.runtime.precision import Precision
from tspipe_fx.stage import Stage

__all__ = ["Spec", "boundary_specs", "signature"]


@dataclass(frozen=True)
class Spec:
    """A tensor message: what the receiver allocates."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool


def signature(values: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(
        (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else ("value", repr(v)) for v in values
    )


def boundary_specs(
    stages: Sequence[Stage], inputs: Sequence[Any], *, grad: bool, precision: Precision
) -> list[dict[str, Any]]:
    """Each stage's outputs for these model inputs, as they cross to the next stage under
    ``precision``, from a run on fake tensors: a :class:`Spec` per tensor, the value itself for
    anything else (sizes, flags). Nothing real is touched."""
    out: list[dict[str, Any]] = []
    device = next((x.device for x in inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        env: dict[str, Any] = {
            n: mode.from_tensor(x) if isinstance(x, torch.Tensor) else x
            for n, x in zip(stages[0].inputs, inputs, strict=True)
        }
        for j, st in enumerate(stages):
            args = []
            for n in st.inputs:
                v = env[n]
                if j > 0 and isinstance(v, torch.Tensor) and v.requires_grad:
                    v = v.detach().requires_grad_()
                    if n in st.written_inputs:  # as the runtime does: autograd forbids writing to a leaf
                        v = v.clone()
                args.append(v)
            with torch.set_grad_enabled(grad), precision.autocast(device):
                values = tuple(precision.boundary(v) for v in st.module(*args))
            specs = {
                n: Spec(tuple(int(s) for s in v.shape), v.dtype, bool(v.requires_grad))
                if isinstance(v, torch.Tensor)
                else v
                for n, v in zip(st.outputs, values, strict=True)
            }
            out.append(specs)
            env.update(zip(st.outputs, values, strict=True))
    return out
