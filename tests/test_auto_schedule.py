"""Synthesized schedules (``auto``) and per-micro-batch losses train what the reference trainer
does, loss by loss and parameter by parameter."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_runtime import _assert_same_params
from toys import Net, Online, Target, byol_loss, kd_loss, sgd
from toys import run_batches as _run

import tspipe_fx
from tspipe_fx.compiler.micro_batches import candidates
from tspipe_fx.errors import TspipeError
from tspipe_fx.runtime import load_checkpoint, save_checkpoint
from tspipe_fx.runtime.reference import ReferenceTrainer

# Per-micro-batch terms add up to the whole-batch loss in another order: fp32 rounding, not bits.
TOL = {"rtol": 1e-4, "atol": 1e-5}


def info_nce(
    q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, *, rows: slice
) -> torch.Tensor:
    """MoCo v3's symmetric InfoNCE of a micro-batch of queries against every key of the batch:
    query i's positive is key ``rows.start + i``."""
    labels = torch.arange(rows.start, rows.stop)

    def ctr(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        logits = F.normalize(q, dim=-1) @ F.normalize(k.detach(), dim=-1).T / 0.2
        return F.cross_entropy(logits, labels)

    return ctr(q1, k2) + ctr(q2, k1)


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("loss", ["batch", "micro"])
def test_kd_auto_equals_the_reference(n: int, loss: str) -> None:
    torch.manual_seed(0)
    student, teacher = Net(), Net(32).train()  # a teacher in train mode: its BatchNorm sees the order too
    pipe = tspipe_fx.compile(copy.deepcopy(student), copy.deepcopy(teacher), n, example_inputs=(torch.randn(8, 8),),
                             cost_model="uniform", schedule="auto", loss=loss)  # fmt: skip
    assert (pipe.plan.schedule, pipe.plan.loss) == ("auto", loss)
    trainer = pipe.trainer(kd_loss, optimizer=sgd)
    assert trainer.schedules[3].split_backward  # on these costs: weight gradients deferred into the gaps
    ref = ReferenceTrainer(copy.deepcopy(student), copy.deepcopy(teacher), kd_loss, optimizer=sgd,
                           micro_batches=trainer.m, loss=loss, micro_major=trainer.micro_major)  # fmt: skip
    batches = [torch.randn(b, 8) for b in (8,) * 7 + (10,)]
    targets = [torch.randint(0, 4, (x.shape[0],)) for x in batches]
    got = _run(trainer, [(x, {"target": y}) for x, y in zip(batches, targets, strict=True)])
    want = [ref.step(x, target=y) for x, y in zip(batches, targets, strict=True)]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    _assert_same_params(trainer, student, ref.student, **TOL)
    _assert_same_params(trainer, teacher, ref.teacher, which="teacher", **TOL)


@pytest.mark.parametrize("staleness", [0, 1])
@pytest.mark.parametrize(("n", "loss"), [(2, "micro"), (3, "micro_full_teacher"), (4, "micro")])
def test_momentum_auto_equals_the_reference(n: int, loss: str, staleness: int) -> None:
    torch.manual_seed(0)
    online = Online()
    target = Target(online)
    loss_fn = info_nce if loss == "micro_full_teacher" else byol_loss
    pipe = tspipe_fx.compile(copy.deepcopy(online), copy.deepcopy(target), n, example_inputs=(torch.randn(8, 8),),
                             mode="momentum", cost_model="uniform", schedule="auto", loss=loss)  # fmt: skip
    trainer = pipe.trainer(loss_fn, optimizer=sgd, staleness=staleness, momentum=0.9)
    assert trainer.micro_major
    ref = ReferenceTrainer(copy.deepcopy(online), copy.deepcopy(target), loss_fn, optimizer=sgd, mode="momentum",
                           micro_batches=trainer.m, views=2, staleness=staleness, momentum=0.9, loss=loss,
                           micro_major=True)  # fmt: skip
    batches = [(torch.randn(8, 8), torch.randn(8, 8)) for _ in range(8)]
    got = _run(trainer, batches)
    want = [ref.step(*b) for b in batches]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    _assert_same_params(trainer, online, ref.student, **TOL)
    _assert_same_params(trainer, target, ref.teacher, which="teacher", **TOL)


def test_per_micro_batch_terms_add_up_to_the_batch_loss() -> None:
    """For a mean over samples the weighted micro-batch terms are the whole-batch loss; the
    reference trainer's first loss is the same either way (same weights, nothing stepped yet)."""
    torch.manual_seed(0)
    student, teacher = Net(), Net(32).eval()
    x, y = torch.randn(10, 8), torch.randint(0, 4, (10,))
    first = {
        loss: ReferenceTrainer(
            copy.deepcopy(student), copy.deepcopy(teacher), kd_loss, optimizer=sgd, micro_batches=3, loss=loss
        ).step(x, target=y)
        for loss in ("batch", "micro")
    }
    assert first["micro"] == pytest.approx(first["batch"], rel=1e-6)


def test_a_checkpoint_mid_run_resumes_an_auto_schedule(tmp_path) -> None:
    torch.manual_seed(0)
    student, teacher = Net(), Net(32).eval()

    def trainer():
        pipe = tspipe_fx.compile(copy.deepcopy(student), copy.deepcopy(teacher), 3, example_inputs=(torch.randn(8, 8),),
                                 cost_model="uniform", schedule="auto", loss="micro")  # fmt: skip
        return pipe.trainer(kd_loss, optimizer=sgd)

    batches = [(torch.randn(8, 8), {"target": torch.randint(0, 4, (8,))}) for _ in range(6)]
    want = _run(trainer(), batches)
    first = trainer()
    got = _run(first, batches[:3])  # (run_batches finishes: the third batch's loss is in)
    save_checkpoint(first, tmp_path / "ckpt")
    second = trainer()
    load_checkpoint(second, tmp_path / "ckpt")
    got += _run(second, batches[3:])
    assert got == want  # bit-identical on CPU


def test_a_bad_loss_granularity_is_refused() -> None:
    student, teacher = Net(), Net(32).eval()
    with pytest.raises(TspipeError, match=r"loss must be one of .*'micro' for a mean over samples"):
        tspipe_fx.compile(student, teacher, 2, example_inputs=(torch.randn(8, 8),), cost_model="uniform",
                          loss="per-sample")  # fmt: skip
    with pytest.raises(TspipeError, match="teacher_parts=2 needs schedule='auto'"):
        tspipe_fx.compile(student, teacher, 2, example_inputs=(torch.randn(8, 8),), cost_model="uniform",
                          schedule="tspipe", teacher_parts=2)  # fmt: skip
    pipe = tspipe_fx.compile(student, teacher, 2, example_inputs=(torch.randn(8, 8),), cost_model="uniform")
    with pytest.raises(TspipeError, match="loss must be 'batch', 'micro'"):
        pipe.trainer(kd_loss, optimizer=sgd, loss="sample")


def test_compile_chooses_the_micro_batches_with_the_schedule() -> None:
    """schedule="auto" without micro_batches: M = N, 2N or 4N, the one whose synthesized schedule
    simulates fastest on its own partition and costs (more micro-batches are not free: the
    roofline's launch term grows with them)."""
    torch.manual_seed(0)
    student, teacher = Net(), Net(32).eval()
    x = torch.randn(16, 8)
    common = dict(example_inputs=(x,), cost_model="roofline", device_specs=["h100"] * 2, loss="micro")
    chosen = tspipe_fx.compile(copy.deepcopy(student), copy.deepcopy(teacher), 2, schedule="auto", **common)
    assert chosen.plan.micro_batches in (2, 4, 8)
    # the candidates give every micro-batch two samples or more (BatchNorm1d, kernel efficiency)
    assert (candidates(2, 16), candidates(2, 8), candidates(3, 6), candidates(4, 3)) == ([2, 4, 8], [2, 4], [3], [3])
    for m in (2, 4, 8):
        fixed = tspipe_fx.compile(copy.deepcopy(student), copy.deepcopy(teacher), 2, schedule="auto",
                                  micro_batches=m, **common)  # fmt: skip
        assert chosen.plan.period_ms <= fixed.plan.period_ms * (1 + 1e-9)
    assert chosen.trainer(kd_loss, optimizer=sgd).m == chosen.plan.micro_batches


@pytest.mark.parametrize(
    ("mode", "loss"), [("kd", "micro"), ("kd", "batch"), ("momentum", "micro_full_teacher")]
)
def test_finer_teacher_micro_batches_equal_the_reference(mode: str, loss: str) -> None:
    """teacher_parts=2: the teacher runs each student micro-batch as two (its BatchNorm, in train
    mode, sees those); the loss still sees every micro-batch's teacher outputs joined."""
    torch.manual_seed(0)
    if mode == "kd":
        student, teacher, loss_fn, views = Net(), Net(32).train(), kd_loss, 1
    else:
        student = Online()
        teacher, loss_fn, views = Target(student), info_nce, 2
    pipe = tspipe_fx.compile(copy.deepcopy(student), copy.deepcopy(teacher), 3, example_inputs=(torch.randn(12, 8),),
                             mode=mode, cost_model="uniform", schedule="auto", loss=loss)  # fmt: skip
    trainer = pipe.trainer(loss_fn, optimizer=sgd, teacher_parts=2, momentum=0.9)
    assert trainer.schedules[3].teacher_parts == 2
    ref = ReferenceTrainer(copy.deepcopy(student), copy.deepcopy(teacher), loss_fn, optimizer=sgd, mode=mode,
                           micro_batches=trainer.m, views=views, loss=loss, teacher_parts=2, momentum=0.9,
                           micro_major=trainer.micro_major)  # fmt: skip
    if mode == "kd":
        batches = [(torch.randn(12, 8), {"target": torch.randint(0, 4, (12,))}) for _ in range(5)]
        want = [ref.step(x, **kw) for x, kw in batches]
    else:
        batches = [(torch.randn(12, 8), torch.randn(12, 8)) for _ in range(5)]
        want = [ref.step(*b) for b in batches]
    got = _run(trainer, batches)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    _assert_same_params(trainer, student, ref.student, **TOL)
    _assert_same_params(trainer, teacher, ref.teacher, which="teacher", **TOL)
    if mode == "kd":  # 12 samples in 3 micro-batches of 4: not into 8 teacher micro-batches each
        with pytest.raises(TspipeError, match="micro-batch of 4 samples cannot be cut into teacher_parts=8"):
            pipe.trainer(loss_fn, optimizer=sgd, teacher_parts=8).step(batches[0][0], **batches[0][1])
