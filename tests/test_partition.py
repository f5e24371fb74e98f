"""The partitioner: exact against brute force on random small instances, and its invariants."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tspipe_fx.partition import (
    Chain,
    Device,
    Partition,
    PartitionError,
    Problem,
    brute_force,
    evaluate,
    solve,
)

costs = st.floats(min_value=0.0, max_value=10.0, allow_nan=False)
small_bytes = st.integers(min_value=0, max_value=4000)


@st.composite
def chains(draw: st.DrawFn, min_nodes: int = 2, max_nodes: int = 7) -> Chain:
    n = draw(st.integers(min_nodes, max_nodes))
    fwd = tuple(draw(st.lists(costs, min_size=n, max_size=n)))
    bwd = tuple(draw(st.lists(costs, min_size=n, max_size=n)))
    params = tuple(draw(st.lists(small_bytes, min_size=n, max_size=n)))
    acts = tuple(draw(st.lists(small_bytes, min_size=n, max_size=n)))
    positions = (
        draw(st.lists(st.integers(1, n - 1), unique=True, min_size=1, max_size=n - 1)) if n > 1 else []
    )
    cuts = tuple((p, draw(small_bytes)) for p in sorted(positions))
    return Chain(fwd, bwd, params, acts, cuts)


@st.composite
def devices(draw: st.DrawFn, n: int, memory: bool) -> tuple[Device, ...]:
    return tuple(
        Device(
            speed=draw(st.sampled_from([0.5, 1.0, 2.0])),
            memory_bytes=draw(st.integers(2000, 60000)) if memory else math.inf,
            link_gbs=draw(st.sampled_from([1e-3, 1e-2, math.inf])),
            link_latency_ms=draw(st.sampled_from([0.0, 0.5])),
        )
        for _ in range(n)
    )


@st.composite
def problems(draw: st.DrawFn, *, memory: bool = False, teacher: bool = True) -> Problem:
    s = draw(chains())
    t = draw(chains()) if teacher else None
    max_dev = min(len(s.cuts), len(t.cuts) if t else 99) + 1
    n = draw(st.integers(1, min(max_dev, 4)))
    return Problem(
        student=s,
        teacher=t,
        devices=draw(devices(n, memory)),
        micro_batches=draw(st.integers(1, 3)),
        optimizer_factor=draw(st.sampled_from([0.0, 1.0, 2.0])),
    )


def _check_invariants(problem: Problem, part: Partition) -> None:
    n = len(problem.devices)
    for cuts, chain in ((part.student_cuts, problem.student), (part.teacher_cuts, problem.teacher)):
        if chain is None:
            continue
        bounds = [0, *cuts, chain.n]
        assert len(cuts) == n - 1
        assert all(a < b for a, b in itertools.pairwise(bounds))  # non-empty, contiguous, in order
        assert set(cuts) <= {p for p, _ in chain.cuts}  # only candidate cuts
    assert part.period_ms == max(part.loads_ms)
    assert evaluate(problem, part.student_cuts, part.teacher_cuts) == part


def _assert_optimal(problem: Problem) -> None:
    """solve() finds brute force's optimum, or fails exactly when nothing fits."""
    best = brute_force(problem)
    if best is None:
        with pytest.raises(PartitionError, match=r"smallest memory per device that would work is|student_cap_ms"):
            solve(problem)
        return
    part = solve(problem)
    _check_invariants(problem, part)
    assert all(m <= d.memory_bytes for m, d in zip(part.memory_bytes, problem.devices, strict=True))
    assert part.period_ms == pytest.approx(best.period_ms, rel=1e-9, abs=1e-9)


@settings(max_examples=300, deadline=None)
@given(problems())
def test_kd_equals_brute_force(problem: Problem) -> None:
    _assert_optimal(problem)


@settings(max_examples=300, deadline=None)
@given(problems(memory=True))
def test_kd_with_memory_limits_equals_brute_force(problem: Problem) -> None:
    _assert_optimal(problem)


@settings(max_examples=200, deadline=None)
@given(problems(teacher=False, memory=True))
def test_student_only_equals_brute_force(problem: Problem) -> None:
    _assert_optimal(problem)


@st.composite
def capped(draw: st.DrawFn, mirror: bool = False) -> Problem:
    """A problem whose devices may hold at most a drawn amount of student work each."""
    problem = draw(mirrored() if mirror else problems(memory=draw(st.booleans())))
    total = sum(problem.student.fwd_ms) + sum(problem.student.bwd_ms)
    cap = draw(st.floats(min_value=0.0, max_value=max(total, 1.0)))
    return dataclasses.replace(problem, student_cap_ms=cap)


@settings(max_examples=300, deadline=None)
@given(capped())
def test_student_cap_equals_brute_force(problem: Problem) -> None:
    """The cap on each device's student work (the student's synchronous cycle grows with its
    largest stage) is honoured exactly, with and without memory limits."""
    _assert_optimal(problem)


@settings(max_examples=150, deadline=None)
@given(capped(mirror=True))
def test_student_cap_with_mirrored_cuts_equals_brute_force(problem: Problem) -> None:
    _assert_optimal(problem)


def test_an_impossible_student_cap_is_named() -> None:
    chain = Chain.uniform([1.0, 1.0, 1.0, 1.0])
    with pytest.raises(PartitionError, match=r"student_cap_ms=1\.5 ms .*hint: a larger cap"):
        solve(Problem(chain, None, (Device(), Device()), student_cap_ms=1.5))
    assert solve(Problem(chain, None, (Device(), Device()), student_cap_ms=2.0)).student_cuts == (2,)


