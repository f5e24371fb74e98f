"""``make demo`` (``tspipe-fx demo``): distill a real teacher into a small student through a pipeline.

Real data without a download: the handwritten digits bundled with scikit-learn (1,797 8x8
images, 10 classes), split 2:1 into training and test sets.

1. Train the teacher, a small CNN, on its own (plain PyTorch).
2. Train the student, a smaller CNN, on its own, as the baseline.
3. Compile the pair for 2 CPU devices and distill the same student (same initial weights, same
   optimizer and epochs) through the ``tspipe`` schedule of the local runtime: the teacher's
   forward of the next batch fills the student's pipeline bubbles.

Prints the partition report, the schedule simulated on the plan's costs, the pipeline's
throughput, and the test accuracy of the teacher, the student alone and the distilled student.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

__all__: list[str] = []


def digits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training and test images ``(N, 1, 8, 8)`` in [0, 1] and their labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise SystemExit("the demo needs scikit-learn for its data: pip install 'tspipe-fx[demo]'") from e
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = len(x) * 2 // 3
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def teacher_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Dropout(0.2), nn.Linear(128, 10),
    )  # fmt: skip


def student_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10),
    )  # fmt: skip


def batches(
    x: torch.Tensor, y: torch.Tensor, size: int, epochs: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled full batches, epoch after epoch (the same order for every run with ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for k in range(0, len(x) - size + 1, size):
            idx = order[k : k + size]
            yield x[idx], y[idx]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    acc = (model(x).argmax(-1) == y).float().mean().item()
    model.train(was)
    return acc


def kd_loss(temperature: float, alpha: float) -> Any:
    """Hinton's soft targets: (1 - alpha) * CE(labels) + alpha * T^2 * KL(teacher_T || student_T)."""

    def loss(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        soft = F.kl_div(
            F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1), reduction="batchmean"
        )
        return (1 - alpha) * F.cross_entropy(s, y) + alpha * temperature**2 * soft

    return loss


def adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=3e-3)


def train_alone(model: nn.Module, data: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Plain cross-entropy training; returns the seconds it took."""
    opt = adam(model.parameters())
    t0 = time.perf_counter()
    for x, y in data:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    import tspipe_fx
    from tspipe_fx.plan import simulate_plan
    from tspipe_fx.report.timeline import render_timeline

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=30, help="epochs of every training run")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # one core per pipeline stage
    x, y, x_test, y_test = digits(args.seed)
    print(f"digits (scikit-learn): {len(x)} training and {len(x_test)} test images of 8x8, 10 classes")

    teacher, student = teacher_net(), student_net()
    initial = copy.deepcopy(student.state_dict())
    seconds = train_alone(teacher, batches(x, y, args.batch, args.epochs, args.seed))
    teacher.eval()  # a KD teacher is frozen
    print(f"1. teacher ({_params(teacher)} parameters) trained alone in {seconds:.1f} s")
    alone = student_net()
    alone.load_state_dict(initial)
    seconds = train_alone(alone, batches(x, y, args.batch, args.epochs, args.seed))
    print(f"2. student ({_params(alone)} parameters) trained alone in {seconds:.1f} s")

    print("3. the pair compiled for 2 CPU devices, the student distilled through the pipeline\n")
    pipe = tspipe_fx.compile(student, teacher, 2, example_inputs=(x[: args.batch // args.micro_batches],),
                             batch_size=args.batch, micro_batches=args.micro_batches, schedule="tspipe")  # fmt: skip
    print(pipe.report())
    timelines = {name: simulate_plan(pipe.plan, name, n_batches=4) for name in ("tspipe", "gpipe")}
    for name, tl in timelines.items():
        print(f"\n{name} schedule simulated on the plan's costs: {tl.period:.2f} ms per batch")
        print(render_timeline(tl, scale=tl.makespan / 96))
    print(f"(digits: student forward micro-batch, letters: teacher forward, capitals: student backward, "
          f".: idle; tspipe is {timelines['gpipe'].period / timelines['tspipe'].period:.2f}x "
          "shorter a batch than gpipe)\n")  # fmt: skip

    trainer = pipe.trainer(kd_loss(args.temperature, args.alpha), optimizer=adam, schedule="tspipe")
    losses: list[float] = []
    seen = 0
    t0 = time.perf_counter()
    for xb, yb in batches(x, y, args.batch, args.epochs, args.seed):
        done = trainer.step(xb, target=yb)
        seen += len(xb)
        if done is not None:
            losses.append(done.loss)
    done = trainer.finish()  # the last batch; the trained weights come home to `student`
    seconds = time.perf_counter() - t0
    assert done is not None
    losses.append(done.loss)
    print(f"distilled: {len(losses)} batches in {seconds:.1f} s, {seen / seconds:.0f} samples/s through the "
          f"pipeline; KD loss {losses[0]:.3f} -> {losses[-1]:.3f}")  # fmt: skip
    print("(models this small are dominated by per-task overheads: pipelining pays off from a few "
          "GFLOP per sample, see benchmarks/cpu_pipeline)\n")  # fmt: skip

    rows = [
        ["teacher", _params(teacher), 100 * accuracy(teacher, x_test, y_test)],
        ["student alone", _params(alone), 100 * accuracy(alone, x_test, y_test)],
        [
            "student distilled (tspipe_fx, 2 stages)",
            _params(student),
            100 * accuracy(student, x_test, y_test),
        ],
    ]
    print(tabulate(rows, headers=["model", "parameters", "test accuracy %"], floatfmt=".1f"))


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    main()
