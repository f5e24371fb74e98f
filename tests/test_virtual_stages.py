"""Virtual stages (several stages per device, interleaved): the schedule data, the partition and
the local runtime."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from toys import Online, Target, byol_loss, run_batches, sgd

import tspipe_fx
from tspipe_fx.errors import TspipeError
from tspipe_fx.partition.interleave import device_loads, interleaved, stage_problem
from tspipe_fx.partition.objective import evaluate
from tspipe_fx.partition.problem import Chain, Device, Partition, PartitionError, Problem
from tspipe_fx.partition.solver import solve
from tspipe_fx.plan import Plan
from tspipe_fx.runtime.reference import ReferenceTrainer
from tspipe_fx.runtime.trainer import Trainer
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


# BYOL ResNet-18 on 8 H100s (roofline, NVLink 4) cut into 16 stages by partition.interleave
# (stage slack 0.4): per stage, ms a micro-batch of 16 samples.
BYOL_16 = StageCosts.of(
    [0.182, 0.242, 0.157, 0.153, 0.18, 0.11, 0.173, 0.142, 0.118, 0.118, 0.156, 0.138, 0.138, 0.21, 0.148, 0.188],
    [0.364, 0.268, 0.268, 0.268, 0.268, 0.142, 0.299, 0.252, 0.229, 0.157, 0.28, 0.245, 0.245, 0.391, 0.253, 0.304],
    [0.182, 0.242, 0.157, 0.153, 0.18, 0.11, 0.173, 0.142, 0.118, 0.118, 0.156, 0.138, 0.138, 0.21, 0.148, 0.169],
    [0.233, 0.119, 0.062, 0.119, 0.062, 0.091, 0.034, 0.062, 0.062, 0.048, 0.019, 0.034, 0.019, 0.019, 0.019, 0.0],
    [0.233, 0.119, 0.062, 0.119, 0.062, 0.091, 0.034, 0.062, 0.062, 0.048, 0.019, 0.034, 0.019, 0.019, 0.019, 0.0],
)


def test_backward_first_runs_interleaved_stages_near_the_busiest_device() -> None:
    """With two stages per device every micro-batch's path is about as long as the next one's:
    by the bottom level alone the synthesizer let later forwards crowd out the backwards, and
    the best variant ran 1.085x the busiest device's work. Backward first (1F1B's rule) runs
    within 2% of it."""
    s = make_schedule("auto", 16, 8, views=2, mode="momentum", loss="micro", costs=BYOL_16, stages_per_device=2,
                      n_batches=6)  # fmt: skip
    validate(s)
    busiest = max(BYOL_16.loads_ms(8, 2, stages_per_device=2))
    assert s.variant.startswith("backward first")
    assert simulate_costs(s, BYOL_16).period <= 1.02 * busiest


# Momentum ViT-B/16 on 16 H100s (roofline, NVLink 4, batch 256, M = 16) cut into 32 stages by
# partition.interleave (stage slack 0.5): per stage, ms a micro-batch of 16 samples.
_VIT_F = [0.505, 0.497, 0.25, 0.393, 0.278, 0.198, 0.401, 0.476, 0.397, 0.476, 0.393, 0.238, 0.368, 0.505, 0.242, 0.397,
          0.274, 0.202, 0.397, 0.274, 0.328, 0.505, 0.287, 0.081, 0.271, 0.226, 0.295, 0.352, 0.274, 0.198, 0.401, 0.275]
_VIT_B = [0.643, 0.904, 0.341, 0.636, 0.452, 0.341, 0.636, 0.793, 0.636, 0.793, 0.636, 0.452, 0.525, 0.904, 0.341, 0.636,
          0.452, 0.341, 0.636, 0.452, 0.525, 0.904, 0.406, 0.119, 0.452, 0.452, 0.406, 0.571, 0.452, 0.341, 0.636, 0.462]
_VIT_L = [0.027, 0.048, 0.091, 0.113, 0.048, 0.091, 0.113, 0.091, 0.113, 0.091, 0.113, 0.048, 0.027, 0.048, 0.091, 0.113,
          0.048, 0.091, 0.113, 0.048, 0.027, 0.048, 0.048, 0.027, 0.113, 0.048, 0.048, 0.113, 0.048, 0.091, 0.113, 0.0]
VIT_32 = StageCosts.of(_VIT_F, _VIT_B, _VIT_F, _VIT_L, _VIT_L)


@pytest.mark.slow  # about 30 s: 32 stages, 16 micro-batches, two views, eight batches synthesized
def test_interleaved_vit_b_runs_at_its_busiest_device() -> None:
    """Stages of uneven sizes take longer to settle into a steady order: from a run of four
    batches the best steady window repeated at 1.025x the busiest device's work; from eight (the
    horizon with virtual stages), within 1%."""
    s = make_schedule("auto", 32, 16, views=2, mode="momentum", loss="micro_full_teacher", costs=VIT_32,
                      stages_per_device=2, n_batches=6)  # fmt: skip
    validate(s)
    busiest = max(VIT_32.loads_ms(16, 2, stages_per_device=2))
    assert simulate_costs(s, VIT_32).period <= 1.01 * busiest


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


# --- the interleaved partition (partition/interleave.py) ----------------------------------------


def _mirrored(fwd: list[float], params: list[int], memory: float, n: int, cuts: list[int]) -> Problem:
    s = Chain(tuple(fwd), tuple(2 * f for f in fwd), tuple(params), (0,) * len(fwd), tuple((p, 0) for p in cuts))
    t = Chain(tuple(fwd), (0.0,) * len(fwd), tuple(params), (0,) * len(fwd), s.cuts)
    return Problem(s, t, (Device(memory_bytes=memory),) * n, micro_batches=2, mirror=True, optimizer_factor=0.0)


def _score(part: Partition, n: int, slack: float) -> float:
    """The period a partition meets: its largest device sum, or more where a stage is over the
    cap of ``(1 + slack) / 2`` of the period."""
    return max(max(device_loads(part, n)[0]), 2 * max(part.loads_ms) / (1 + slack))


def _brute(problem: Problem, slack: float) -> float | None:
    """The smallest score over every cut of the chain into 2N stages within each device's
    memory (None: none fits)."""
    n = len(problem.devices)
    positions = [p for p, _ in problem.student.cuts]
    staged = stage_problem(problem, 2)
    scores = []
    for cuts in itertools.combinations(positions, 2 * n - 1):
        part = evaluate(staged, cuts, cuts)
        if max(device_loads(part, n)[1]) <= problem.devices[0].memory_bytes:
            scores.append(_score(part, n, slack))
    return min(scores, default=None)


@settings(max_examples=60, deadline=None)
@given(
    fwd=st.lists(st.floats(0.1, 10.0, allow_nan=False), min_size=5, max_size=9),
    n=st.integers(1, 2),
    slack=st.sampled_from([0.1, 0.5, 100.0]),
    memory=st.sampled_from([math.inf, 4000.0, 2500.0]),
    data=st.data(),
)
def test_the_interleaved_partition_equals_brute_force(
    fwd: list[float], n: int, slack: float, memory: float, data: st.DataObject
) -> None:
    """Without transfers the answer meets the brute force's best period (bisection: to its
    tolerance) within each device's memory; where nothing fits, both say so."""
    params = data.draw(st.lists(st.integers(0, 1000), min_size=len(fwd), max_size=len(fwd)))
    problem = _mirrored(fwd, params, memory, n, list(range(1, len(fwd))))
    best = _brute(problem, slack)
    if best is None:
        with pytest.raises(PartitionError, match="fits the devices' memory"):
            interleaved(problem, stage_slack=slack)
        return
    part = interleaved(problem, stage_slack=slack)
    assert _score(part, n, slack) == pytest.approx(best, rel=1e-5)
    assert max(device_loads(part, n)[1]) <= memory


