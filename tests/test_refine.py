"""Partitions beyond the min-max load: stage timing (``refine=``) and the schedule polish."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import pytest
import torch
from toys import Net

import tspipe_fx
import tspipe_fx.compiler.refine as compiler
from tspipe_fx import TspipeError
from tspipe_fx.cost import UniformCost
from tspipe_fx.cost.stage_times import StageTimes, at_batch, time_stages
from tspipe_fx.partition import Chain, Device, Problem, evaluate, solve, stage_costs
from tspipe_fx.partition.polisher import polish, simulated_period
from tspipe_fx.schedule import make_schedule
from tspipe_fx.schedule.costs import at_least_whole
from tspipe_fx.schedule.simulator import simulate


def _problem(s: list[float], t: list[float], *, link_gbs: float = float("inf"), m: int = 4) -> Problem:
    """Student nodes with backward twice their forward; 1 MB crosses every cut."""
    student = Chain(tuple(s), tuple(2 * x for x in s), (0,) * len(s), (0,) * len(s),
                    tuple((p, 10**6) for p in range(1, len(s))))  # fmt: skip
    teacher = Chain(tuple(t), (0.0,) * len(t), (0,) * len(t), (0,) * len(t),
                    tuple((p, 10**6) for p in range(1, len(t))))  # fmt: skip
    return Problem(student, teacher, (Device(link_gbs=link_gbs),) * 2, micro_batches=m)


# --- stage costs and the simulated period ---------------------------------------------------------


def test_stage_costs_add_up_to_the_partition_loads() -> None:
    problem = _problem([1, 2, 3, 4, 5], [2, 2, 2, 2], link_gbs=1.0)
    part = evaluate(problem, [2], [3])
    costs = stage_costs(problem, [2], [3])
    assert [c.student_fwd_ms for c in costs] == [3, 12] and [c.student_bwd_ms for c in costs] == [6, 24]
    assert [c.teacher_fwd_ms for c in costs] == [6, 2]
    assert costs[0].student_send_ms == costs[0].teacher_send_ms == pytest.approx(1.0)  # 1 MB at 1 GB/s
    assert costs[1].student_send_ms == costs[1].teacher_send_ms == 0.0  # nothing after the last device
    # The load counts each transfer at both of its ends, an activation and its gradient twice.
    for j, c in enumerate(costs):
        sends = 2 * c.student_send_ms + c.teacher_send_ms + (2 * 1.0 + 1.0 if j == 1 else 0.0)
        assert part.loads_ms[j] == pytest.approx(
            4 * (c.student_fwd_ms + c.student_bwd_ms + c.teacher_fwd_ms + sends)
        )


def test_simulated_period_is_the_simulator_on_the_stage_costs() -> None:
    problem = _problem([1, 2, 3, 4, 5], [2, 2, 2, 2])
    schedule = make_schedule("tspipe", 2, 4)
    cost = {("sf", 0): 3, ("sb", 0): 6, ("tf", 0): 6, ("sf", 1): 12, ("sb", 1): 24, ("tf", 1): 2}
    expected = simulate(schedule, lambda t: cost.get((t.kind, t.stage), 0.0)).period
    assert simulated_period(problem, [2], [3], schedule) == pytest.approx(expected)
    with pytest.raises(TspipeError, match="3 stages"):
        simulated_period(problem, [2], [3], make_schedule("tspipe", 3, 4))


def test_polish_finds_a_shorter_tspipe_period_than_the_even_load() -> None:
    """Two partitions with the same min-max load (160): under tspipe the solver's leaves device 0
    idle while it waits for its first gradient, 174 a batch; the polished one is the best of all."""
    problem = _problem([2, 4, 4, 2, 4, 3], [4, 6, 1, 6, 1, 1])
    schedule = make_schedule("tspipe", 2, 4)
    start = solve(problem)
    polished = polish(problem, start, schedule)
    p0 = simulated_period(problem, start.student_cuts, start.teacher_cuts, schedule)
    p1 = simulated_period(problem, polished.student_cuts, polished.teacher_cuts, schedule)
    every = min(simulated_period(problem, [u], [v], schedule) for u in range(1, 6) for v in range(1, 6))
    assert start.period_ms == polished.period_ms == 160.0
    assert (p0, p1, every) == (174.0, 160.0, 160.0)


def test_polish_never_makes_the_simulated_period_longer() -> None:
    schedule = make_schedule("tspipe", 2, 3)
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        s = (torch.rand(9, generator=g) * 10 + 0.1).tolist()
        t = (torch.rand(7, generator=g) * 10 + 0.1).tolist()
        problem = _problem(s, t, m=3)
        start = solve(problem)
        out = polish(problem, start, schedule, budget=40)
        assert simulated_period(problem, out.student_cuts, out.teacher_cuts, schedule) <= simulated_period(
            problem, start.student_cuts, start.teacher_cuts, schedule
        )


def test_polish_keeps_memory_limits_and_mirrored_cuts() -> None:
    s = [4.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    chain = Chain(tuple(s), tuple(2 * x for x in s), (100,) * 6, (0,) * 6, tuple((p, 0) for p in range(1, 6)))
    limit = 4 * (100 * 4 + 100)  # four nodes: student params x (2 + optimizer factor 2), teacher x 1
    problem = Problem(chain, chain, (Device(memory_bytes=limit),) * 2, micro_batches=2, mirror=True)
    schedule = make_schedule("tspipe", 2, 2, mode="momentum")
    out = polish(problem, solve(problem), schedule)
    assert out.student_cuts == out.teacher_cuts
    assert all(m <= limit for m in out.memory_bytes)


# --- timing stages whole ------------------------------------------------------------------------


def _pipe(**kw: object) -> tspipe_fx.Pipeline:
    torch.manual_seed(0)
    return tspipe_fx.compile(Net(), Net().eval(), 2, example_inputs=(torch.randn(8, 8),), micro_batches=2,
                             cost_model=UniformCost(), **kw)  # type: ignore[arg-type]  # fmt: skip


def test_time_stages_runs_every_stage_and_leaves_the_models_alone() -> None:
    pipe = _pipe()
    before = {k: v.clone() for k, v in pipe.student.graph_module.state_dict().items()}
    x = [torch.randn(4, 8)]
    times = time_stages(pipe.student_io, pipe.teacher_io, x, x, "cpu", repeats=3)
    assert len(times.student_fwd_ms) == len(times.student_bwd_ms) == len(times.teacher_fwd_ms) == 2
    assert all(v > 0 for v in (*times.student_fwd_ms, *times.student_bwd_ms, *times.teacher_fwd_ms))
    assert times.loads_ms(2) == [2 * sum(x) for x in zip(times.student_fwd_ms, times.student_bwd_ms,
                                                        times.teacher_fwd_ms, strict=True)]  # fmt: skip
    # The split backward's halves, as shares of the whole backward timed beside them.
    assert len(times.student_input_grad_ms) == len(times.student_weight_grad_ms) == 2
    assert all(v > 0 for v in (times.student_input_grad_ms[1], *times.student_weight_grad_ms))
    shares = times.split_shares()
    i, w, b = times.student_input_grad_ms[1], times.student_weight_grad_ms[1], times.student_bwd_ms[1]
    assert shares[1] == pytest.approx((i / b, w / b) if i + w >= b else (i / (i + w), w / (i + w)))
    assert all(i >= 0 and w > 0 and i + w >= 1 - 1e-12 for i, w in shares)
    after = pipe.student.graph_module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics untouched
    with pytest.raises(TspipeError, match="repeats >= 1"):
        time_stages(pipe.student_io, pipe.teacher_io, x, x, "cpu", repeats=0)


def test_split_shares_never_price_the_split_below_the_whole_backward() -> None:
    """Halves timed at 0.9x the whole (noise: the same gradients in two calls) are raised to add
    up to it, in proportion; halves above it are kept: what splitting costs."""
    times = StageTimes((1.0, 1.0), (10.0, 10.0), (1.0, 1.0), (3.0, 4.0), (6.0, 8.0))
    assert _flat(times.split_shares()) == pytest.approx([1 / 3, 2 / 3, 0.4, 0.8])
    assert StageTimes((1.0,), (0.0,), (1.0,), (0.0,), (0.0,)).split_shares() == ((0.0, 1.0),)


def test_at_batch_cuts_and_repeats_the_batch_dimension() -> None:
    x, ids = torch.arange(6.0).reshape(3, 2), torch.tensor([1, 2, 3])
    small = at_batch([x, ids, 7], 3, 2)
    assert torch.equal(small[0], x[:2]) and torch.equal(small[1], ids[:2]) and small[2] == 7
    big = at_batch([x], 3, 5)
    assert torch.equal(big[0], torch.cat([x, x[:2]]))


def test_refine_rescales_stage_costs_to_the_measured_times(monkeypatch: pytest.MonkeyPatch) -> None:
    """With fixed cuts, one round: the plan's stage costs become the measured times."""
    fake = StageTimes((1.0, 2.0), (3.0, 4.0), (5.0, 6.0))
    monkeypatch.setattr(compiler, "time_stages", lambda *a, **k: fake)
    pipe = _pipe(balance=([4, 5], [4, 5]), refine=3)
    plan = pipe.plan
    assert plan.cost_model == "uniform+refined"
    assert [s.fwd_ms for s in plan.student.stages] == pytest.approx([1.0, 2.0])
    assert [s.bwd_ms for s in plan.student.stages] == pytest.approx([3.0, 4.0])
    assert [s.fwd_ms for s in plan.teacher.stages] == pytest.approx([5.0, 6.0])
    # The loads: the measured compute, plus the same link time as before (refining times compute).
    base = _pipe(balance=([4, 5], [4, 5])).plan
    links = [load - 2 * (s.fwd_ms + s.bwd_ms + t.fwd_ms) for load, s, t in
             zip(base.loads_ms, base.student.stages, base.teacher.stages, strict=True)]  # fmt: skip
    assert plan.loads_ms == pytest.approx([2 * 9.0 + links[0], 2 * 12.0 + links[1]])


