"""Mixed precision: autocast per stage task, the compute dtype across stage boundaries, and the
fp16 loss scale that every stage and rank steps with.

* Autocast is thread-local: each task enters it itself (:meth:`Precision.autocast`), in every
  worker thread and every rank, whatever the caller's context.
* Parameters, gradients, optimizer state and the EMA teacher stay fp32; only the activations
  are in the compute dtype. A stage's fp32 outputs cross to the next stage in the compute dtype
  (:meth:`Precision.boundary`: half the bytes), and their gradients come back in it.
* fp16 takes a loss scale (:class:`LossScale`, ``torch.amp.GradScaler``'s rule and defaults).
  One decision per step for the whole pipeline: every stage unscales its gradients, the stages
  exchange their gradient norms (as clipping does), and a non-finite norm anywhere skips the
  optimizer step everywhere and halves the scale; 2000 clean steps double it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from tspipe_fx.errors import TspipeError

__all__ = ["PRECISIONS", "LossScale", "Precision"]

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # plan.PRECISIONS


@dataclass(frozen=True)
class Precision:
    """One of :data:`PRECISIONS`: how a model's forwards run."""

    name: str = "fp32"

    def __post_init__(self) -> None:
        if self.name not in PRECISIONS:
            raise TspipeError(
                f"precision must be one of {sorted(PRECISIONS)}, got {self.name!r}; hint: 'bf16' on "
                "GPUs that have it (no loss scaling), 'fp16' with loss scaling, 'fp32' for full precision"
            )

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.name]

    @property
    def reduced(self) -> bool:
        return self.name != "fp32"

    def autocast(self, device: torch.device) -> AbstractContextManager[Any]:
        """The forward's autocast on ``device``; fp32 turns autocast off, whatever the caller's
        context (a step called inside the user's own ``torch.autocast`` still runs fp32)."""
        if not self.reduced:
            return torch.autocast(device_type=device.type, enabled=False)
        # No cast cache: it is one per process, and a thread clearing it (leaving autocast) frees
        # cached weights under its lock, which needs the GIL, while a thread that holds the GIL
        # (tracing for torch.compile, a dispatch mode) waits for that lock: a deadlock.
        return torch.autocast(device_type=device.type, dtype=self.dtype, cache_enabled=False)

    def boundary(self, value: Any) -> Any:
        """A value as it crosses to the next stage: fp32 tensors in the compute dtype."""
        if self.reduced and isinstance(value, torch.Tensor) and value.dtype == torch.float32:
            return value.to(self.dtype)
        return value


class LossScale:
    """The fp16 loss scale, as ``torch.amp.GradScaler`` keeps it (its defaults), with the
    found-inf decision taken for the whole pipeline by the caller."""

    def __init__(
        self, init: float = 2.0**16, growth: float = 2.0, backoff: float = 0.5, interval: int = 2000
    ):
        self.scale, self.growth, self.backoff, self.interval = float(init), growth, backoff, interval
        self.clean = 0  # steps since the last inf or growth

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.scale *= self.backoff
            self.clean = 0
            return
        self.clean += 1
        if self.clean == self.interval:
            self.scale *= self.growth
            self.clean = 0

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "clean": self.clean}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.scale, self.clean = float(state["scale"]), int(state["clean"])