@st.composite
def mirrored(draw: st.DrawFn) -> Problem:
    s = draw(chains(min_nodes=3))
    # The teacher: the student's backbone with its own costs, cut at the paired positions.
    t = Chain(
        tuple(draw(st.lists(costs, min_size=s.n, max_size=s.n))),
        (0.0,) * s.n,
        s.param_bytes,
        (0,) * s.n,
        s.cuts,
    )
    n = draw(st.integers(1, min(len(s.cuts) + 1, 4)))
    return Problem(
        s, t, draw(devices(n, draw(st.booleans()))), micro_batches=draw(st.integers(1, 3)), mirror=True
    )


@settings(max_examples=200, deadline=None)
@given(mirrored())
def test_mirror_equals_brute_force(problem: Problem) -> None:
    _assert_optimal(problem)
    if brute_force(problem) is not None:
        part = solve(problem)
        assert [
            problem.student.cuts.index((c, b)) for c, b in problem.student.cuts if c in part.student_cuts
        ] == [
            problem.teacher.cuts.index((c, b))
            for c, b in problem.teacher.cuts
            if c in part.teacher_cuts  # type: ignore[union-attr]
        ]


def test_reported_smallest_memory_is_tight() -> None:
    s = Chain((1.0,) * 4, (1.0,) * 4, (100, 100, 100, 700), (0,) * 4, ((1, 0), (2, 0), (3, 0)))
    tight = Problem(s, None, (Device(memory_bytes=500),) * 2, optimizer_factor=0.0)  # params x2
    with pytest.raises(
        PartitionError,
        match=r"\(500 bytes on the smallest\); the smallest memory per device that would work is 1\.37 KiB \(1,400 bytes\)",
    ) as err:
        solve(tight)
    assert "hint:" in str(err.value)
    # 700 * 2 bytes on the last node alone: 1400 is the smallest memory that fits.
    assert solve(Problem(s, None, (Device(memory_bytes=1400),) * 2, optimizer_factor=0.0)).memory_bytes == (
        600,
        1400,
    )


def test_balanced_chain_is_cut_in_the_middle() -> None:
    s = Chain.uniform([1.0] * 8)
    part = solve(Problem(s, None, (Device(),) * 4))
    assert part.student_cuts == (2, 4, 6) and part.loads_ms == (2.0, 2.0, 2.0, 2.0)


def test_teacher_fills_the_lighter_student_stage() -> None:
    # Student alone: cut 1 gives loads 4 | 6 (cut 2 gives 8 | 2). The teacher's 6 units then go
    # 4 | 2, making 8 | 8; balancing each model on its own (cuts 1 and 3) would give 7 | 9.
    s = Chain.uniform([4.0, 4.0, 1.0, 1.0])
    t = Chain.uniform([1.0] * 6)
    part = solve(Problem(s, t, (Device(),) * 2))
    assert part.student_cuts == (1,) and part.teacher_cuts == (4,)
    assert part.loads_ms == (8.0, 8.0)
    assert evaluate(Problem(s, t, (Device(),) * 2), [1], [3]).loads_ms == (7.0, 9.0)


def test_slow_links_move_the_cut_to_small_tensors() -> None:
    s = Chain.uniform([1.0] * 4, cut_bytes=[10**9, 10**9, 1])
    fast = solve(Problem(s, None, (Device(),) * 2))
    slow = solve(Problem(s, None, (Device(link_gbs=1.0),) * 2))
    assert fast.student_cuts == (2,)
    assert slow.student_cuts == (3,)  # 2 GB/s-ms of traffic vs one more ms of work


def test_heterogeneous_speeds() -> None:
    s = Chain.uniform([1.0] * 6)
    part = solve(Problem(s, None, (Device(speed=2.0), Device(speed=1.0))))
    assert part.student_cuts == (4,) and part.loads_ms == (2.0, 2.0)


def test_micro_batches_scale_the_load() -> None:
    s = Chain.uniform([1.0] * 4)
    assert solve(Problem(s, None, (Device(),) * 2, micro_batches=3)).period_ms == 6.0


def test_errors() -> None:
    s = Chain.uniform([1.0] * 3)
    with pytest.raises(PartitionError, match="2 candidate cuts: too few for 4 stages"):
        solve(Problem(s, None, (Device(),) * 4))
    with pytest.raises(PartitionError, match="2 devices need 1 cuts, got 2"):
        evaluate(Problem(s, None, (Device(),) * 2), [1, 2])
    with pytest.raises(PartitionError, match="not candidate cut positions"):
        evaluate(
            Problem(Chain((1.0,) * 3, (0.0,) * 3, (0,) * 3, (0,) * 3, ((2, 0),)), None, (Device(),) * 2), [1]
        )
    with pytest.raises(PartitionError, match="must increase strictly"):
        evaluate(Problem(s, None, (Device(),) * 3), [2, 1])
    with pytest.raises(PartitionError, match="micro_batches must be >= 1"):
        solve(Problem(s, None, (Device(),), micro_batches=0))
    with pytest.raises(PartitionError, match="chain lists differ in length"):
        Chain((1.0,), (1.0, 2.0), (0,), (0,), ())
    with pytest.raises(PartitionError, match=r"cut positions must increase strictly within 1\.\.2"):
        Chain((1.0,) * 3, (0.0,) * 3, (0,) * 3, (0,) * 3, ((3, 0),))
    with pytest.raises(PartitionError, match="mirror needs a teacher chain"):
        solve(Problem(s, Chain.uniform([1.0] * 2), (Device(),) * 2, mirror=True))
