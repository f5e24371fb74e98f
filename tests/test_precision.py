"""Mixed precision: autocast per stage task, the compute dtype across stage boundaries, fp32
parameters, and one fp16 loss-scale decision for the whole pipeline (torch's GradScaler in the
reference trainer)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from toys import Net, Online, Target, byol_loss, kd_loss, sgd
from toys import run_batches as _run

import tspipe_fx
from tspipe_fx.errors import TspipeError
from tspipe_fx.runtime.dist.shapes import Spec, boundary_specs
from tspipe_fx.runtime.precision import LossScale, Precision
from tspipe_fx.runtime.reference import ReferenceTrainer

BF16 = {"rel": 2e-2, "abs": 2e-2}  # a few bf16 roundings (8 bits of mantissa) apart
FP16 = {"rel": 2e-3, "abs": 2e-3}


def _kd(n: int, data: list[tuple[torch.Tensor, torch.Tensor]], schedule: str = "tspipe",
        **options: Any) -> tuple[list[float], list[float], Any, ReferenceTrainer]:  # fmt: skip
    student, teacher = _models()
    pipe = tspipe_fx.compile(copy.deepcopy(student), copy.deepcopy(teacher), n, example_inputs=(data[0][0],),
                             cost_model="uniform")  # fmt: skip
    trainer = pipe.trainer(kd_loss, optimizer=sgd, schedule=schedule, **options)
    ref = ReferenceTrainer(copy.deepcopy(student), copy.deepcopy(teacher), kd_loss, optimizer=sgd,
                           micro_batches=trainer.m, micro_major=trainer.micro_major, loss=trainer.loss,
                           **options)  # fmt: skip
    got = _run(trainer, [(x, {"target": y}) for x, y in data])
    want = [ref.step(x, target=y) for x, y in data]
    return got, want, trainer, ref


def _models() -> tuple[Net, Net]:
    torch.manual_seed(0)
    student, teacher = Net(), Net(32).eval()
    with torch.no_grad():  # the input feature an overflowing batch makes huge starts unused
        student.a.weight[:, 7] = 0
    return student, teacher


def _data(steps: int = 5, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(steps)]


def _params(trainer: Any) -> dict[str, torch.Tensor]:
    trained = Net()
    trainer.sync_to_modules(student=trained)
    return dict(trained.state_dict())


@pytest.mark.parametrize(("n", "schedule"), [(2, "tspipe"), (3, "tspipe"), (3, "1f1b")])
def test_bf16_equals_the_reference_within_bf16_rounding(n: int, schedule: str) -> None:
    got, want, trainer, ref = _kd(n, _data(), schedule, precision="bf16")
    assert got == pytest.approx(want, **BF16)
    fp32, _, _, _ = _kd(n, _data(), schedule)
    assert got != pytest.approx(fp32, rel=1e-6)  # it did run in bf16
    for name, value in _params(trainer).items():
        assert value.dtype == ref.student.state_dict()[name].dtype, name  # the weights stay fp32
        torch.testing.assert_close(value, ref.student.state_dict()[name], rtol=BF16["rel"], atol=BF16["abs"])
    for d in trainer.runtime.devices:  # ... and so does the optimizer state
        for state in d.optimizer.state.values():
            assert state["momentum_buffer"].dtype == torch.float32


def test_stage_outputs_cross_in_the_compute_dtype() -> None:
    pipe = tspipe_fx.compile(Net(), Net(32).eval(), 3, example_inputs=(torch.randn(8, 8),), cost_model="uniform")
    stages = pipe.staged("student").stages
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        specs = boundary_specs(stages, [torch.randn(8, 8)], grad=True, precision=Precision(name))
        crossing = [s for st in specs[:-1] for s in st.values() if isinstance(s, Spec)]
        assert crossing and all(s.dtype == dtype for s in crossing), name


def test_a_bf16_teacher_beside_an_fp32_student() -> None:
    got, want, trainer, _ = _kd(2, _data(), teacher_precision="bf16")
    assert trainer.runtime.precision.name == "fp32"
    assert got == pytest.approx(want, **BF16)


def test_momentum_bf16_equals_the_reference() -> None:
    torch.manual_seed(0)
    online = Online()
    target = Target(online)
    pipe = tspipe_fx.compile(copy.deepcopy(online), copy.deepcopy(target), 2, example_inputs=(torch.randn(8, 8),),
                             mode="momentum", cost_model="uniform")  # fmt: skip
    trainer = pipe.trainer(byol_loss, optimizer=sgd, views=2, momentum=0.9, precision="bf16")
    ref = ReferenceTrainer(copy.deepcopy(online), copy.deepcopy(target), byol_loss, optimizer=sgd, mode="momentum",
                           micro_batches=trainer.m, views=2, momentum=0.9, precision="bf16")  # fmt: skip
    batches = [(torch.randn(8, 8), torch.randn(8, 8)) for _ in range(4)]
    assert _run(trainer, batches) == pytest.approx([ref.step(*b) for b in batches], **BF16)
    ema = Target(Online())
    trainer.sync_to_modules(teacher=ema)
    for name, value in ema.state_dict().items():
        assert value.dtype == ref.teacher.state_dict()[name].dtype  # the EMA stays fp32
        torch.testing.assert_close(value, ref.teacher.state_dict()[name], rtol=BF16["rel"], atol=BF16["abs"])


def test_fp16_scales_the_loss_as_grad_scaler_does() -> None:
    got, want, trainer, ref = _kd(3, _data(), precision="fp16")
    assert got == pytest.approx(want, **FP16)
    assert trainer.runtime.loss_scale.scale == ref.scaler.get_scale()


def _overflowing_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """One input feature so large that the first layer's fp16 weight gradient overflows (its
    weights start at 0, so the forward is unchanged), and nothing else does."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 8, generator=g)
    x[:, 7] = 1000 * torch.randn(8, generator=g)
    return x, torch.randint(0, 4, (8,), generator=g)