def test_refine_moves_work_off_a_stage_that_runs_slower_than_predicted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Uniform costs balance the nodes; if the stages run whole say stage 1's student work costs
    three times its share, the next partition gives stage 1 fewer student nodes, and the kept
    partition is the measured one whose loads were the most even."""
    seen: dict[tuple[tuple[int, ...], tuple[int, ...]], list[float]] = {}

    def fake(student: list, teacher: list, *a: object, **k: object) -> StageTimes:  # type: ignore[type-arg]
        s, t = tuple(len(x.nodes) for x in student), tuple(len(x.nodes) for x in teacher)
        times = StageTimes((s[0], 3.0 * s[1]), (s[0], 3.0 * s[1]), (float(t[0]), float(t[1])))
        seen[(s, t)] = times.loads_ms(2)
        return times

    monkeypatch.setattr(compiler, "time_stages", fake)
    first = _pipe(schedule=None).plan
    plan = _pipe(refine=4, schedule=None).plan

    def sizes(p: tspipe_fx.Plan) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return tuple(len(x.nodes) for x in p.student.stages), tuple(len(x.nodes) for x in p.teacher.stages)

    assert next(iter(seen)) == sizes(first) and len(seen) >= 2
    assert sizes(plan)[0][1] < sizes(first)[0][1]
    evenness = {k: max(v) / (sum(v) / 2) for k, v in seen.items()}
    assert evenness[sizes(plan)] == min(evenness.values())
    s_nodes = sizes(plan)[0]  # the kept partition's costs are its measured times
    assert [st.fwd_ms for st in plan.student.stages] == pytest.approx([s_nodes[0], 3.0 * s_nodes[1]])


def _flat(pairs: Iterable[Sequence[float]]) -> list[float]:
    return [v for pair in pairs for v in pair]


def test_refine_records_the_timed_split_backward_and_auto_prices_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refine's split halves travel in the plan (and a saved plan rebuilt) to the synthesizer: a
    split that costs 1.3x the backward is not chosen where a free one is."""
    split_at = {"cheap": ((0.0, 1.0), (0.5, 0.5)), "dear": ((0.0, 1.0), (0.9, 0.9))}

    def fake(shares: tuple[tuple[float, float], ...]) -> StageTimes:
        bwd = (12.0, 26.0)  # the KD pair of the CPU benchmark, roughly: the teacher on stage 0
        return StageTimes((9.0, 12.0), bwd, (20.0, 0.1), tuple(i * b for (i, _), b in zip(shares, bwd, strict=True)),
                          tuple(w * b for (_, w), b in zip(shares, bwd, strict=True)))  # fmt: skip

    plans = {}
    for name, shares in split_at.items():
        monkeypatch.setattr(compiler, "time_stages", lambda *a, shares=shares, **k: fake(shares))
        plans[name] = _pipe(balance=([4, 5], [4, 5]), refine=1, loss="micro").plan
        assert _flat(s.split_shares for s in plans[name].student.stages) == pytest.approx(_flat(shares))
        assert _flat(plans[name].stage_costs().split_shares) == pytest.approx(_flat(shares))
    assert plans["cheap"].build_schedule(3).split_backward
    assert not plans["dear"].build_schedule(3).split_backward
    assert tspipe_fx.Plan.from_json(plans["dear"].to_json()) == plans["dear"]
    again = tspipe_fx.compile(Net(), Net().eval(), 2, example_inputs=(torch.randn(8, 8),), plan=plans["dear"]).plan
    assert _flat(again.stage_costs().split_shares) == pytest.approx(_flat(split_at["dear"]))
    assert not again.build_schedule(3).split_backward


