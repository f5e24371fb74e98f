"""The schedule synthesizer (``auto``), loss granularity and the split backward, as pure data."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tspipe_fx.schedule import ScheduleError, Task, make_schedule, validate
from tspipe_fx.schedule.costs import StageCosts
from tspipe_fx.schedule.simulator import simulate_costs
from tspipe_fx.schedule.task import dependencies


@pytest.mark.parametrize("n", range(2, 7))
def test_auto_reaches_the_physical_limit_on_unit_costs(n: int) -> None:
    """Two views, M = N-1, unit costs, one loss per batch: tspipe's cycle is 9(N-1)+1 slots with a
    step of 1 (8(N-1) of work on every device). The synthesized schedule, splitting the backward
    and placing the teacher forwards in the gaps, has no idle slot left: its period is the work."""
    costs = StageCosts.unit(n)
    s = make_schedule("auto", n, n - 1, views=2, mode="momentum", n_batches=6, costs=costs)
    validate(s)
    work = costs.work_ms(n - 1, 2) / n
    assert work == 8 * (n - 1)
    assert simulate_costs(s, costs).period == pytest.approx(work)
    tspipe = make_schedule("tspipe", n, n - 1, views=2, mode="momentum", n_batches=6)
    assert simulate_costs(tspipe, costs).period > work


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 4),
    m=st.integers(1, 5),
    views=st.integers(1, 2),
    mode=st.sampled_from(["kd", "momentum"]),
    staleness=st.integers(0, 1),
    loss=st.sampled_from(["batch", "micro", "micro_full_teacher"]),
    data=st.data(),
)
def test_auto_is_valid_and_never_slower_than_the_fixed_schedules(
    n: int, m: int, views: int, mode: str, staleness: int, loss: str, data: st.DataObject
) -> None:
    times = st.floats(0.0, 10.0, allow_nan=False)
    costs = StageCosts.of(*(data.draw(st.lists(times, min_size=n, max_size=n)) for _ in range(5)))
    common = dict(views=views, mode=mode, staleness=staleness, n_batches=6, loss=loss)
    auto = make_schedule("auto", n, m, costs=costs, **common)
    validate(auto, max_in_flight=m * views)
    period = simulate_costs(auto, costs).period
    quick = make_schedule("auto", n, m, costs=costs, quick=True, **common)  # (the partitioner's ranking)
    validate(quick, max_in_flight=m * views)
    estimate = simulate_costs(quick, costs).period
    assert period <= estimate * (1 + 1e-9) + 1e-9, (quick.variant, auto.variant)
    for name in ("tspipe", "gpipe") if loss == "batch" else ("tspipe", "1f1b"):
        fixed = make_schedule(name, n, m, **common)
        validate(fixed)
        assert estimate <= simulate_costs(fixed, costs).period * (1 + 1e-9) + 1e-9, (name, quick.variant)


@pytest.mark.parametrize("n_batches", [1, 2, 3, 5])
def test_auto_is_periodic(n_batches: int) -> None:
    """The trainer cuts windows from 1-, 2- and 3-batch schedules; every length is made of the
    same first, steady and last windows, so the windows it runs are the ones simulated."""
    costs = StageCosts.of([1, 2, 1], [2, 3, 2], [3, 1, 2], [0.1] * 3, [0.1] * 3)
    long = make_schedule("auto", 3, 4, costs=costs, loss="micro", n_batches=6)
    short = make_schedule("auto", 3, 4, costs=costs, loss="micro", n_batches=n_batches)
    validate(short)

    def windows(s):  # per device, the lists between optimizer steps, batches relative
        out = []
        for tasks in s.devices:
            ends = [i for i, t in enumerate(tasks) if t.kind == "opt"]
            starts = [0] + [e + 1 for e in ends[:-1]]
            out.append([[t.with_batch(t.batch - w) for t in tasks[a : e + 1]]
                        for w, (a, e) in enumerate(zip(starts, ends, strict=True))])  # fmt: skip
        return out

    lw, sw = windows(long), windows(short)
    for d in range(3):
        if n_batches > 1:
            assert sw[d][0] == lw[d][0]
            assert sw[d][-1] == lw[d][-1]
        assert all(w == lw[d][1] for w in sw[d][1:-1])


def test_the_loss_granularity_sets_what_a_loss_waits_for() -> None:
    s = make_schedule("auto", 2, 3, views=2, mode="momentum", loss="micro_full_teacher", n_batches=2)
    loss = Task("loss", 1, 0, 0, 1)
    deps = set(dependencies(s, loss))
    assert {Task("sf", 1, 0, v, 1) for v in range(2)} <= deps
    assert {Task("tf", 1, 0, v, i) for v in range(2) for i in range(3)} <= deps  # every key
    assert Task("sf", 1, 0, 0, 0) not in deps
    micro = dataclasses.replace(s, loss="micro")
    assert set(dependencies(micro, loss)) == {Task(k, 1, 0, v, 1) for k in ("sf", "tf") for v in range(2)}
    assert s.micro_major and not dataclasses.replace(s, loss="batch").micro_major


def test_a_split_backward_frees_activations_at_the_weight_gradient() -> None:
    costs = StageCosts.of([1, 1], [4, 4], [1, 1])
    s = make_schedule("auto", 2, 2, costs=costs, split_backward=True, loss="micro", n_batches=3)
    assert s.split_backward and any(t.kind == "sw" for _, t in s.tasks())
    assert Task("sb", 1, 0, 0, 0) in dependencies(s, Task("sw", 1, 0, 0, 0))
    assert Task("sw", 1, 0, 0, 1) in dependencies(s, Task("opt", 1, 0))
    priced = costs.for_schedule(True, 1)
    assert priced.task_ms(Task("sb", 1, 0)) == priced.task_ms(Task("sw", 1, 0)) == 2.0
    assert (priced.task_ms(Task("sb", 0, 0)), priced.task_ms(Task("sw", 0, 0))) == (
        0.0,
        4.0,
    )  # no input gradient
    # Dropping a weight-gradient task is caught, and so is a device holding more than allowed.
    broken = dataclasses.replace(
        s, devices=tuple(tuple(t for t in d if t != Task("sw", 0, 1, 0, 0)) for d in s.devices)
    )
    with pytest.raises(ScheduleError, match="missing"):
        validate(broken)
    with pytest.raises(ScheduleError, match="holds"):
        validate(s, max_in_flight=validate(s)["max_in_flight"] - 1)


def test_auto_keeps_the_memory_cap() -> None:
    costs = StageCosts.of([1, 1, 1], [2, 2, 2], [1, 1, 1])
    for cap in (1, 2, 4):
        s = make_schedule("auto", 3, 6, costs=costs, loss="micro", max_in_flight=cap, n_batches=4)
        assert validate(s, max_in_flight=cap)["max_in_flight"] <= cap


def test_a_forward_out_of_order_is_refused() -> None:
    s = make_schedule("tspipe", 2, 2, n_batches=2)
    d0 = list(s.devices[0])
    i, j = d0.index(Task("sf", 0, 0, 0, 0)), d0.index(Task("sf", 0, 0, 0, 1))
    d0[i], d0[j] = d0[j], d0[i]
    with pytest.raises(ScheduleError, match="BatchNorm"):
        validate(dataclasses.replace(s, devices=(tuple(d0), *s.devices[1:])))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss": "sample"}, "loss must be one of"),
        ({"max_in_flight": 0}, "max_in_flight must be an integer >= 1"),
        ({"costs": StageCosts.unit(3)}, "costs are for 3 stages"),
    ],
)
def test_bad_synthesizer_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ScheduleError, match=match):
        make_schedule("auto", 2, 2, **kwargs)


def test_teacher_forwards_out_of_batch_order_are_refused() -> None:
    """A teacher in train mode updates its BatchNorm statistics batch after batch: a device may
    not run batch 2's teacher forward before the rest of batch 1's."""
    s = make_schedule("tspipe", 2, 2, n_batches=3)
    d0 = list(s.devices[0])
    late, early = d0.index(Task("tf", 0, 1, 0, 1)), d0.index(Task("tf", 0, 2, 0, 0))
    d0.insert(late, d0.pop(early))
    with pytest.raises(ScheduleError, match=r"runs tf2\.0\.0 before tf1\.0\.1.*BatchNorm"):
        validate(dataclasses.replace(s, devices=(tuple(d0), *s.devices[1:])))


def test_a_bad_memory_cap_is_named_before_it_is_used() -> None:
    with pytest.raises(ScheduleError, match="max_in_flight must be an integer >= 1, got '3'"):
        make_schedule("auto", 2, 2, loss="micro", max_in_flight="3")  # type: ignore[arg-type]


def test_a_message_across_windows_is_refused() -> None:
    """The runtimes run a schedule window by window (each device's window b ends with its step
    b): a teacher forward of batch 1 that device 0 runs before its step 0 and device 1 after its
    own would need the message to wait between windows. The synthesizer places a batch's teacher
    forwards alike on every stage, so its schedules never need that."""
    s = make_schedule("tspipe", 2, 2, n_batches=2)
    dev1 = [t for t in s.devices[1] if not (t.kind == "tf" and t.batch == 1)]
    at = dev1.index(Task("opt", 1, 0)) + 1
    moved = [*dev1[:at], Task("tf", 1, 1, 0, 0), Task("tf", 1, 1, 0, 1), *dev1[at:]]
    with pytest.raises(ScheduleError, match=r"device 0 sends tf1.0.0 in its window 0, device 1 takes it for "
                                            r"tf1.0.0 in its window 1.*cannot cross windows"):  # fmt: skip
        validate(dataclasses.replace(s, devices=(s.devices[0], tuple(moved))))


def test_a_timed_split_backward_is_priced_as_timed() -> None:
    """``split_shares`` price each stage's halves as timed (their sum above 1 is the split's own
    cost); without them the share rule splits the backward at no cost; bad shares are named."""
    costs = StageCosts.of([1.0, 1.0], [4.0, 4.0], [1.0, 1.0]).for_schedule(True, 1)
    assert [costs.task_ms(Task(k, j, 0)) for j in (0, 1) for k in ("sb", "sw")] == [0.0, 4.0, 2.0, 2.0]
    timed = dataclasses.replace(costs, split_shares=((0.0, 1.1), (0.6, 0.7)))
    assert [timed.task_ms(Task(k, j, 0)) for j in (0, 1) for k in ("sb", "sw")] == pytest.approx([0, 4.4, 2.4, 2.8])
    assert timed.for_schedule(False, 1).task_ms(Task("sb", 1, 0)) == 4.0  # a whole backward: as before
    for bad in (((0.5, 0.5),), ((0.5, 0.5), (-0.1, 1.0)), ((0.5, 0.5), (1.0,))):
        with pytest.raises(ScheduleError, match="split_shares needs a pair of shares >= 0 for each of 2 stages"):
            dataclasses.replace(costs, split_shares=bad)  # type: ignore[arg-type]
