"""The local runtime's mailbox: values cross stages through it, keyed by task."""

from __future__ import annotations

import threading
from typing import Any

from tspipe_fx.schedule.task import Task

__all__ = ["Aborted", "Board"]


class Aborted(Exception):
    """Another worker failed: this one stops at its next wait."""


class Board:
    """A blocking mailbox shared by the workers; ``abort`` wakes every waiter."""

    def __init__(self, timeout_s: float):
        self.cond = threading.Condition()
        self.items: dict[Any, Any] = {}
        self.failure: tuple[int, Task, BaseException] | None = None
        self.timeout_s = timeout_s

    def put(self, key: Any, value: Any) -> None:
        with self.cond:
            self.items[key] = value
            self.cond.notify_all()

    def take(self, key: Any, *, keep: bool = False) -> Any:
        """Wait for ``key`` and remove it (or leave it, for values several devices read)."""
        with self.cond:
            ok = self.cond.wait_for(lambda: key in self.items or self.failure is not None, self.timeout_s)
            if self.failure is not None:
                raise Aborted
            if not ok:
                raise TimeoutError(f"waited {self.timeout_s:.0f} s for {key}")
            return self.items[key] if keep else self.items.pop(key)

    def abort(self, device: int, task: Task, err: BaseException) -> None:
        with self.cond:
            if self.failure is None:
                self.failure = (device, task, err)
            self.cond.notify_all()
