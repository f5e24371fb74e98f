"""The momentum teacher over time: its EMA update, and which weights a teacher forward reads.

One object, :class:`TeacherVersions`, carries the whole protocol between the trainer (which
knows the windows) and the runtime (which runs the tasks):

* After every optimizer step of a stage, :meth:`TeacherVersions.update` moves the stage's
  teacher towards its student: ``teacher <- m * teacher + (1 - m) * student``.
* With staleness 1 (TSPipe) the teacher forward of batch ``b+1`` runs before optimizer step
  ``b`` within a pipelined run, so it reads version ``b-1`` by its place in the schedule. Across
  a drained pipeline (``finish``, a checkpoint) that order is gone: the window that drains keeps
  each stage's teacher weights from before its last update (:meth:`start_window` with
  ``drains=True``), and the first teacher forward of the next run of batches reads them
  (:meth:`weights_for`). They are dropped once that forward is done, and saved with a
  checkpoint while they wait.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from tspipe_fx.errors import TspipeError

__all__ = ["TeacherVersions", "checked_momentum", "ema_update"]


def checked_momentum(momentum: object) -> float:
    """``momentum`` if it is an EMA momentum (a number from 0 to 1), else a clear error."""
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1:
        raise TspipeError(
            f"momentum must be a number from 0 to 1 (the share of the teacher the EMA keeps), got {momentum!r}"
        )
    return float(momentum)


@torch.no_grad()
def ema_update(
    teacher: Iterable[tuple[str, torch.Tensor]], student: Mapping[str, torch.Tensor], momentum: float
) -> None:
    """``teacher <- m * teacher + (1 - m) * student``, matched by name (floating tensors only;
    integer buffers such as BatchNorm's batch counter are copied)."""
    for name, t in teacher:
        s = student[name]
        if t.is_floating_point():
            t.mul_(momentum).add_(s.to(t.device), alpha=1 - momentum)
        else:
            t.copy_(s)


class TeacherVersions:
    """EMA updates and one-step-late reads of a momentum teacher (see the module docstring).

    Args:
        mode: ``"kd"`` (a frozen teacher: nothing to do) or ``"momentum"``.
        staleness: 1 (TSPipe: batch ``b`` reads the teacher after step ``b-2``) or 0.
        momentum: the EMA momentum ``m`` (:meth:`set_momentum` changes it between steps).
        ema_buffers: whether buffers follow the student too (else parameters only).
    """

    def __init__(self, mode: str, staleness: int, momentum: float, ema_buffers: bool):
        self.ema = mode == "momentum"
        self.late = self.ema and staleness == 1
        self.momentum = checked_momentum(momentum)
        self.ema_buffers = ema_buffers
        self.kept: dict[int, dict[str, torch.Tensor]] = {}  # per stage: the weights before the last update
        self._keep = False  # this window drains the pipeline: keep the weights before the update
        self._stale_batch: int | None = None  # the batch whose teacher forward reads the kept weights

    def set_momentum(self, momentum: float) -> None:
        """The EMA momentum of the next updates (cosine schedules)."""
        self.momentum = checked_momentum(momentum)

    # --- the trainer's side -------------------------------------------------------------------

    def start_window(self, batch: int, *, first: bool, drains: bool) -> None:
        """Before window ``batch`` runs: ``first`` of a run of batches, or the one that ``drains``."""
        self._keep = self.late and drains
        if first:
            self._stale_batch = batch if self.late else None

    def end_window(self, *, first: bool, drains: bool) -> None:
        """After the window: the first window's teacher forward has read the kept weights."""
        if first and not drains:
            self.kept.clear()
            self._stale_batch = None

    def abort_window(self) -> None:
        """The window failed before any stage's update: nothing of it is kept."""
        self._keep = False
        self._stale_batch = None

    # --- the runtime's side -------------------------------------------------------------------

    def weights_for(self, stage: int, batch: int) -> dict[str, torch.Tensor] | None:
        """The weights stage ``stage``'s teacher forward of ``batch`` must read instead of its
        current ones, or None (the current ones are right)."""
        if batch != self._stale_batch:
            return None
        return self.kept.get(stage)

    def update(self, stage: int, teacher: nn.Module, student: nn.Module) -> None:
        """Stage ``stage``'s EMA update, after its optimizer step (nothing for a KD teacher)."""
        if not self.ema:
            return
        sources: dict[str, torch.Tensor] = dict(student.named_parameters())
        targets: list[tuple[str, torch.Tensor]] = list(teacher.named_parameters())
        if self.ema_buffers:
            sources.update(dict(student.named_buffers()))
            targets += list(teacher.named_buffers())
        if self._keep:
            self.kept[stage] = {n: x.detach().clone() for n, x in targets}
        ema_update(targets, sources, self.momentum)
