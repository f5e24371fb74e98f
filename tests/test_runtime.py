"""The local runtime trains exactly what the reference trainer does, on every schedule."""

from __future__ import annotations

import copy
import time
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from toys import Net, Online, Target, byol_loss, kd_loss, sgd
from toys import run_batches as _run

import tspipe_fx
from tspipe_fx.runtime import RuntimeFailure
from tspipe_fx.runtime.reference import ReferenceTrainer

SCHEDULES = ["tspipe", "gpipe", "1f1b", "sequential"]


def _assert_same_params(
    trainer: Any,
    like: nn.Module,
    reference: nn.Module,
    which: str = "student",
    *,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
    trained = copy.deepcopy(like)
    trainer.sync_to_modules(**{which: trained})
    for (name, a), b in zip(trained.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_kd_equals_the_reference(n: int, schedule: str) -> None:
    torch.manual_seed(0)
    student, teacher = Net(), Net(32).eval()
    pipe = tspipe_fx.compile(
        copy.deepcopy(student),
        copy.deepcopy(teacher),
        n,
        example_inputs=(torch.randn(8, 8),),
        cost_model="uniform",
    )
    trainer = pipe.trainer(kd_loss, optimizer=sgd, schedule=schedule)
    ref = ReferenceTrainer(
        copy.deepcopy(student), copy.deepcopy(teacher), kd_loss, optimizer=sgd, micro_batches=trainer.m
    )
    # The last batch has another size, as at the end of an epoch (uneven micro-batches too).
    batches = [(torch.randn(b, 8),) for b in (8, 8, 8, 8, 8, 8, 8, 8, 8, 10)]
    targets = [torch.randint(0, 4, (x[0].shape[0],)) for x in batches]
    got = _run(trainer, [(x[0], {"target": y}) for x, y in zip(batches, targets, strict=True)])
    want = [ref.step(x[0], target=y) for x, y in zip(batches, targets, strict=True)]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    # 1f1b takes one loss per micro-batch and sums their gradients: the same sum in another
    # order, so after 10 momentum-SGD steps its weights agree to fp32 rounding, not bit for bit.
    tol = {"rtol": 1e-4, "atol": 1e-5} if schedule == "1f1b" else {}
    _assert_same_params(trainer, student, ref.student, **tol)


@pytest.mark.parametrize("staleness", [0, 1])
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_momentum_byol_equals_the_reference(schedule: str, n: int, staleness: int) -> None:
    torch.manual_seed(0)
    online = Online()
    target = Target(online)
    pipe = tspipe_fx.compile(copy.deepcopy(online), copy.deepcopy(target), n, example_inputs=(torch.randn(8, 8),),
                             mode="momentum", cost_model="uniform")  # fmt: skip
    trainer = pipe.trainer(
        byol_loss, optimizer=sgd, schedule=schedule, views=2, staleness=staleness, momentum=0.9
    )
    ref = ReferenceTrainer(copy.deepcopy(online), copy.deepcopy(target), byol_loss, optimizer=sgd, mode="momentum",
                           micro_batches=trainer.m, views=2, staleness=staleness, momentum=0.9,
                           micro_major=trainer.micro_major)  # fmt: skip
    batches = [(torch.randn(8, 8), torch.randn(8, 8)) for _ in range(10)]
    got = _run(trainer, batches)
    want = [ref.step(*b) for b in batches]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    tol = {"rtol": 1e-4, "atol": 1e-5} if schedule == "1f1b" else {}  # per-micro-batch losses: see above
    _assert_same_params(trainer, online, ref.student, **tol)
    _assert_same_params(trainer, target, ref.teacher, which="teacher", **tol)


def test_momentum_schedule_and_buffer_ema() -> None:
    """update_momentum() between steps, and EMA over buffers (an eval-mode target's BatchNorm
    statistics follow the student's)."""
    torch.manual_seed(0)
    online = Online()
    target = Target(online).eval()
    pipe = tspipe_fx.compile(copy.deepcopy(online), copy.deepcopy(target), 2, example_inputs=(torch.randn(8, 8),),
                             mode="momentum", cost_model="uniform")  # fmt: skip
    trainer = pipe.trainer(byol_loss, optimizer=sgd, views=2, momentum=0.9, ema_buffers=True)
    ref = ReferenceTrainer(copy.deepcopy(online), copy.deepcopy(target), byol_loss, optimizer=sgd, mode="momentum",
                           micro_batches=trainer.m, views=2, momentum=0.9, ema_buffers=True)  # fmt: skip
    got, want = [], []
    for i in range(8):
        m = 0.9 + 0.01 * i  # a rising momentum, as BYOL's cosine schedule
        batch = (torch.randn(8, 8), torch.randn(8, 8))
        ref.update_momentum(m)
        want.append(ref.step(*batch))
        r = trainer.step(*batch)
        if r is not None:
            got.append(r.loss)
        # The step that runs now is the previous batch's: give it the previous batch's momentum.
        trainer.update_momentum(m)
    got.append(trainer.finish().loss)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    _assert_same_params(trainer, target, ref.teacher, which="teacher")
    bn = "backbone.bn.running_mean"
    assert not torch.equal(ref.teacher.state_dict()[bn], target.state_dict()[bn])  # the buffers moved


def test_staleness_changes_the_result() -> None:
    """The one-step-late teacher is a different computation: the test above can tell them apart."""
    torch.manual_seed(0)
    online = Online()
    batches = [(torch.randn(8, 8), torch.randn(8, 8)) for _ in range(4)]
    results = []
    for staleness in (0, 1):
        ref = ReferenceTrainer(copy.deepcopy(online), Target(copy.deepcopy(online)), byol_loss, optimizer=sgd,
                               mode="momentum", micro_batches=2, views=2, staleness=staleness, momentum=0.5)  # fmt: skip
        results.append([ref.step(*b) for b in batches])
    # Batch 0 sees the initial teacher either way; from batch 1 on, staleness 1 sees one step less.
    assert results[0][0] == results[1][0] and all(
        a != b for a, b in zip(results[0][1:], results[1][1:], strict=True)
    )


def test_a_failing_task_surfaces_quickly_with_its_device_and_task() -> None:
    torch.manual_seed(0)
    pipe = tspipe_fx.compile(
        Net(), Net(32).eval(), 2, example_inputs=(torch.randn(8, 8),), cost_model="uniform"
    )

    def broken(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("injected fault")

    trainer = pipe.trainer(broken, optimizer=sgd, timeout_s=30)
    trainer.step(torch.randn(8, 8), target=torch.randint(0, 4, (8,)))
    start = time.monotonic()
    with pytest.raises(
        RuntimeFailure, match=r"device 1 failed at task loss0: RuntimeError: injected fault"
    ) as err:
        trainer.step(torch.randn(8, 8), target=torch.randint(0, 4, (8,)))
    assert time.monotonic() - start < 10
    assert isinstance(err.value.__cause__, RuntimeError)
    assert "batches 0 and 1 not trained; the trainer is back" in "".join(err.value.__notes__)
    assert trainer.step(torch.randn(8, 8), target=torch.randint(0, 4, (8,))) is None  # a new run


@pytest.mark.parametrize("schedule", ["tspipe", "1f1b"])
def test_a_failed_step_goes_back_to_the_last_optimizer_step_and_training_goes_on(schedule: str) -> None:
    """Issue 13.3: a NaN loss (or a loss that raises) lost all training since the last checkpoint
    and left finish() refusing. The trainer now drops the window's batches and equals eager
    training that skips them (their forward still moved BatchNorm's statistics, as eager's did);
    finish() brings the weights home. Under 1f1b the first micro-batch's backward has run: its
    gradients go."""
    torch.manual_seed(0)
    if schedule == "1f1b":  # its loss per micro-batch stops half-way through the batch's forwards
        student: nn.Module = nn.Sequential(
            nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
        )
    else:
        student = Net()
    teacher = Net(32).eval()
    mine = copy.deepcopy(student)
    pipe = tspipe_fx.compile(mine, copy.deepcopy(teacher), 2, example_inputs=(torch.randn(8, 8),), micro_batches=2,
                             cost_model="uniform")  # fmt: skip
    batches = [(torch.randn(8, 8), torch.randint(0, 3, (8,))) for _ in range(7)]
    batches[2][1][4:] = 3  # the poisoned batch: its second micro-batch's targets are 3

    def nan_loss(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return kd_loss(s, t, y) * (float("nan") if bool((y == 3).any()) else 1.0)

    trainer = pipe.trainer(nan_loss, optimizer=sgd, schedule=schedule)
    losses = []
    for i, (x, y) in enumerate(batches):
        if i == 3:  # the step that runs batch 2's window (it also holds batch 3)
            with pytest.raises(RuntimeFailure, match="the loss of batch 2 is nan") as err:
                trainer.step(x, target=y)
            assert "batches 2 and 3 not trained" in "".join(err.value.__notes__)
            continue
        out = trainer.step(x, target=y)
        if out is not None:
            losses.append(out.loss)
    losses.append(trainer.finish().loss)

    def raising_loss(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if bool((y == 3).any()):
            raise ValueError("poisoned")
        return kd_loss(s, t, y)

    ref = ReferenceTrainer(student, teacher, raising_loss, optimizer=sgd, micro_batches=2,
                           micro_major=trainer.micro_major)  # fmt: skip
    expected = []
    for i, (x, y) in enumerate(batches):
        if i == 2 and schedule == "1f1b":
            continue  # no BatchNorm: nothing of the failed batch remains
        if i == 2:
            with pytest.raises(ValueError):
                ref.step(x, target=y)
        elif i != 3:
            expected.append(ref.step(x, target=y))
    assert losses == pytest.approx(expected, rel=1e-5)
    trained = mine.state_dict()
    for name, value in ref.student.state_dict().items():
        torch.testing.assert_close(trained[name], value, msg=name)


def test_a_failing_stage_names_the_node() -> None:
    torch.manual_seed(0)
    pipe = tspipe_fx.compile(
        Net(), Net(32).eval(), 2, example_inputs=(torch.randn(8, 8),), cost_model="uniform"
    )
    trainer = pipe.trainer(kd_loss, optimizer=sgd)
    trainer.step(torch.randn(8, 8), target=torch.randint(0, 4, (8,)))
    with pytest.raises(
        RuntimeFailure,
        match=r"device 0 failed at task tf1\.0\.0 \(teacher stage 0, node a\): RuntimeError: mat1",
    ):
        trainer.step(torch.randn(8, 5), target=torch.randint(0, 4, (8,)))  # wrong feature size


@pytest.mark.parametrize(("schedule", "loss"), [("tspipe", "batch"), ("auto", "micro")])
def test_tied_weights_through_export_equal_the_reference(schedule: str, loss: str) -> None:
    """GPT-2's lm_head is tied to wte: its two copies sum their gradients and stay equal (also
    under a synthesized schedule with the backward split, losses per micro-batch)."""
    from zoo import BY_NAME

    torch.manual_seed(0)
    case = BY_NAME["hf_gpt2_lm"]
    student, teacher = case.build(), case.build().eval()
    kwargs = case.kwargs(4)
    pipe = tspipe_fx.compile(copy.deepcopy(student), copy.deepcopy(teacher), 2, example_inputs=(), example_kwargs=kwargs,
                             cost_model="uniform")  # fmt: skip
    assert pipe.plan.student.method == "export" and pipe.plan.student.tie_groups

    def lm_loss(s: Any, t: Any, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(s.logits.flatten(0, 1), y.flatten()) + F.mse_loss(s.logits, t.logits)

    trainer = pipe.trainer(lm_loss, optimizer=sgd, schedule=schedule, loss=loss)
    ref = ReferenceTrainer(
        copy.deepcopy(student),
        copy.deepcopy(teacher),
        lm_loss,
        optimizer=sgd,
        micro_batches=trainer.m,
        loss=loss,
    )
    batches = [case.kwargs(4) for _ in range(4)]
    ys = [torch.randint(0, 97, (4, 8)) for _ in batches]
    got = _run(trainer, [({**kw, "target": y},) for kw, y in zip(batches, ys, strict=True)])
    want = [ref.step(**kw, target=y) for kw, y in zip(batches, ys, strict=True)]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    tol = {"rtol": 1e-4, "atol": 1e-5} if loss != "batch" else {}  # per-micro-batch terms: fp32 rounding
    _assert_same_params(trainer, student, ref.student, **tol)
    tied = [d.student.get_parameter("lm_head.weight") for d in trainer.runtime.devices]
    assert tied[0] is not tied[1] and torch.equal(tied[0], tied[1])  # two copies, kept equal


def test_optimizer_instance_param_groups_scheduler_and_clipping() -> None:
    torch.manual_seed(0)
    student, teacher = Net(), Net(32).eval()

    def make(model: nn.Module) -> torch.optim.Optimizer:
        head = [p for n, p in model.named_parameters() if n.startswith("head")]
        rest = [p for n, p in model.named_parameters() if not n.startswith("head")]
        return torch.optim.AdamW(
            [{"params": rest, "lr": 1e-2}, {"params": head, "lr": 1e-3, "weight_decay": 0.5}]
        )

    def schedule(opt: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    user_student = copy.deepcopy(student)
    # tspipe: its gradients sum in the reference's order. Net's first Linear feeds a BatchNorm, so
    # its bias has an exactly zero gradient; AdamW turns the rounding left there into lr-sized
    # steps, and a split backward (auto) rounds in another order (the losses still agree).
    pipe = tspipe_fx.compile(user_student, copy.deepcopy(teacher), 3, example_inputs=(torch.randn(6, 8),),
                             cost_model="uniform", schedule="tspipe")  # fmt: skip
    trainer = pipe.trainer(kd_loss, optimizer=make(user_student), lr_scheduler=schedule, clip_grad_norm=0.5)
    ref_student = copy.deepcopy(student)
    ref = ReferenceTrainer(ref_student, copy.deepcopy(teacher), kd_loss, optimizer=make(ref_student), lr_scheduler=schedule,
                           clip_grad_norm=0.5, micro_batches=trainer.m)  # fmt: skip
    data = [(torch.randn(6, 8), torch.randint(0, 4, (6,))) for _ in range(6)]
    got = _run(trainer, [(x, {"target": y}) for x, y in data])
    want = [ref.step(x, target=y) for x, y in data]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    # Weights came home by themselves at finish(): the user's own module holds them.
    for (name, a), b in zip(
        user_student.state_dict().items(), ref.student.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_resume_from_a_state_dict_continues_the_same_run() -> None:
    torch.manual_seed(0)
    student, teacher = Net(), Net(32).eval()
    data = [(torch.randn(8, 8), torch.randint(0, 4, (8,))) for _ in range(6)]

    def trainer() -> Any:
        pipe = tspipe_fx.compile(
            copy.deepcopy(student),
            copy.deepcopy(teacher),
            2,
            example_inputs=(torch.randn(8, 8),),
            cost_model="uniform",
        )
        return pipe.trainer(kd_loss, optimizer=sgd)

    straight = trainer()
    all_losses = _run(straight, [(x, {"target": y}) for x, y in data])
    first = trainer()
    head = _run(first, [(x, {"target": y}) for x, y in data[:3]])
    state = first.state_dict()
    second = trainer()
    second.load_state_dict(state)
    tail = [r.loss for r in (second.step(x, target=y) for x, y in data[3:]) if r is not None] + [
        second.finish().loss
    ]
    assert head + tail == pytest.approx(all_losses, rel=1e-6, abs=1e-7)


class TwoOutputs(nn.Module):
    """Logits and hidden states, like DistilBERT's distillation (the cosine term uses the states)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.body = Net(width, width)
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.body(x)
        return {"logits": self.head(hidden), "hidden": hidden}


def test_a_loss_over_several_outputs_trains_through_each() -> None:
    torch.manual_seed(0)
    student, teacher = TwoOutputs(), TwoOutputs().eval()

    def loss(s: dict[str, torch.Tensor], t: dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        cosine = 1 - F.cosine_similarity(s["hidden"], t["hidden"], dim=-1).mean()
        return F.cross_entropy(s["logits"], y) + cosine

    pipe = tspipe_fx.compile(
        copy.deepcopy(student),
        copy.deepcopy(teacher),
        3,
        example_inputs=(torch.randn(6, 8),),
        cost_model="uniform",
    )
    # tspipe: auto splits the backward here and adds the micro-batches' weight gradients in its own
    # order; the first layer feeds a BatchNorm over micro-batches of two, whose weight gradients are
    # mostly rounding residue, and momentum SGD carried that apart by 3e-6 on this AMD CPU (README,
    # Limitations). What this test is about, the gradient through both outputs, is exact either way.
    trainer = pipe.trainer(loss, optimizer=sgd, schedule="tspipe")
    ref = ReferenceTrainer(
        copy.deepcopy(student), copy.deepcopy(teacher), loss, optimizer=sgd, micro_batches=trainer.m
    )
    data = [(torch.randn(6, 8), torch.randint(0, 4, (6,))) for _ in range(5)]
    got = _run(trainer, [(x, {"target": y}) for x, y in data])
    assert got == pytest.approx([ref.step(x, target=y) for x, y in data], rel=1e-5, abs=1e-6)
    _assert_same_params(trainer, student, ref.student)


def test_a_window_failed_after_a_stage_stepped_is_not_undone() -> None:
    """A stage that stepped cannot be taken back: the trainer says so and stays stopped."""
    torch.manual_seed(0)
    pipe = tspipe_fx.compile(
        Net(), Net(32).eval(), 2, example_inputs=(torch.randn(8, 8),), cost_model="uniform"
    )
    trainer = pipe.trainer(kd_loss, optimizer=sgd)
    runtime = trainer.runtime
    runtime.broken, runtime.stepped = RuntimeFailure("device 0 failed"), {1}
    assert not runtime.recover()
    assert "no longer at one step: load a checkpoint" in trainer._recover([4, 5])
    with pytest.raises(RuntimeFailure, match="failed earlier"):
        trainer.step(torch.randn(8, 8), target=torch.randint(0, 4, (8,)))
        trainer.step(torch.randn(8, 8), target=torch.randint(0, 4, (8,)))


class WritesItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)  # in place, on the caller's tensor
        h = torch.relu(self.a(x))
        return self.head(self.b(h) + h)


def test_a_model_that_writes_its_input_trains_as_eager_does() -> None:
    """Issue 13.4: micro-batches are views of one batch tensor, so a model writing its input bumped
    the version every micro-batch's saved input shares, and the backward failed. Each model now
    gets its own copy of an input it writes; the user's batch stays as it was."""
    torch.manual_seed(0)
    student, teacher = WritesItsInput(), WritesItsInput().eval()
    pipe = tspipe_fx.compile(copy.deepcopy(student), copy.deepcopy(teacher), 2, example_inputs=(torch.randn(8, 8),),
                             micro_batches=2, balance=([3, 3], [3, 3]), cost_model="uniform")  # fmt: skip
    assert "x" in pipe.student_io[0].written_inputs
    trainer = pipe.trainer(kd_loss, optimizer=sgd)
    ref = ReferenceTrainer(student, teacher, kd_loss, optimizer=sgd, micro_batches=2)
    batches = [(torch.randn(8, 8), torch.randint(0, 4, (8,))) for _ in range(3)]
    kept = [x.clone() for x, _ in batches]
    got = _run(trainer, [(x, {"target": y}) for x, y in batches])
    assert got == pytest.approx([ref.step(x, target=y) for x, y in batches], rel=1e-6)
    for (x, _), before in zip(batches, kept, strict=True):
        torch.testing.assert_close(x, before)
