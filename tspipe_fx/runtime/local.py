"""The local runtime: one process, one worker thread per device, executing schedule task lists.

Values cross stages through a :class:`~tspipe_fx.runtime.board.Board` (a blocking mailbox keyed
by task); on a GPU each stage runs on its own CUDA stream and a message carries an event.
An exception in any task aborts every worker at its next wait; :meth:`LocalRuntime.run` then
raises a :class:`~tspipe_fx.runtime.tasks.RuntimeFailure` naming the device, the task and, for a
forward, the graph node, with the original exception chained.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from tspipe_fx.runtime.batches import Fed
from tspipe_fx.runtime.board import Aborted, Board
from tspipe_fx.runtime.device import NOTES_ATTR, DeviceState, parameter_of
from tspipe_fx.runtime.tasks import RuntimeFailure, StageTasks
from tspipe_fx.schedule.task import Task

__all__ = ["LocalRuntime"]


class LocalRuntime(StageTasks):
    """Executes windows of schedule task lists on local devices (CPU or CUDA), a thread each
    (arguments: :class:`~tspipe_fx.runtime.tasks.StageTasks`)."""

    def run(
        self,
        lists: Sequence[Sequence[Task]],
        data: dict[int, Fed],
    ) -> None:
        """Run one window: ``lists[k]`` on device ``k`` (a thread each; with virtual stages a
        device's list holds the tasks of several stages, each run on its own stage's state);
        ``data[b]``: batch ``b``."""
        if self.broken is not None:
            raise RuntimeFailure(f"the runtime failed earlier and cannot go on: {self.broken}")
        board = Board(self.timeout_s)
        self.stepped.clear()
        workers = [
            threading.Thread(
                target=self._worker,
                args=(k, tasks, data, board),
                name=f"tspipe-dev{k}",
                daemon=True,
            )
            for k, tasks in enumerate(lists)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if board.failure is not None:
            device, task, err = board.failure
            where = "".join(f" ({note})" for note in getattr(err, NOTES_ATTR, []))
            self.broken = RuntimeFailure(
                f"device {device} failed at task {task}{where}: {type(err).__name__}: {err}"
            )
            raise self.broken from err

    def _worker(self, device: int, tasks: Sequence[Task], data: dict[int, Fed], board: Board) -> None:
        task = tasks[0] if tasks else Task("opt", device, -1)
        try:
            for task in tasks:
                d = self.stage[task.stage]
                with torch.cuda.stream(d.stream) if d.stream is not None else contextlib.nullcontext():
                    self.run_task(d, task, data, board)
        except Aborted:
            return
        except BaseException as e:  # noqa: BLE001 - every failure reaches the caller, named
            board.abort(device, task, e)

    def send(self, d: DeviceState, board: Board, key: Any, payload: Any) -> None:
        """Post ``payload``; on a GPU with an event marking when the stage's stream made it."""
        event = None
        if d.stream is not None:
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(d.stream)
        board.put(key, (payload, event))

    def receive(self, d: DeviceState, board: Board, key: Any) -> Any:
        """Take a message; on a GPU, this stage's stream waits for the sender's work first."""
        payload, event = board.take(key)
        if event is not None and d.stream is not None:
            d.stream.wait_event(event)
            for x in tree_flatten(payload)[0]:
                if isinstance(x, torch.Tensor) and x.device == d.device:
                    x.record_stream(d.stream)  # the allocator must not reuse it under our feet
        return payload

    def reduce_replicas(self, d: DeviceState) -> None:
        """Average the student gradients over data-parallel replicas (none here)."""

    def all_norms(
        self, d: DeviceState, batch: int, mine: dict[str, torch.Tensor], board: Board
    ) -> dict[str, torch.Tensor]:
        """Every stage's gradient norms (a barrier: the global norm needs every stage)."""
        board.put(("norm", d.index, batch), mine)
        norms: dict[str, torch.Tensor] = {}
        for k in range(self.n_stages):
            norms.update(board.take(("norm", k, batch), keep=True))
        return norms

    def stage_state_dicts(self, which: str) -> list[dict[str, torch.Tensor]]:
        """Every stage's ``state_dict`` of the ``"student"`` or the ``"teacher"``."""
        return [
            (d.student if which == "student" else d.teacher).state_dict(keep_vars=True) for d in self.devices
        ]

    def barrier(self) -> None:
        """Wait for every process of the run (one process here)."""

    def drain(self) -> None:
        """Wait until every message sent has left (they are in memory here)."""

    def sum_tied(self, d: DeviceState, names: tuple[str, ...], stages: tuple[int, ...], board: Board) -> None:
        """Each copy hands its gradient over at its own optimizer step (its last weight gradient
        may come after the owner's backward, with a split backward); the owner adds them up."""
        mine = parameter_of(d.student, names)
        if d.index != stages[0]:
            board.put(("tied-grad", names, d.index), mine.grad)
            mine.grad = None
            return
        for k in stages[1:]:
            other = board.take(("tied-grad", names, k))
            if other is not None:
                mine.grad = other.to(mine.device) if mine.grad is None else mine.grad + other.to(mine.device)

    def copy_tied(
        self, d: DeviceState, names: tuple[str, ...], stages: tuple[int, ...], board: Board
    ) -> None:
        """The owner, after its step, hands the new value over; each copy takes it at its own step."""
        mine = parameter_of(d.student, names)
        if d.index == stages[0]:
            for k in stages[1:]:
                board.put(("tied-value", names, k), mine.detach())
            return
        with torch.no_grad():
            mine.copy_(board.take(("tied-value", names, d.index)).to(mine.device))