def test_a_saved_plan_with_halves_below_the_whole_backward_is_priced_at_the_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Plans saved before the halves were raised hold shares that add up to less than 1 (the
    thirteenth session's benchmark plan: 0.94 on its first stage). Read back, they are priced at
    the whole backward at least, so no schedule's efficiency comes out above 1."""
    monkeypatch.setattr(compiler, "time_stages", lambda *a, **k: StageTimes(
        (9.0, 12.0), (12.0, 26.0), (20.0, 0.1), (0.0, 13.0), (12.0, 13.0)))  # fmt: skip
    plan = _pipe(balance=([4, 5], [4, 5]), refine=1, loss="micro").plan
    old = ((0.001, 0.936), (0.428, 0.573))  # as that plan saved them
    stages = tuple(dataclasses.replace(s, split_shares=h) for s, h in zip(plan.student.stages, old, strict=True))
    saved = dataclasses.replace(plan, student=dataclasses.replace(plan.student, stages=stages))
    saved = tspipe_fx.Plan.from_json(saved.to_json())
    priced = saved.stage_costs().split_shares
    assert sum(priced[0]) == pytest.approx(1.0) and sum(priced[1]) == pytest.approx(1.001)
    assert priced[0][0] / priced[0][1] == pytest.approx(0.001 / 0.936)  # raised in proportion
    for name in ("auto", "tspipe"):
        timeline = tspipe_fx.plan.simulate_plan(saved, name)
        work = saved.stage_costs().work_ms(saved.micro_batches, saved.views)
        assert work / (len(saved.devices) * timeline.period) <= 1.0 + 1e-9
    assert at_least_whole(0.0, 0.0) == (0.0, 1.0) and at_least_whole(0.6, 0.6) == (0.6, 0.6)


def test_refine_and_schedule_reject_bad_values() -> None:
    with pytest.raises(TspipeError, match="refine must be an integer >= 0"):
        _pipe(refine=-1)
    with pytest.raises(TspipeError, match="schedule must be 'auto', 'tspipe', 'gpipe', '1f1b' or None"):
        _pipe(schedule="sequential")


def test_refine_needs_a_capture_valid_at_the_micro_batch() -> None:
    captured = tspipe_fx.capture(Net(), (torch.randn(8, 8),))
    captured.dynamic_batch = False  # as an export whose batch size could not be made dynamic
    with pytest.raises(TspipeError, match=r"one micro-batch of 4 samples.*hint: example_inputs of 4"):
        tspipe_fx.compile(captured, Net().eval(), 2, example_inputs=(torch.randn(8, 8),), micro_batches=2,
                          cost_model=UniformCost(), refine=1)  # fmt: skip