def test_interleaving_balances_the_chain_one_piece_per_device_cannot() -> None:
    """3 + 2 + 2 + 1 + 2 + 2 onto 3 devices (forward, backward 2x, teacher forward alike: x4):
    contiguous pieces leave a device 5 of 12, two stages per device give each 4."""
    problem = _mirrored([3.0, 2.0, 2.0, 1.0, 2.0, 2.0], [0] * 6, math.inf, 3, [1, 2, 3, 4, 5])
    assert max(solve(problem).loads_ms) == pytest.approx(5 * 4 * 2)
    part = interleaved(problem, stage_slack=1.0)
    assert part.student_cuts == (1, 2, 3, 4, 5)
    assert device_loads(part, 3)[0] == pytest.approx([4 * 4 * 2] * 3)


def test_the_teacher_is_cut_at_its_own_paired_positions() -> None:
    """A momentum teacher without the student's predictor has its own positions, paired with the
    student's by index (a mirrored problem): the interleaved cuts are the same indices in each."""
    s = Chain((1.0,) * 7, (2.0,) * 7, (0,) * 7, (0,) * 7, tuple((p, 0) for p in range(1, 7)))
    t = Chain((1.0,) * 8, (0.0,) * 8, (0,) * 8, (0,) * 8, tuple((p, 0) for p in (1, 2, 4, 5, 6, 7)))
    part = interleaved(Problem(s, t, (Device(),) * 2, mirror=True), stage_slack=1.0)
    s_index = [p for p, _ in s.cuts]
    t_index = [p for p, _ in t.cuts]
    assert [t_index.index(c) for c in part.teacher_cuts] == [s_index.index(c) for c in part.student_cuts]


