"""The simulator: task costs and links in, a timeline out; one transfer rule for every caller."""

from __future__ import annotations

import math

import pytest

from tspipe_fx.partition import Device, link_ms
from tspipe_fx.schedule import make_schedule, simulate, simulate_stages, transfer_ms


def test_transfer_rule() -> None:
    assert transfer_ms(0, math.inf, 0.0) == 0.0  # nothing over a free link
    assert transfer_ms(0, 10.0, 0.02) == 0.02  # an empty message still pays the latency
    assert transfer_ms(10e6, 10.0, 0.02) == pytest.approx(1.02)  # 10 MB at 10 GB/s: 1 ms
    assert link_ms(Device(link_gbs=10.0, link_latency_ms=0.02), 10e6) == transfer_ms(10e6, 10.0, 0.02)


def test_two_stages_by_hand() -> None:
    """gpipe, 2 stages, 1 micro-batch, no teacher work: sf0 (1) -> send (0.5) -> sf1 (2) -> sb1 (3)
    -> send back (0.5) -> sb0 (4); each batch waits for the last one's steps."""
    s = make_schedule("gpipe", 2, 1, n_batches=3)
    tl = simulate_stages(s, student_fwd_ms=[1, 2], student_bwd_ms=[4, 3], teacher_fwd_ms=[0, 0],
                         student_send_ms=[0.5, 0.0])  # fmt: skip
    at = {(t.kind, t.stage): (start, end) for spans in tl.spans for start, end, t in spans if t.batch == 0}
    assert at[("sf", 0)] == (0, 1) and at[("sf", 1)] == (1.5, 3.5) and at[("sb", 1)] == (3.5, 6.5)
    assert at[("sb", 0)] == pytest.approx((7.0, 11.0))
    assert tl.period == pytest.approx(11.0)  # one batch after another: 1 + .5 + 2 + 3 + .5 + 4
    assert tl.makespan == pytest.approx(33.0)


def test_utilisation_and_bubbles_of_the_unit_model() -> None:
    tl = simulate(make_schedule("gpipe", 3, 2, n_batches=4))
    assert len(tl.utilisation()) == 3 and all(0 < u <= 1 for u in tl.utilisation())
    assert 0 < tl.bubble_fraction < 1
    assert tl.batch_end(3) == tl.makespan  # the last optimizer step ends the run
