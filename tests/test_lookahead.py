"""schedule.lookahead: what a device may run while the next task of its list waits."""

from __future__ import annotations

import pytest

from tspipe_fx.schedule.lookahead import may_pass, next_task
from tspipe_fx.schedule.task import Task


def t(kind: str, stage: int = 0, batch: int = 1, micro: int = 0) -> Task:
    return Task(kind, stage, batch, 0, micro)  # type: ignore[arg-type]


def test_the_first_task_runs_when_its_messages_are_in() -> None:
    tasks = [t("sb"), t("sw"), t("tf", batch=2)]
    assert next_task(tasks, lambda task: True) == 0


def test_a_teacher_forward_fills_the_wait_for_a_gradient() -> None:
    """The first stage of the CPU benchmark's plan: it waits for sb's gradient; its sw needs that
    sb, the next batch's teacher forward needs nothing and runs."""
    tasks = [t("sb"), t("sw"), t("tf", batch=2), t("sb", micro=1), t("sw", micro=1), t("opt")]
    assert next_task(tasks, lambda task: task != tasks[0]) == 2


def test_weight_gradients_fill_the_wait_for_a_teacher_activation() -> None:
    """The last stage: it waits for the next batch's teacher activation; its weight halves go
    first, in their order; the optimizer step never passes."""
    tasks = [t("tf", 1, batch=2), t("sw", 1), t("sw", 1, micro=1), t("opt", 1)]
    blocked = tasks[0]
    assert next_task(tasks, lambda task: task != blocked) == 1
    assert next_task(tasks[1:2] + tasks[3:], lambda task: task.kind != "sw") == 0  # opt waits


@pytest.mark.parametrize(
    "task, earlier, ok",
    [
        (t("tf", batch=2), t("sb"), True),
        (t("tf", batch=2), t("loss"), True),
        (t("tf", batch=2), t("sw"), True),
        (t("tf", batch=2), t("sf"), False),  # the forward channel keeps its order
        (t("tf", batch=2), t("tf"), False),
        (t("tf", batch=2), t("opt"), False),  # a momentum teacher reads the step's weights
        (t("sw"), t("sf", micro=1), True),
        (t("sw"), t("tf", batch=2), True),
        (t("sw", 1), t("sb", 0), True),  # another stage's gradients
        (t("sw"), t("sb", micro=1), False),  # the same stage's gradients keep their order
        (t("sw", micro=1), t("sw"), False),
        (t("sw"), t("opt"), False),
        (t("sb"), t("sf"), False),  # nothing else moves
        (t("sf", batch=2), t("sb"), False),
        (t("loss"), t("sb"), False),
    ],
)
def test_may_pass(task: Task, earlier: Task, ok: bool) -> None:
    assert may_pass(task, earlier) is ok


def test_a_task_passes_only_if_it_may_pass_every_task_ahead() -> None:
    """A teacher forward behind a student forward stays there, ready or not."""
    tasks = [t("sb"), t("sf", batch=2), t("tf", batch=2)]
    assert next_task(tasks, lambda task: task.kind != "sb") == 0


def test_the_horizon_bounds_the_look() -> None:
    tasks = [t("sb")] + [t("sb", micro=m) for m in range(1, 8)] + [t("tf", batch=2)]
    ready = lambda task: task.kind == "tf"  # noqa: E731
    assert next_task(tasks, ready, horizon=4) == 0
    assert next_task(tasks, ready, horizon=8) == 8
    assert next_task([], ready) == 0
