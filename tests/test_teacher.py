"""The momentum teacher's versions: the EMA update, and the stale read across a drained pipeline."""

from __future__ import annotations

import torch
from torch import nn

from tspipe_fx.runtime.teacher import TeacherVersions, ema_update


def test_ema_update_moves_floats_and_copies_integers() -> None:
    t = {"w": torch.ones(2), "n": torch.tensor(3)}
    ema_update(t.items(), {"w": torch.zeros(2), "n": torch.tensor(7)}, 0.9)
    assert torch.equal(t["w"], torch.full((2,), 0.9)) and int(t["n"]) == 7


def test_kd_teacher_is_left_alone() -> None:
    student, teacher = nn.Linear(2, 2), nn.Linear(2, 2)
    before = teacher.weight.detach().clone()
    TeacherVersions("kd", 1, 0.5, False).update(0, teacher, student)
    assert torch.equal(teacher.weight, before)


def test_the_window_that_drains_keeps_the_weights_the_next_run_reads_first() -> None:
    """Staleness 1: batch b reads the teacher before step b-1's update. Windows 0 (first) and 1
    (drains) run; the next run's first window (batch 2) reads what was kept, once."""
    student, teacher = nn.Linear(2, 2), nn.Linear(2, 2)
    v = TeacherVersions("momentum", 1, 0.5, ema_buffers=False)
    v.start_window(0, first=True, drains=False)
    v.update(0, teacher, student)
    assert v.kept == {}  # nothing to keep while the pipeline runs on
    v.end_window(first=True, drains=False)
    v.start_window(1, first=False, drains=True)
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    v.update(0, teacher, student)
    assert v.kept[0].keys() == before.keys() and all(torch.equal(v.kept[0][n], before[n]) for n in before)
    v.end_window(first=False, drains=True)
    v.start_window(2, first=True, drains=False)
    assert v.weights_for(0, 2) is v.kept[0] and v.weights_for(0, 3) is None and v.weights_for(1, 2) is None
    v.end_window(first=True, drains=False)
    assert v.kept == {} and v.weights_for(0, 2) is None


def test_synchronous_teacher_keeps_nothing() -> None:
    student, teacher = nn.Linear(2, 2), nn.Linear(2, 2)
    v = TeacherVersions("momentum", 0, 0.5, ema_buffers=True)
    v.start_window(0, first=True, drains=True)
    v.update(0, teacher, student)
    assert v.kept == {} and v.weights_for(0, 0) is None
    v.set_momentum(0.0)  # the next update copies the student
    v.update(0, teacher, student)
    assert torch.equal(teacher.weight, student.weight)