def test_interleaved_partitions_refuse_what_they_do_not_model() -> None:
    problem = _mirrored([1.0] * 6, [0] * 6, math.inf, 2, [1, 2, 3, 4, 5])
    with pytest.raises(PartitionError, match="pair the teacher's cuts with the student's"):
        interleaved(dataclasses.replace(problem, mirror=False))
    with pytest.raises(PartitionError, match=r"devices of one speed, got \[1.0, 2.0\]"):
        interleaved(dataclasses.replace(problem, devices=(Device(), Device(speed=2.0))))
    with pytest.raises(PartitionError, match="5 candidate cuts: too few for 8 stages"):
        interleaved(dataclasses.replace(problem, devices=(Device(),) * 4))


# --- the local runtime runs virtual stages ------------------------------------------------------


def _byol_toy() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    online = Online()
    return online, Target(online)


@pytest.mark.parametrize(("staleness", "loss"), [(1, "micro"), (0, "micro"), (1, "batch")])
def test_the_local_runtime_runs_two_stages_per_device_as_the_reference(staleness: int, loss: str) -> None:
    """BYOL's toy (BatchNorm in the projector) on 2 devices, two stages each (``"auto"``: on
    uniform costs they simulate 116 ms a batch against one stage's 128): one thread per device runs
    both its stages' tasks in the synthesized order, and trains what plain training does, loss
    by loss and weight by weight."""
    online, target = _byol_toy()
    one = tspipe_fx.compile(copy.deepcopy(online), copy.deepcopy(target), 2, example_inputs=(torch.randn(8, 8),),
                            mode="momentum", cost_model="uniform")  # fmt: skip
    pipe = tspipe_fx.compile(copy.deepcopy(online), copy.deepcopy(target), 2, example_inputs=(torch.randn(8, 8),),
                             mode="momentum", cost_model="uniform", stages_per_device="auto")  # fmt: skip
    assert (pipe.plan.stages_per_device, pipe.plan.n_stages, pipe.plan.n_devices) == (2, 4, 2)
    assert pipe.plan.period_ms < one.plan.period_ms
    assert "4 stages on 2 devices" in pipe.report()
    assert Plan.from_json(pipe.plan.to_json()) == pipe.plan
    trainer = pipe.trainer(byol_loss, optimizer=sgd, views=2, staleness=staleness, momentum=0.9, loss=loss)
    assert [{t.stage for t in tasks} for tasks in trainer.window(1, last=False)] == [{0, 2}, {1, 3}]
    ref = ReferenceTrainer(copy.deepcopy(online), copy.deepcopy(target), byol_loss, optimizer=sgd, mode="momentum",
                           micro_batches=trainer.m, views=2, staleness=staleness, momentum=0.9,
                           micro_major=trainer.micro_major, loss=loss)  # fmt: skip
    batches = [(torch.randn(8, 8), torch.randn(8, 8)) for _ in range(6)]
    got = run_batches(trainer, batches)
    want = [ref.step(*b) for b in batches]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    for like, mine, which in ((online, ref.student, "student"), (target, ref.teacher, "teacher")):
        trained = copy.deepcopy(like)
        trainer.sync_to_modules(**{which: trained})
        for (name, a), b in zip(trained.state_dict().items(), mine.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stages_per_device": 3}, "stages_per_device must be 1, 2 or 'auto'"),
        ({"stages_per_device": 2.0}, "stages_per_device must be 1, 2 or 'auto'.*got 2.0"),
        ({"stages_per_device": 2, "mode": "kd"}, "needs mode='momentum'.*got mode='kd'"),
        ({"stages_per_device": 2, "schedule": "tspipe"}, "got schedule='tspipe'"),
        ({"stages_per_device": "auto", "recompute": "always"}, "got recompute='always'"),
        ({"stages_per_device": 2, "refine": 1}, "got refine=1"),
    ],
)
def test_compile_refuses_virtual_stages_where_they_are_not_modelled(kwargs: dict, match: str) -> None:
    online, target = _byol_toy()
    settings = {"mode": "momentum", "cost_model": "uniform", **kwargs}
    with pytest.raises(TspipeError, match=match):
        tspipe_fx.compile(online, target, 2, example_inputs=(torch.randn(8, 8),), **settings)


