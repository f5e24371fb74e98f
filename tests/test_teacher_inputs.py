"""Teachers that take their own inputs (another resolution, another tokenizer), and examples a
model cannot take, named in one line (issue 13.11)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from toys import Net, kd_loss, sgd

import tspipe_fx
from tspipe_fx import TspipeError
from tspipe_fx.runtime import ReferenceTrainer


class ImageTeacher(nn.Module):
    """Sees each sample as a 3x6x6 image and a token sequence of its own length."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.embed = nn.Embedding(50, 8)
        self.head = nn.Linear(16, 4)

    def forward(self, image: torch.Tensor, *, ids: torch.Tensor) -> torch.Tensor:
        pooled = torch.relu(self.conv(image)).mean((2, 3))
        return self.head(torch.cat([pooled, self.embed(ids).mean(1)], -1))


def batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.randn(n, 8), torch.randn(n, 3, 6, 6), torch.randint(0, 50, (n, 5)), torch.randint(0, 4, (n,))


@pytest.mark.parametrize("schedule", ["tspipe", "1f1b"])
def test_a_teacher_with_its_own_inputs_trains_like_the_reference(schedule: str) -> None:
    torch.manual_seed(0)
    student, teacher = Net(), ImageTeacher().eval()
    x, image, ids, _ = batch()
    pipe = tspipe_fx.compile(copy.deepcopy(student), copy.deepcopy(teacher), 2, example_inputs=(x,),
                             teacher_example_inputs=(image,), teacher_example_kwargs={"ids": ids},
                             micro_batches=2, cost_model="uniform")  # fmt: skip
    assert pipe.teacher.input_names == ("image", "ids") and pipe.student.input_names == ("x",)
    trainer = pipe.trainer(kd_loss, optimizer=sgd, schedule=schedule)
    ref = ReferenceTrainer(student, teacher, kd_loss, optimizer=sgd, micro_batches=2, micro_major=trainer.micro_major)
    got, expected = [], []
    for _ in range(4):
        x, image, ids, y = batch()
        out = trainer.step(x, target=y, teacher_inputs=image, teacher_kwargs={"ids": ids})
        got += [out.loss] if out is not None else []
        expected.append(ref.step(x, target=y, teacher_inputs=(image,), teacher_kwargs={"ids": ids}))
    got.append(trainer.finish().loss)
    assert got == pytest.approx(expected, rel=1e-5)


def test_teacher_inputs_of_other_samples_are_refused() -> None:
    torch.manual_seed(0)
    x, image, ids, y = batch()
    with pytest.raises(TspipeError, match="the teacher's example holds 4 samples and the student's 8"):
        tspipe_fx.compile(Net(), ImageTeacher().eval(), 2, example_inputs=(x,), teacher_example_inputs=(image[:4],),
                          teacher_example_kwargs={"ids": ids[:4]}, cost_model="uniform")  # fmt: skip
    pipe = tspipe_fx.compile(Net(), ImageTeacher().eval(), 2, example_inputs=(x,), teacher_example_inputs=(image,),
                             teacher_example_kwargs={"ids": ids}, cost_model="uniform")  # fmt: skip
    trainer = pipe.trainer(kd_loss, optimizer=sgd)
    with pytest.raises(TspipeError, match="the teacher's inputs hold 6 samples and the student's 8"):
        trainer.step(x, target=y, teacher_inputs=image[:6], teacher_kwargs={"ids": ids[:6]})
    with pytest.raises(TspipeError, match=r"teacher_inputs must be a tensor or a tuple .*, got int and dict"):
        trainer.step(x, target=y, teacher_inputs=5, teacher_kwargs={"ids": ids})
    with pytest.raises(TspipeError, match=r"ImageTeacher was captured for inputs structured as 1 positional input and keywords \['ids'\]"):
        trainer.step(x, target=y)  # the teacher's inputs forgotten
    assert trainer.pending is None


def test_an_example_a_model_cannot_take_is_named_in_one_line() -> None:
    """A teacher that takes other inputs than the student gave a 170-line traceback that never
    said "teacher"; a wrongly shaped example gave 91 lines."""
    x = batch()[0]

    class Images(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.conv(image).mean((2, 3))

    with pytest.raises(TspipeError) as err:
        tspipe_fx.compile(Net(), Images().eval(), 2, example_inputs=(x,), cost_model="uniform")
    message = str(err.value)
    assert "\n" not in message and err.value.__cause__ is None and err.value.__suppress_context__
    assert message.startswith("the teacher (Images) cannot run on its example inputs (image=(8, 8)): RuntimeError: ")
    assert "(at node conv)" in message and "teacher_example_inputs=" in message
    with pytest.raises(TspipeError, match=r"^the student \(Net\) cannot run on its example inputs \(x=\(8, 5\)\)"):
        tspipe_fx.compile(Net(), Net().eval(), 2, example_inputs=(torch.randn(8, 5),), cost_model="uniform")
