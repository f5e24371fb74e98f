"""Which task a device runs while the next one in its list waits for a message.

A schedule's order is planned on estimated costs; on the machine a neighbour's task runs late
now and then (two processes crowding one memory system, a noisy host), and the device that
waits for it idles although later tasks of its own list could run. :func:`next_task` lets such a
task go first, where moving it changes no result and no message order:

- a teacher forward (``tf``) may pass a student backward half or the loss: it reads the teacher's
  weights, which change only at an optimizer step, and it sends on the forward channel, which
  only student and teacher forwards share (their order stays);
- a weight-gradient half (``sw``) may pass any forward and the loss: it reads what its own
  ``sb`` saved and adds into its own stage's gradients, which only that stage's backward halves
  touch (their order stays, so the sums are the same to the bit);
- nothing passes an optimizer step, and nothing else moves.

Pure: no torch. The distributed runtime asks it before each task, with a readiness test that
looks at its posted receives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tspipe_fx.schedule.task import Task

__all__ = ["HORIZON", "may_pass", "next_task"]

HORIZON = 6  # how many later tasks are looked at (each may post its receives early)


def may_pass(task: Task, earlier: Task) -> bool:
    """Whether ``task`` may run before ``earlier``, a task ahead of it in its device's list."""
    if earlier.kind == "opt":
        return False
    if task.kind == "tf":
        return earlier.kind not in ("sf", "tf")
    if task.kind == "sw":
        return not (earlier.kind in ("sb", "sw") and earlier.stage == task.stage)
    return False


def next_task(tasks: Sequence[Task], ready: Callable[[Task], bool], horizon: int = HORIZON) -> int:
    """The position in ``tasks`` (the device's tasks not yet run, in its order) of the one to
    run now: the first, if ``ready`` says its messages are in; else the first of the next
    ``horizon`` that may pass every task ahead of it and is ready; else the first (the device
    waits for it)."""
    if not tasks or ready(tasks[0]):
        return 0
    for k in range(1, min(len(tasks), horizon + 1)):
        task = tasks[k]
        if all(may_pass(task, e) for e in tasks[:k]) and ready(task):
            return k
    return 0