def test_two_stages_per_device_are_kept_within_memory() -> None:
    """Two stages on a device hold more than its one stage did here (their peaks are summed):
    at the one-stage plan's own peak as the limit, "auto" keeps one stage per device, and 2,
    asked for, names the device over its memory."""
    online, target = _byol_toy()
    common = dict(example_inputs=(torch.randn(8, 8),), mode="momentum", cost_model="uniform")
    one = tspipe_fx.compile(copy.deepcopy(online), copy.deepcopy(target), 2, **common)
    limit = int(max(one.plan.memory_bytes))
    auto = tspipe_fx.compile(copy.deepcopy(online), copy.deepcopy(target), 2, memory_limit=limit,
                             stages_per_device="auto", **common)  # fmt: skip
    assert auto.plan.stages_per_device == 1
    with pytest.raises(TspipeError, match=r"exceed the memory of devices \[0\]; hint: .*stages_per_device=1"):
        tspipe_fx.compile(online, target, 2, memory_limit=limit, stages_per_device=2, **common)


def test_what_virtual_stages_cannot_train_with_is_refused() -> None:
    online, target = _byol_toy()
    pipe = tspipe_fx.compile(online, target, 2, example_inputs=(torch.randn(8, 8),), mode="momentum",
                             cost_model="uniform", stages_per_device=2)  # fmt: skip
    for bad in ({"clip_grad_norm": 1.0}, {"precision": "fp16"}):  # (a device's first step would wait for its second)
        with pytest.raises(TspipeError, match=r"every stage's gradient norms .* hint: a plan with one stage per device"):
            pipe.trainer(byol_loss, optimizer=sgd, views=2, **bad)
    tied = dataclasses.replace(pipe.staged("student"), ties=((("backbone.a.weight",), (0, 2)),))
    with pytest.raises(TspipeError, match=r"tied tensors \['backbone.a.weight'\] sit on stages \[0, 2\], two of"):
        Trainer(pipe.plan, tied, pipe.staged("teacher"), byol_loss, optimizer=sgd, views=2)
    single = dataclasses.replace(pipe.plan, devices=("cpu",) * 4, stages_per_device=4)
    with pytest.raises(TspipeError, match=r"4 stages on its one device, and runtime='dist' sends"):
        Trainer(single, pipe.staged("student"), pipe.staged("teacher"), byol_loss, optimizer=sgd, views=2, runtime="dist")
    with pytest.raises(TspipeError, match="stages_per_device must be an integer >= 1 dividing the 4 stages"):
        dataclasses.replace(pipe.plan, stages_per_device=3)
    with pytest.raises(TspipeError, match="above 1 with schedule 'auto' only"):
        dataclasses.replace(pipe.plan, schedule="tspipe")


