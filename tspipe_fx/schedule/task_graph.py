"""The task graph the synthesizer schedules: a few batches' tasks, priced, with what must come first.

Every task of a horizon with its device and its predecessors: the data dependencies
(:func:`~tspipe_fx.schedule.task.dependencies`), the windows the trainer runs (each device's window
``b`` ends with its first stage's optimizer step of ``b``; the teacher forwards of ``b + 1`` that
``early`` places there run inside it, after the step of ``b - 1``; with virtual stages a device's
other steps of ``b`` sit inside its window ``b``) and one forward order per stage and model
(BatchNorm). Priced by :class:`~tspipe_fx.schedule.costs.StageCosts`, each task's bottom level is
its longest path to the end of the horizon, task and link times included.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

from tspipe_fx.schedule.costs import StageCosts
from tspipe_fx.schedule.task import Schedule, ScheduleError, Task, dependency_map, order_key, task_devices

__all__ = ["Early", "TaskGraph"]

Early = tuple[int, ...]  # per stage: how many of a batch's teacher forwards run in the window before


def _window_of(s: Schedule, early: Early, t: Task) -> int:
    """Batch ``c``'s first ``early[j]`` teacher forwards on stage ``j`` (in forward order) run in
    window ``c - 1``, the rest in window ``c``; every other task in its batch's window."""
    if t.kind != "tf" or t.batch == 0:
        return t.batch
    rank = order_key(s, t)
    position = rank[0] * (s.teacher_micro if not s.micro_major else s.views) + rank[1]
    return t.batch - 1 if position < early[t.stage] else t.batch


def _graph(s: Schedule, early: Early) -> tuple[dict[Task, int], dict[Task, list[Task]]]:
    """Every task with its device, and what must finish before it: the data dependencies, the
    window bounds (after the device's previous step, before its own) and one forward order."""
    device = task_devices(s)
    known = dependency_map(s)
    preds: dict[Task, list[Task]] = {t: list(known[t]) for t in device}
    for t in device:
        w = _window_of(s, early, t)
        stage = t.stage if t.kind != "loss" else s.n_stages - 1
        first = s.device_of(stage)  # the device's first stage: its step ends the window
        if t.kind != "opt":
            preds[Task("opt", stage, w)].append(t)
            if w > 0 and t.kind == "tf":
                preds[t].append(Task("opt", stage, w - 1))
        elif stage != first:  # virtual stages: every step of b in the device's window b
            preds[Task("opt", first, w)].append(t)
        if w > 0 and stage != first:  # ... and the window starts after the device's last one
            preds[t].append(Task("opt", first, w - 1))
    chains: dict[tuple[str, int, int], list[Task]] = {}
    for t in device:  # the teacher's forwards in one order across batches too (its BatchNorm)
        if t.kind in ("sf", "tf", "loss"):
            chains.setdefault((t.kind, t.stage, -1 if t.kind == "tf" else t.batch), []).append(t)
    for key, tasks in chains.items():
        tasks.sort(key=(lambda t: t.micro) if key[0] == "loss" else (lambda t: (t.batch, *order_key(s, t))))
        for a, b in itertools.pairwise(tasks):
            preds[b].append(a)
    return device, preds


def _bottom_levels(
    device: dict[Task, int], preds: dict[Task, list[Task]], costs: StageCosts
) -> dict[Task, float]:
    succs: dict[Task, list[Task]] = {t: [] for t in device}
    missing = 0
    for t, ps in preds.items():
        for p in ps:
            succs[p].append(t)
    left = {t: len(succs[t]) for t in device}
    stack = [t for t, n in left.items() if n == 0]
    level: dict[Task, float] = {}
    while stack:
        t = stack.pop()
        tail = 0.0
        for u in succs[t]:
            link = costs.link_ms(t, u) if device[u] != device[t] else 0.0
            tail = max(tail, link + level[u])
        level[t] = costs.task_ms(t) + tail
        for p in preds[t]:
            left[p] -= 1
            if left[p] == 0:
                stack.append(p)
    missing = len(device) - len(level)
    if missing:
        raise ScheduleError(f"the task graph has a cycle ({missing} tasks on it)")
    return level


@dataclass(frozen=True)
class TaskGraph:
    """A horizon's task graph, priced, with its bottom levels (the synthesizer's methods share it)."""

    s: Schedule
    costs: StageCosts
    device: dict[Task, int]
    preds: dict[Task, list[Task]]
    level: dict[Task, float]

    @functools.cached_property
    def depths(self) -> dict[Task, int]:
        """:func:`_depths` of the graph, computed once (insertion and student-first share it)."""
        return _depths(self.preds)

    @classmethod
    def of(cls, s: Schedule, costs: StageCosts, early: Early) -> TaskGraph:
        priced = costs.for_schedule(s.split_backward, s.teacher_parts)
        device, preds = _graph(s, early)
        return cls(s, priced, device, preds, _bottom_levels(device, preds, priced))


def _depths(preds: dict[Task, list[Task]]) -> dict[Task, int]:
    """Longest chain of predecessors: among tasks of equal level, predecessors come first."""
    depth: dict[Task, int] = {}
    for t in preds:
        stack = [t]
        while stack:
            x = stack[-1]
            if x in depth:
                stack.pop()
                continue
            todo = [p for p in preds[x] if p not in depth]
            if todo:
                stack += todo
                continue
            stack.pop()
            depth[x] = 1 + max((depth[p] for p in preds[x]), default=0)
    return depth