def test_the_overflow_is_on_the_first_stage_only() -> None:
    """The premise of the next test, checked with plain PyTorch."""
    student, teacher = _models()
    x, y = _overflowing_batch()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = kd_loss(student(x), teacher(x), y)
    (loss.float() * 2.0**16).backward()
    bad = sorted(n for n, p in student.named_parameters() if not torch.isfinite(p.grad).all())
    assert torch.isfinite(loss) and bad == ["a.weight"]


def test_an_inf_on_one_stage_skips_the_step_on_every_stage() -> None:
    data = _data(4)
    data.insert(2, _overflowing_batch())
    got, want, trainer, ref = _kd(3, data, precision="fp16")
    assert got == pytest.approx(want, **FP16)
    assert trainer.runtime.loss_scale.scale == ref.scaler.get_scale()
    for name, value in _params(trainer).items():
        torch.testing.assert_close(value, ref.student.state_dict()[name], rtol=FP16["rel"], atol=FP16["abs"])
    # The overflowing batch halved the scale and changed no weight on any stage (its forward moved
    # the BatchNorm statistics, as in eager PyTorch): the run without it has the same weights.
    _, _, without, _ = _kd(3, data[:2] + data[3:], precision="fp16")
    assert without.runtime.loss_scale.scale == 2 * trainer.runtime.loss_scale.scale
    weights = {n for n, _ in Net().named_parameters()}
    for name, value in _params(without).items():
        if name in weights:
            torch.testing.assert_close(_params(trainer)[name], value, rtol=0, atol=0, msg=name)


def test_fp16_with_clipping_equals_the_reference() -> None:
    data = _data(4)
    data.insert(1, _overflowing_batch())
    got, want, trainer, ref = _kd(2, data, precision="fp16", clip_grad_norm=0.5)
    assert got == pytest.approx(want, **FP16)
    assert trainer.runtime.loss_scale.scale == ref.scaler.get_scale()