def test_a_saved_plan_of_virtual_stages_is_rebuilt() -> None:
    """compile(plan=...) keeps the saved stages per device (as every rank of the distributed
    runtime does with rank 0's plan); asking for other stages with a plan, or what virtual stages
    do not model, is refused."""
    online, target = _byol_toy()
    common = dict(example_inputs=(torch.randn(8, 8),), mode="momentum", cost_model="uniform")
    pipe = tspipe_fx.compile(copy.deepcopy(online), copy.deepcopy(target), 2, stages_per_device=2, **common)
    saved = Plan.from_json(pipe.plan.to_json())
    again = tspipe_fx.compile(copy.deepcopy(online), copy.deepcopy(target), 2, plan=saved, **common)
    assert (again.plan.stages_per_device, again.plan.n_stages) == (2, 4)
    assert (again.plan.student.cuts, again.plan.teacher.cuts) == (pipe.plan.student.cuts, pipe.plan.teacher.cuts)
    assert (again.plan.period_ms, again.plan.micro_batches) == (pipe.plan.period_ms, pipe.plan.micro_batches)
    assert again.plan.memory_bytes == pipe.plan.memory_bytes
    with pytest.raises(TspipeError, match=r"stages_per_device='auto' with a saved plan: the plan fixes its stages \(2"):
        tspipe_fx.compile(online, target, 2, plan=saved, stages_per_device="auto", **common)
    with pytest.raises(TspipeError, match=r"a saved plan of 2 stages per device .* got schedule='tspipe'"):
        tspipe_fx.compile(online, target, 2, plan=saved, schedule="tspipe", **common)
    with pytest.raises(TspipeError, match="the plan is for 2 devices, n_gpus is 4"):
        tspipe_fx.compile(online, target, 4, plan=saved, **common)


def test_a_checkpoint_of_virtual_stages_resumes_the_same_run(tmp_path: Path) -> None:
    """One file per stage (four on two devices); the resumed run's losses are the straight run's,
    bit for bit."""
    from tspipe_fx.runtime.checkpoint import load_checkpoint, save_checkpoint

    online, target = _byol_toy()
    data = [(torch.randn(8, 8), torch.randn(8, 8)) for _ in range(6)]

    def trainer() -> Any:
        pipe = tspipe_fx.compile(copy.deepcopy(online), copy.deepcopy(target), 2, example_inputs=(torch.randn(8, 8),),
                                 mode="momentum", cost_model="uniform", stages_per_device=2)  # fmt: skip
        return pipe.trainer(byol_loss, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2), views=2, momentum=0.9)

    all_losses = run_batches(trainer(), data)
    first = trainer()
    head = run_batches(first, data[:3])
    save_checkpoint(first, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("stage-")) == [
        f"stage-{j}.g1.pt" for j in range(4)
    ]
    second = trainer()
    load_checkpoint(second, tmp_path / "ckpt")
    assert head + run_batches(second, data[3:]) == all_losses


def test_a_rank_of_the_distributed_runtime_holds_its_devices_stages() -> None:
    """Rank ``r`` of ``world / N`` pipelines is device ``r % N`` and holds stages ``r % N + kN``;
    a stage's messages go to the rank of its device in the same pipeline."""
    from tspipe_fx.runtime.dist.layout import Layout

    layout = Layout(rank=5, world=6, n_devices=3, stages_per_device=2)
    assert (layout.pipelines, layout.pipeline, layout.device, layout.n_stages) == (2, 1, 2, 6)
    assert layout.stages == [2, 5]
    assert [layout.rank_of(j) for j in range(6)] == [3, 4, 5, 3, 4, 5]
    assert [layout.rank_of(j, 0) for j in range(6)] == [0, 1, 2, 0, 1, 2]
    assert (layout.where(5), layout.where(0)) == ("stages 2, 5", "stages 0, 3")
    assert Layout(rank=1, world=2, n_devices=2).where(1) == "stage 1"
