"""Virtual stages (several stages per device, interleaved) in the schedule data, as pure data."""

from __future__ import annotations

import dataclasses

import pytest

from tspipe_fx.schedule import ScheduleError, Task, make_schedule, validate
from tspipe_fx.schedule.costs import StageCosts
from tspipe_fx.schedule.simulator import simulate_costs
from tspipe_fx.schedule.task import Schedule, window_ends


def _costs(pieces: list[float]) -> StageCosts:
    """Stage costs in TSPipe's proportions: forward p, backward 2p, teacher forward p."""
    return StageCosts.of(pieces, [2 * p for p in pieces], pieces, [0.05] * len(pieces), [0.05] * len(pieces))


@pytest.mark.parametrize(("mode", "loss"), [("momentum", "micro"), ("kd", "batch"), ("momentum", "micro_full_teacher")])
def test_interleaving_balances_pieces_no_contiguous_split_can(mode: str, loss: str) -> None:
    """Six pieces of a chain, 3 + 2 + 2 + 1 + 2 + 2 = 12, onto 3 devices: every contiguous split
    leaves one device 5 (the bound is 4), while stage j on device j % 3 gives each device 4."""
    pieces = [3.0, 2.0, 2.0, 1.0, 2.0, 2.0]
    contiguous = [5.0, 3.0, 4.0]  # the best contiguous split: [3, 2] [2, 1] [2, 2]
    common = dict(views=2, mode=mode, loss=loss, n_batches=6)
    one = make_schedule("auto", 3, 4, costs=_costs(contiguous), **common)
    two = make_schedule("auto", 6, 4, costs=_costs(pieces), stages_per_device=2, **common)
    validate(one)
    validate(two)
    bound = _costs(pieces).work_ms(4, 2) / 3
    assert _costs(pieces).loads_ms(4, 2, stages_per_device=2) == [bound] * 3
    assert simulate_costs(one, _costs(contiguous)).period >= 1.25 * bound - 1e-9  # its busiest device
    assert simulate_costs(two, _costs(pieces)).period <= 1.01 * bound


def test_a_virtual_stage_runs_on_every_nth_device_and_windows_end_with_the_first_stage() -> None:
    s = make_schedule("auto", 6, 2, views=2, mode="momentum", loss="micro", n_batches=4, stages_per_device=2,
                      costs=_costs([1.0] * 6))  # fmt: skip
    assert (s.n_devices, len(s.devices)) == (3, 3)
    for d, tasks in enumerate(s.devices):
        assert {t.stage for t in tasks} == {d, d + 3}
        ends = window_ends(tasks)
        assert [tasks[i] for i in ends] == [Task("opt", d, b) for b in range(4)]
        for b in range(4):  # the other stage's step of b sits in window b
            i = tasks.index(Task("opt", d + 3, b))
            assert (ends[b - 1] if b else -1) < i < ends[b]
    assert Task("loss", 5, 0, 0, 1) in s.devices[2]


def test_a_step_outside_its_window_is_refused() -> None:
    s = make_schedule("auto", 4, 2, loss="micro", n_batches=3, stages_per_device=2, costs=_costs([1.0] * 4))
    d0 = list(s.devices[0])
    step = d0.pop(d0.index(Task("opt", 2, 0)))
    d0.insert(d0.index(Task("opt", 0, 0)) + 1, step)  # after the end of window 0
    with pytest.raises(ScheduleError, match=r"device 0 runs opt0 \(stage 2\) in its window 1"):
        validate(dataclasses.replace(s, devices=(tuple(d0), *s.devices[1:])))


def test_virtual_stages_need_auto_and_a_divisor() -> None:
    with pytest.raises(ScheduleError, match="tspipe runs one stage per device; virtual stages"):
        make_schedule("tspipe", 4, 2, stages_per_device=2)
    with pytest.raises(ScheduleError, match="stages_per_device must be an integer >= 1 that divides the 5 stages, got 2"):
        Schedule("auto", 5, 2, 1, "kd", 0, 1, (), stages_per_device=2)
