"""Schedules are data: the generators, the validator that proves them, and the simulator."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tspipe_fx.report.timeline import render_timeline
from tspipe_fx.schedule import SCHEDULES, Schedule, ScheduleError, Task, make_schedule, validate
from tspipe_fx.schedule.costs import StageCosts
from tspipe_fx.schedule.simulator import simulate, simulate_costs, unit_costs


@settings(max_examples=120, deadline=None)
@given(
    name=st.sampled_from(sorted(SCHEDULES)),
    n=st.integers(1, 8),
    m=st.integers(1, 16),
    views=st.integers(1, 2),
    mode=st.sampled_from(["kd", "momentum"]),
    staleness=st.integers(0, 1),
)
def test_every_schedule_is_valid(name: str, n: int, m: int, views: int, mode: str, staleness: int) -> None:
    s = make_schedule(name, n, m, views=views, mode=mode, staleness=staleness, n_batches=3)
    info = validate(s, max_in_flight=s.micro_batches * s.views)
    assert 1 <= info["max_in_flight"] <= s.micro_batches * s.views
    costs = StageCosts.unit(n).for_schedule(s.split_backward, s.teacher_parts)
    tl = simulate_costs(s, costs)
    # Every task ran once, on its device, for its cost.
    assert sum(len(x) for x in tl.spans) == sum(len(d) for d in s.devices)
    for spans in tl.spans:
        assert all(e - b == costs.task_ms(t) for b, e, t in spans)
        assert all(spans[i][1] <= spans[i + 1][0] for i in range(len(spans) - 1))


@pytest.mark.parametrize("n", range(2, 9))
def test_tspipe_two_views_reaches_the_critical_cycle(n: int) -> None:
    """With two views, M = N-1 and unit costs (forward 1, backward 2, step 1), the period is the
    length of the cycle the semantics force: batch b+1's first forward on device 0 waits for
    device 0's step b, which waits for its backwards, which wait for the last device's, which
    wait for the batch-level loss, which waits for every forward: (N-1) + 2(N-1) + 2(N-1) +
    4(N-1) + 1 = 9(N-1)+1. Each device works 8(N-1)+1 of those slots."""
    s = make_schedule("tspipe", n, n - 1, views=2, mode="momentum", n_batches=6)
    validate(s)
    tl = simulate(s)
    assert tl.period == 9 * (n - 1) + 1
    work = sum(unit_costs(t) for t in s.devices[0]) / s.n_batches
    assert work == 8 * (n - 1) + 1
    # The teacher fills the bubbles the flushing schedule leaves.
    gpipe = simulate(make_schedule("gpipe", n, n - 1, views=2, mode="momentum", n_batches=6))
    assert gpipe.period > tl.period


@pytest.mark.xfail(strict=True, reason=(
    "docs/design.md (TSPipe's facts) says the steady state has no idle slot (period 8(N-1)+1). With a synchronous "
    "student and one loss per batch the dependency cycle above is 9(N-1)+1 long, so every "
    "device idles N-1 slots per batch; removing them needs a stale student or per-micro-batch "
    "losses, which the semantics rule out."
))  # fmt: skip
def test_tspipe_has_no_idle_slot_as_designed() -> None:
    n = 4
    tl = simulate(make_schedule("tspipe", n, n - 1, views=2, mode="momentum", n_batches=6))
    assert tl.period == 8 * (n - 1) + 1


def test_ascii_timeline() -> None:
    tl = simulate(make_schedule("tspipe", 2, 1, views=2, mode="momentum", n_batches=3))
    assert render_timeline(tl) == (
        "dev0 |aa00aa.AAAA#00aa.AAAA#00...AAAA#|\n"
        "dev1 |.aa00AAAAaa#.00AAAAaa#.00AAAA#..|"
    )  # fmt: skip
    assert tl.period == 10.0
    assert tl.bubble_fraction == pytest.approx(0.1)


def test_momentum_staleness_orders_the_teacher_forward() -> None:
    late = make_schedule("tspipe", 3, 2, views=2, mode="momentum", staleness=1, n_batches=4)
    sync = make_schedule("tspipe", 3, 2, views=2, mode="momentum", staleness=0, n_batches=4)
    for s, before in ((late, True), (sync, False)):
        order = list(s.devices[0])
        tf = order.index(Task("tf", 0, 2, 0, 0))
        opt = order.index(Task("opt", 0, 1))
        assert (tf < opt) is before  # staleness 1: batch 2's teacher reads the weights before step 1
    assert simulate(late).period < simulate(sync).period  # the late teacher fills bubbles


def _with(s: Schedule, device: int, tasks: list[Task]) -> Schedule:
    devices = list(s.devices)
    devices[device] = tuple(tasks)
    return dataclasses.replace(s, devices=tuple(devices))


def test_validator_catches_broken_schedules() -> None:
    s = make_schedule("tspipe", 2, 2, views=1, mode="momentum", n_batches=2)
    d0 = list(s.devices[0])
    with pytest.raises(ScheduleError, match=r"task tf0\.0\.1 appears twice \(devices 0 and 0\)"):
        validate(_with(s, 0, [*d0, d0[1]]))
    with pytest.raises(ScheduleError, match="tasks missing"):
        validate(_with(s, 0, d0[:-1]))
    with pytest.raises(ScheduleError, match=r"task sf0\.0\.0 is on device 1, it belongs on device 0"):
        validate(
            _with(_with(s, 0, [t for t in d0 if t != Task("sf", 0, 0)]), 1, [Task("sf", 0, 0), *s.devices[1]])
        )
    swapped = list(d0)
    i, j = swapped.index(Task("sf", 0, 0)), swapped.index(Task("sb", 0, 0))
    swapped[i], swapped[j] = swapped[j], swapped[i]
    with pytest.raises(ScheduleError, match=r"device 0 runs sb0\.0\.0 before sf0\.0\.0, which it needs"):
        validate(_with(s, 0, swapped))
    # The teacher's forward of batch 1 moved after step 0: it would see too new weights.
    late = [t for t in d0 if t.kind != "tf" or t.batch != 1]
    late.insert(late.index(Task("opt", 0, 0)) + 1, Task("tf", 0, 1, 0, 0))
    late.insert(late.index(Task("tf", 0, 1, 0, 0)) + 1, Task("tf", 0, 1, 0, 1))
    with pytest.raises(ScheduleError, match="newer than staleness 1 allows"):
        validate(_with(s, 0, late))
    # Device 0 waits for the gradient of micro-batch 0 before forwarding micro-batch 1, which
    # the batch's loss on device 1 needs: a deadlock no single device's order reveals.
    eager = [t for t in d0 if t != Task("sb", 0, 0, 0, 0)]
    eager.insert(eager.index(Task("sf", 0, 0, 0, 1)), Task("sb", 0, 0, 0, 0))
    with pytest.raises(ScheduleError, match=r"deadlock: device 0 at sb0\.0\.0 waits for \['sb0\.0\.0'\]"):
        validate(_with(s, 0, eager))
    with pytest.raises(ScheduleError, match=r"holds 2 micro-batches' activations .* more than 1"):
        validate(s, max_in_flight=1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "zb-v"}, "unknown schedule 'zb-v'"),
        ({"n_stages": 0}, "n_stages must be an integer >= 1"),
        ({"views": 3}, "views must be 1 or 2"),
        ({"mode": "ema"}, "mode must be 'kd' or 'momentum'"),
        ({"staleness": 2}, r"staleness must be 0 \(synchronous\) or 1 \(TSPipe\)"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"name": "tspipe", "n_stages": 2, "micro_batches": 2, **kwargs}
    with pytest.raises(ScheduleError, match=match):
        make_schedule(**args)  # type: ignore[arg-type]


def test_png_gantt_chart(tmp_path: object) -> None:
    from pathlib import Path

    from tspipe_fx.report.timeline import save_png

    path = Path(str(tmp_path)) / "tspipe.png"
    save_png(simulate(make_schedule("tspipe", 3, 2, views=2, mode="momentum", n_batches=3)), str(path))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
