"""The trainer: options shared with the reference trainer, defaults from the plan, windows cut
from short schedules."""

from __future__ import annotations

import pytest
import torch
from toys import Net, Online, Target, kd_loss, sgd

import tspipe_fx
from tspipe_fx import TspipeError
from tspipe_fx.runtime import ReferenceTrainer, TrainOptions


@pytest.fixture(scope="module")
def kd() -> tspipe_fx.Pipeline:
    torch.manual_seed(0)
    return tspipe_fx.compile(Net(), Net(32).eval(), 2, example_inputs=(torch.randn(8, 8),), micro_batches=4,
                             cost_model="uniform")  # fmt: skip


def test_defaults_come_from_the_plan_and_options_override_them(kd: tspipe_fx.Pipeline) -> None:
    trainer = kd.trainer(kd_loss, optimizer=sgd)
    assert (trainer.plan.schedule, trainer.m, trainer.views) == ("auto", 4, 1)  # compile's default schedule
    assert trainer.schedules[3] == trainer.plan.build_schedule(3)
    other = kd.trainer(kd_loss, optimizer=sgd, schedule="1f1b", micro_batches=2)
    assert (other.plan.schedule, other.m, other.loss) == ("1f1b", 2, "micro")  # 1f1b: a loss per micro-batch
    assert kd.trainer(kd_loss, optimizer=sgd, schedule="sequential").m == 1  # no micro-batching
    online = Online()
    momentum = tspipe_fx.compile(online, Target(online), 2, example_inputs=(torch.randn(8, 8),), mode="momentum",
                                 cost_model="uniform")  # fmt: skip
    assert momentum.trainer(kd_loss, optimizer=sgd).views == 2  # the plan's two views


def test_unknown_options_are_named(kd: tspipe_fx.Pipeline) -> None:
    with pytest.raises(TspipeError, match=r"trainer\(\) got unknown options \['lr'\]; known: \[.*'momentum'"):
        kd.trainer(kd_loss, optimizer=sgd, lr=0.1)
    with pytest.raises(TspipeError, match=r"ReferenceTrainer got unknown options \['runtime'\]"):
        ReferenceTrainer(Net(), Net(), kd_loss, optimizer=sgd, runtime="local")
    with pytest.raises(TspipeError, match="runtime must be 'local'"):
        kd.trainer(kd_loss, optimizer=sgd, runtime="gpu")
    assert TrainOptions.of(sgd, {"momentum": 0.5}, where="x") == TrainOptions(optimizer=sgd, momentum=0.5)


def test_windows_are_cut_from_short_schedules_and_renumbered(kd: tspipe_fx.Pipeline) -> None:
    """Window b runs each device's tasks from after its step b-1 through its step b; the first
    window of a run also holds the prologue (the teacher forward of its own batch)."""
    trainer = kd.trainer(kd_loss, optimizer=sgd)
    first = trainer.window(0, last=False)
    middle = trainer.window(5, last=False)
    for tasks in (first, middle):
        assert all(t[-1].kind == "opt" for t in tasks)
    assert {t.batch for t in first[0] if t.kind == "sf"} == {0}
    assert {t.batch for t in first[0] if t.kind == "tf"} == {0, 1}  # the prologue and the next batch's
    assert {t.batch for t in middle[0] if t.kind == "sf"} == {5}
    assert {t.batch for t in middle[0] if t.kind == "tf"} == {6}
    assert not [t for t in trainer.window(5, last=True)[0] if t.kind == "tf"]  # nothing after the last


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("momentum", 1.5, r"momentum must be a number from 0 to 1 .*got 1.5"),
        ("micro_batches", 0, r"micro_batches must be an integer >= 1, got 0"),
        ("views", 3, r"views must be 1 or 2, got 3"),
        ("staleness", 2, r"staleness must be 0 \(synchronous\) or 1 \(TSPipe\), got 2"),
        ("clip_grad_norm", -1.0, r"clip_grad_norm must be a number > 0, or None, got -1.0"),
        ("lr_scheduler", "cosine", r"lr_scheduler must be a factory optimizer -> scheduler, got 'cosine'"),
    ],
)
def test_every_option_is_checked(kd: tspipe_fx.Pipeline, option: str, value: object, message: str) -> None:
    """Issue 13.8: momentum=1.5 was accepted."""
    with pytest.raises(TspipeError, match=message):
        kd.trainer(kd_loss, optimizer=sgd, **{option: value})
    with pytest.raises(TspipeError, match=message):
        ReferenceTrainer(Net(), Net(), kd_loss, optimizer=sgd, **{option: value})


def test_momentum_is_checked_between_steps(kd: tspipe_fx.Pipeline) -> None:
    trainer = kd.trainer(kd_loss, optimizer=sgd)
    with pytest.raises(TspipeError, match="momentum must be a number from 0 to 1"):
        trainer.update_momentum(-0.1)
    with pytest.raises(TspipeError, match=r"optimizer must be a torch\.optim\.Optimizer or a factory"):
        kd.trainer(kd_loss, optimizer="sgd")


def test_two_trainers_do_not_train_into_one_module_at_once(kd: tspipe_fx.Pipeline) -> None:
    """Issue 13.2: two trainers of one pipeline silently overwrote each other's weights in the
    user's module. The second is refused while the first has batches in flight."""
    x, y = torch.randn(8, 8), torch.randint(0, 4, (8,))
    first, second = kd.trainer(kd_loss, optimizer=sgd), kd.trainer(kd_loss, optimizer=sgd)
    first.step(x, target=y)
    with pytest.raises(TspipeError, match=r"another trainer of these models \(Net\) has batches in flight.*finish\(\)"):
        second.step(x, target=y)
    assert second.pending is None and second.next_index == 0  # nothing of the batch was kept
    first.finish()
    assert second.step(x, target=y) is None  # the modules are free again
    second.finish()