def test_the_loss_scale_grows_after_clean_steps_and_backs_off_on_inf() -> None:
    scale = LossScale(init=8.0, interval=2)
    seen = []
    for found in (False, False, True, False, True, False, False, False):
        scale.update(found)
        seen.append(scale.scale)
    assert seen == [8.0, 16.0, 8.0, 8.0, 4.0, 4.0, 8.0, 8.0]


def test_a_checkpoint_keeps_the_loss_scale() -> None:
    data = _data(6)
    data.insert(1, _overflowing_batch())
    _, _, first, _ = _kd(2, data[:4], precision="fp16")
    state = first.state_dict()
    assert state["loss_scale"] == first.runtime.loss_scale.state_dict()
    assert state["loss_scale"]["scale"] < 2.0**16
    _, _, second, _ = _kd(2, data[:1], precision="fp16")
    second.load_state_dict(state)
    assert second.runtime.loss_scale.state_dict() == state["loss_scale"]


def test_a_bad_precision_is_named_with_the_choices() -> None:
    with pytest.raises(TspipeError, match=r"precision must be one of \['bf16', 'fp16', 'fp32'\], got 'half'"):
        ReferenceTrainer(Net(), Net(), kd_loss, optimizer=sgd, precision="half")
    with pytest.raises(TspipeError, match="got 'float8'"):
        ReferenceTrainer(Net(), Net(), kd_loss, optimizer=sgd, teacher_precision="float8")


def _planned(precision: str) -> Any:
    return tspipe_fx.compile(Net(), Net(32).eval(), 2, example_inputs=(torch.randn(64, 8),), cost_model="roofline",
                             device_specs=["h100", "h100"], balance=([4, 5], [4, 5]),
                             precision=precision)  # fmt: skip


def test_the_plan_prices_the_compute_dtype() -> None:
    fp32, bf16 = _planned("fp32").plan, _planned("bf16").plan
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    for a, b in zip(fp32.student.stages, bf16.student.stages, strict=True):
        assert b.cut_out_bytes == a.cut_out_bytes // 2  # half the bytes cross
        assert b.activation_bytes == pytest.approx(a.activation_bytes / 2, abs=1)
        assert b.param_bytes == a.param_bytes  # the weights stay fp32
        assert b.fwd_ms <= a.fwd_ms  # the H100's bf16 peak
    assert sum(bf16.memory_bytes) < sum(fp32.memory_bytes)
    assert type(bf16).from_json(bf16.to_json()) == bf16


def test_the_trainer_runs_the_plans_precision_unless_told() -> None:
    pipe = _planned("bf16")
    assert pipe.trainer(kd_loss, optimizer=sgd).runtime.precision.name == "bf16"
    trainer = pipe.trainer(kd_loss, optimizer=sgd, precision="fp32")
    assert trainer.runtime.precision.name == "fp32" and trainer.plan.precision == "fp32"


def test_a_bad_precision_in_compile_is_named() -> None:
    with pytest.raises(TspipeError, match=r"precision must be one of \['fp32', 'bf16', 'fp16'\], got 'int8'"):
        _planned("int8")


def test_the_callers_autocast_does_not_leak_into_an_fp32_run() -> None:
    """Autocast is the trainer's to set: a step inside the user's own autocast region still runs
    in the precision asked for (the dist runtime runs tasks in the caller's thread)."""
    data = _data(3)
    _, want, _, _ = _kd(2, data)
    student, teacher = _models()
    ref = ReferenceTrainer(student, teacher, kd_loss, optimizer=sgd, micro_batches=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = [ref.step(x, target=y) for x, y in data]
        piped, _, _, _ = _kd(2, data)
    assert got == want
    assert piped == pytest.approx(want, rel=1e-6, abs=1e-7)
