"""Predicted memory: what a device's task list holds at once, and a partition's peak by part."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from torch import nn
from toys import kd_loss, sgd

import tspipe_fx
from tspipe_fx.errors import TspipeError
from tspipe_fx.partition.memory import predict_memory
from tspipe_fx.partition.objective import evaluate
from tspipe_fx.partition.problem import Chain, Device, PartitionError, Problem
from tspipe_fx.plan import Plan
from tspipe_fx.report.plan import render_plan
from tspipe_fx.schedule.generators import make_schedule
from tspipe_fx.schedule.memory import Sizes, busiest, checked_recompute, recomputes
from tspipe_fx.schedule.task import Task


def _sizes(act: float = 10.0, inp: float = 1.0, **kw: float) -> Sizes:
    return Sizes(**{"activations": act, "inputs": inp, "gradients": 0.0, "student_working": 0.0,
                    "accumulation": 0.0, "teacher_working": 0.0, **kw})  # fmt: skip


def _held(s, j: int, policy: str = "never", act: float = 10.0, inp: float = 1.0):
    return busiest(s.devices[j], split_backward=s.split_backward, micro_batches=s.micro_batches,
                   policy=policy, sizes=_sizes(act, inp))  # fmt: skip


def test_gpipe_style_schedules_hold_every_micro_batch_of_a_batch() -> None:
    for name, views in (("gpipe", 1), ("tspipe", 1), ("tspipe", 2)):
        s = make_schedule(name, 3, 4, views=views, mode="momentum" if views == 2 else "kd")
        for j in range(3):
            held = _held(s, j)
            assert (held.whole, held.inputs_only) == (4 * views, 0), (name, views, j)


def test_1f1b_holds_fewer_on_later_stages() -> None:
    s = make_schedule("1f1b", 4, 8, loss="micro")
    assert [_held(s, j).in_flight for j in range(4)] == [4, 3, 2, 1]


def test_recompute_holds_inputs_and_one_replay() -> None:
    s = make_schedule("gpipe", 2, 4)
    always = _held(s, 0, "always")
    assert (always.whole, always.inputs_only) == (1, 3)  # the replay of one, the others' inputs
    # gpipe runs the last micro-batch's backward first: its kept activations are gone by the replays
    last = _held(s, 0, "except_last")
    assert (last.whole, last.inputs_only) == (1, 3)
    # 1f1b runs them in order: the last micro-batch's activations are there while another replays
    last = _held(make_schedule("1f1b", 2, 4, loss="micro"), 0, "except_last")
    assert (last.whole, last.inputs_only) == (2, 0)
    # inputs bigger than the activations: the replay is never the busiest moment
    assert _held(s, 0, "always", act=1.0, inp=10.0).inputs_only == 4


def test_split_backward_frees_at_the_weight_gradient() -> None:
    tasks = [Task("sf", 0, 0, 0, 0), Task("sb", 0, 0, 0, 0), Task("sf", 0, 0, 0, 1), Task("sw", 0, 0, 0, 0)]
    common = dict(micro_batches=2, policy="never", sizes=_sizes(1.0, 0.0))
    assert busiest(tasks, split_backward=True, **common).whole == 2
    assert busiest(tasks, split_backward=False, **common).whole == 1


def test_gradients_live_from_the_first_backward_to_the_step() -> None:
    # gpipe: every forward, then the backwards; the first makes the gradients, the second adds to them
    s = make_schedule("gpipe", 1, 3, n_batches=2)
    grads = dict(gradients=100.0, accumulation=17.0)
    at = busiest(s.devices[0], split_backward=False, micro_batches=3, policy="never", sizes=_sizes(10.0, 0.0, **grads))
    assert (at.whole, at.gradients, at.working) == (2, True, 17.0)  # 20 + 100 + 17 > 30 + 100
    # activations larger than the gradients: the first backward, all three still held
    at = busiest(s.devices[0], split_backward=False, micro_batches=3, policy="never",
                 sizes=_sizes(1000.0, 0.0, **grads))  # fmt: skip
    assert (at.whole, at.gradients, at.working) == (3, True, 0.0)
    # the step sets them to None: the next batch's forwards run without them
    at = busiest(s.devices[0], split_backward=False, micro_batches=3, policy="never",
                 sizes=_sizes(1.0, 0.0, gradients=100.0, teacher_working=500.0))  # fmt: skip
    assert not at.gradients and at.working == 500.0  # a teacher forward, before any backward


def test_policies() -> None:
    assert [recomputes("except_last", m, 3) for m in range(3)] == [True, True, False]
    assert checked_recompute("auto", auto=True) == "auto"
    with pytest.raises(TspipeError, match=r"recompute must be one of \['never', 'always', 'except_last'\]"):
        checked_recompute("auto")


def _problem() -> Problem:
    # student: 4 nodes, params 100 each, activations 10 each, cut bytes 3 at 2; peaks per node
    student = Chain((1.0,) * 4, (2.0,) * 4, (100,) * 4, (10,) * 4, ((2, 3),), peak_bytes=(5, 9, 4, 7))
    teacher = Chain((1.0,) * 2, (0.0,) * 2, (50, 70), (0, 0), ((1, 6),), peak_bytes=(40, 12))
    return Problem(student, teacher, (Device(), Device()), micro_batches=4, optimizer_factor=1.0)


def test_prediction_by_part() -> None:
    p = _problem()
    part = evaluate(p, [2], [1])
    s = make_schedule("gpipe", 2, 4)
    m0, m1 = predict_memory(p, part, s)
    assert (m0.student_params, m0.optimizer_state, m0.teacher_params) == (200, 200, 50)
    # the busiest moment: the second backward, three micro-batches held (20 saved, 3 sent each),
    # the gradients (200) and their accumulation (twice the largest node's 100) over the working set
    assert (m0.in_flight, m0.gradients, m0.activations, m0.boundaries) == (3, 200, 3 * 20, 3 * 3)
    assert m0.working == 9 + 200
    assert m0.total == 200 + 200 + 200 + 50 + 60 + 9 + 209
    assert m1.boundaries == 3 * 3  # receives 3, sends nothing
    # bf16: the forward saves a half-size copy of the weights per micro-batch
    assert predict_memory(p, part, s, weight_copies=0.5)[0].activations == 3 * (20 + 100)


def test_a_devices_gradient_workspace_is_charged_at_the_accumulation() -> None:
    """oneDNN's AVX2 fp32 convolutions take four copies of the weight for its gradient (an AMD
    EPYC: 36.07 MB beside 9.44 MB): the device says so, and the busiest moment carries them."""
    from tspipe_fx.compiler.hardware import cpu_grad_workspace

    p = _problem()
    wide = dataclasses.replace(p, devices=(Device(grad_workspace=4.0), Device()))
    part = evaluate(p, [2], [1])
    s = make_schedule("gpipe", 2, 4)
    assert predict_memory(wide, part, s)[0].working == 9 + 5 * 100  # the new gradient and four copies
    assert predict_memory(wide, part, s)[1].working == predict_memory(p, part, s)[1].working
    avx2 = torch.backends.cpu.get_cpu_capability() == "AVX2"
    assert cpu_grad_workspace("fp32") == (4.0 if avx2 else 1.0)
    assert cpu_grad_workspace("bf16") == 1.0  # (its kernels take none: measured 18% high with them)


def test_teacher_working_set() -> None:
    student = Chain((1.0,) * 2, (2.0,) * 2, (0, 0), (0, 0), ((1, 0),), peak_bytes=(1, 1))
    teacher = Chain((1.0,) * 2, (0.0,) * 2, (0, 0), (0, 0), ((1, 0),), peak_bytes=(400, 12))
    p = Problem(student, teacher, (Device(), Device()), micro_batches=4)
    part = evaluate(p, [1], [1])
    assert predict_memory(p, part, make_schedule("gpipe", 2, 4))[0].working == 400
    # teacher micro-batches of half the rows halve its working set
    assert predict_memory(p, part, make_schedule("auto", 2, 4, teacher_parts=2))[0].working == 200


def test_recompute_prediction() -> None:
    p = _problem()
    part = evaluate(p, [2], [1])
    m0, m1 = predict_memory(p, part, make_schedule("gpipe", 2, 4), recompute=("never", "always"))
    assert m1.recompute == "always" and m1.activations in (0, 20)  # at most one replay
    assert m1.in_flight <= 4 and m1.boundaries <= 4 * 3
    assert m0.recompute == "never" and m0.activations == 60
    never = predict_memory(p, part, make_schedule("gpipe", 2, 4))[1]
    assert m1.total < never.total


# --- compile: the plan's prediction, and memory_limit honoured ---------------------------------


class Convs(nn.Module):
    """Activations far larger than its parameters (what recompute is for)."""

    def __init__(self, k: int = 6):
        super().__init__()
        layers = [m for _ in range(k) for m in (nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())]
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), *layers)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


def _compile(**kw: Any) -> Any:
    """The memory figures of these tests are tspipe's (auto's in-flight counts follow its costs)."""
    kw.setdefault("schedule", "tspipe")
    torch.manual_seed(0)
    student, teacher = Convs(), Convs(2).eval()
    x = torch.randn(8, 3, 32, 32)
    return tspipe_fx.compile(student, teacher, 2, example_inputs=(x,), batch_size=32, micro_batches=4,
                             cost_model="roofline", **kw)  # fmt: skip


def test_the_plan_records_its_prediction() -> None:
    plan = _compile().plan
    assert len(plan.memory) == 2 and plan.recompute == ()
    assert plan.memory_bytes == tuple(m.total for m in plan.memory)
    assert all(m.in_flight == 4 and m.activations > m.student_params for m in plan.memory)
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.memory == plan.memory
    report = render_plan(plan)
    assert "predicted memory per device" in report and "activations MB" in report


def test_memory_limit_is_honoured_by_recompute_where_cuts_cannot() -> None:
    peak = max(m.total for m in _compile().plan.memory)
    limit = int(peak * 0.7)
    with pytest.raises(PartitionError, match=r"device \d would need [\d.]+ MiB .* of its [\d.]+ MiB .*\(predicted "
                       r"peak, recompute 'never'\).*hint: recompute='auto'"):  # fmt: skip
        _compile(memory_limit=limit)
    plan = _compile(memory_limit=limit, recompute="auto").plan
    assert all(m.total <= limit for m in plan.memory)
    assert plan.recompute and all(r != "never" for r in plan.recompute if r)
    # the replayed forwards count: the same cuts cost more per batch with recompute
    assert plan.stage_costs().loads_ms(4, 1) > dataclasses.replace(plan, recompute=()).stage_costs().loads_ms(4, 1)
    with pytest.raises(PartitionError, match=r"the closest: .*recompute '(except_last|always)'\)"):  # nothing fits
        _compile(memory_limit=int(peak * 0.2), recompute="auto")


def test_auto_recomputes_nothing_when_everything_fits() -> None:
    assert _compile(recompute="auto").plan.recompute == ()
    assert _compile(recompute="always").plan.recompute == ("always", "always")
    with pytest.raises(TspipeError, match=r"recompute must be one of \['never', 'always', 'except_last', 'auto'\]"):
        _compile(recompute="sometimes")


def test_the_trainer_runs_the_plans_recompute() -> None:
    pipe = _compile(memory_limit=int(max(m.total for m in _compile().plan.memory) * 0.7), recompute="auto")
    trainer = pipe.trainer(kd_loss, optimizer=sgd)
    assert trainer.plan.recompute == pipe.plan.recompute
    assert trainer.runtime.recompute == pipe.plan.recompute
    told = pipe.trainer(kd_loss, optimizer=sgd, recompute="never")
    assert told.runtime.recompute == ("never", "never")
    with pytest.raises(TspipeError, match="recompute names 3 policies for 2 stages"):
        pipe.trainer(kd_loss, optimizer=sgd, recompute=("never",) * 3)


def test_a_saved_plan_rebuilds_with_its_settings(tmp_path: Any) -> None:
    limit = int(max(m.total for m in _compile().plan.memory) * 0.7)
    saved = _compile(memory_limit=limit, recompute="auto", precision="bf16", loss="micro").plan
    saved.save(tmp_path / "plan.json")
    torch.manual_seed(0)
    student, teacher = Convs(), Convs(2).eval()
    again = tspipe_fx.compile(student, teacher, 2, example_inputs=(torch.randn(8, 3, 32, 32),),
                              cost_model="roofline", plan=Plan.load(tmp_path / "plan.json")).plan  # fmt: skip
    assert (again.recompute, again.precision, again.loss) == (saved.recompute, "bf16", "micro")
    assert (again.micro_batches, again.batch_size) == (4, 32) and again.student.cuts == saved.student.cuts
    told = tspipe_fx.compile(student, teacher, 2, example_inputs=(torch.randn(8, 3, 32, 32),), cost_model="roofline",
                             plan=saved, precision="fp32", recompute="never").plan  # fmt: skip
    assert (told.precision, told.recompute) == ("fp32", ())
    with pytest.raises(TspipeError, match="plan must be a tspipe_fx Plan"):
        tspipe_fx.compile(student, teacher, 2, example_inputs=(torch.randn(8, 3, 32, 32),), plan="plan.json")
