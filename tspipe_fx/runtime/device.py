"""One device's state in a runtime, and calling a stage so that a failure names its node."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from tspipe_fx.errors import TspipeError
from tspipe_fx.stage import Stage

__all__ = ["NOTES_ATTR", "DeviceState", "call_stage", "parameter_of"]

NOTES_ATTR = "_tspipe_notes"  # set on an exception raised in a stage: where it happened


@dataclass
class DeviceState:
    """One device's stage copies, optimizer and the activations in flight."""

    index: int
    device: torch.device
    student: fx.GraphModule
    teacher: fx.GraphModule
    s_io: Stage
    t_io: Stage
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    stream: Any = None  # on a GPU, the stage's own CUDA stream
    saved: dict[tuple[int, int, int], tuple[dict[str, torch.Tensor], tuple[Any, ...]]] = field(
        default_factory=dict
    )
    teacher_out: dict[tuple[int, int, int], tuple[Any, ...]] = field(default_factory=dict)
    student_out: dict[tuple[int, int, int], tuple[Any, ...]] = field(default_factory=dict)
    weight_work: dict[tuple[int, int, int], Any] = field(
        default_factory=dict
    )  # a split backward's second half
    # recompute: what each forward to replay received (None on the first stage: it reads the batch)
    replays: dict[tuple[int, int, int], Any] = field(default_factory=dict)


def call_stage(module: fx.GraphModule, args: Sequence[Any], label: str) -> tuple[Any, ...]:
    """Run a stage; if it fails, replay it node by node to name the node that failed."""
    try:
        return tuple(module(*args))
    except Exception as e:
        with torch.no_grad():
            try:
                fx.Interpreter(module).run(*args)
            except Exception as again:  # noqa: BLE001 - only where it stopped is wanted
                text = "\n".join([str(again), *getattr(again, "__notes__", [])])
                found = re.search(r"While executing %(\S+)", text)
                if found:
                    setattr(e, NOTES_ATTR, [f"{label}, node {found.group(1)}"])
        raise


def parameter_of(module: nn.Module, names: tuple[str, ...]) -> torch.Tensor:
    """The parameter of ``module`` called any of ``names`` (a tied tensor's aliases)."""
    for n in names:
        try:
            return module.get_parameter(n)
        except AttributeError:
            continue
    raise TspipeError(f"tied parameter {names} not found in {module.__class__.__name__}")
