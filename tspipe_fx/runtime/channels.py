"""What each runtime gives the task code (:class:`~tspipe_fx.runtime.tasks.StageTasks`): running a
window of task lists, messages between neighbouring stages, the agreements among stages
(gradient norms, tied weights, data-parallel replicas) and the stages' state.

:class:`~tspipe_fx.runtime.local.LocalRuntime` implements it with threads and a mailbox,
:class:`~tspipe_fx.runtime.dist.runtime.DistRuntime` with ranks and point-to-point messages.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from tspipe_fx.runtime.batches import Fed
from tspipe_fx.runtime.board import Board
from tspipe_fx.runtime.device import DeviceState
from tspipe_fx.schedule.task import Task

__all__ = ["Channels", "inbound"]


def inbound(task: Task, n_stages: int) -> tuple[Any, ...] | None:
    """The key of the message ``task`` starts from: a forward's inputs from the stage before, a
    backward's output gradients from the stage after; None for a first stage's forward, a last
    stage's backward and the tasks that start from none."""
    j = task.stage
    if task.kind in ("sf", "tf") and j > 0:
        return (task.kind, j - 1, task.batch, task.view, task.micro)
    if task.kind == "sb" and j < n_stages - 1:
        return ("sb", j + 1, task.batch, task.view, task.micro)
    return None


class Channels(ABC):
    """The runtime's side of the task code (see the module docstring)."""

    @abstractmethod
    def run(self, lists: Sequence[Sequence[Task]], data: dict[int, Fed]) -> None:
        """Run one window: ``lists[j]`` on device ``j``; ``data[b]``: batch ``b``."""

    @abstractmethod
    def send(self, d: DeviceState, board: Board, key: Any, payload: Any) -> None:
        """Send a stage's outputs (forward) or its inputs' gradients (backward) on."""

    @abstractmethod
    def receive(self, d: DeviceState, board: Board, key: Any) -> Any:
        """Wait for the message ``key`` a neighbouring stage sends."""

    @abstractmethod
    def reduce_replicas(self, d: DeviceState) -> None:
        """Average the student gradients over data-parallel replicas."""

    @abstractmethod
    def all_norms(
        self, d: DeviceState, batch: int, mine: dict[str, torch.Tensor], board: Board
    ) -> dict[str, torch.Tensor]:
        """Every stage's gradient norms (a barrier: the global norm needs every stage)."""

    @abstractmethod
    def sum_tied(self, d: DeviceState, names: tuple[str, ...], stages: tuple[int, ...], board: Board) -> None:
        """At the owner (the group's first stage): add the copies' gradients to its own."""

    @abstractmethod
    def copy_tied(
        self, d: DeviceState, names: tuple[str, ...], stages: tuple[int, ...], board: Board
    ) -> None:
        """At the owner, after its step: write the new value into every copy."""

    @abstractmethod
    def stage_state_dicts(self, which: str) -> list[dict[str, torch.Tensor]]:
        """Every stage's ``state_dict`` of the ``"student"`` or the ``"teacher"``."""

    @abstractmethod
    def barrier(self) -> None:
        """Wait for every process of the run."""

    @abstractmethod
    def drain(self) -> None:
        """Wait until every message sent has left."""
