"""The script the distributed tests start under torchrun (one process per rank).

    torchrun --nproc-per-node 2 tests/dist_worker.py --out DIR [--mode momentum] [--steps 6] ...

Every rank trains the same toy pair with ``runtime="dist"`` on batches it derives from the step
number (each pipeline its own rows of the batch), then writes ``DIR/rank-R.pt``: the losses it
was told and, after ``finish()``, the user's student and teacher state_dicts.
"""

from __future__ import annotations

import argparse
import copy
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from toys import Net, Noisy, Online, Target, byol_loss, kd_loss, sgd

import tspipe_fx
from tspipe_fx.runtime.checkpoint import load_checkpoint, save_checkpoint, save_consolidated

BATCH = 8  # rows per step, over all pipelines


class Tied(nn.Module):
    """A weight read by the first and the last stage (as BERT's embeddings and decoder)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16, bias=False)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 16)
        self.d = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.d(torch.relu(self.c(torch.relu(self.b(self.inp(x)))))))
        return (h @ self.inp.weight)[:, :4]  # the input projection's weight again, transposed


def models(mode: str, tied: bool, noisy: bool = False) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    if noisy:  # dropout and drop-path: the student's, and a momentum teacher's in train mode
        student = Noisy() if mode == "kd" else Noisy(16, 8)
        return student, Net(32).eval() if mode == "kd" else copy.deepcopy(student)
    if mode == "kd":
        student = Tied() if tied else Net()
        return student, Net(32).eval()
    online = Online()
    return online, Target(online)


def batch(step: int, mode: str, rows: int = BATCH) -> tuple[torch.Tensor, ...]:
    """The whole batch of ``step`` (the tests' reference trains on it)."""
    g = torch.Generator().manual_seed(1000 + step)
    if mode == "kd":
        return torch.randn(rows, 8, generator=g), torch.randint(0, 4, (rows,), generator=g)
    return torch.randn(rows, 8, generator=g), torch.randn(rows, 8, generator=g)


def rows_of(step: int, steps: int, short_last: bool) -> int:
    """Rows of batch ``step``: a short last batch (6) where asked."""
    return 6 if short_last and step == steps - 1 else BATCH


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stages", type=int, default=2, help="devices (ranks) per pipeline")
    parser.add_argument("--stages-per-device", type=int, default=1, help="2: virtual stages (schedule auto)")
    parser.add_argument("--mode", choices=["kd", "momentum"], default="kd")
    parser.add_argument("--schedule", default="tspipe")
    parser.add_argument("--loss", default=None, help="the loss granularity (default: the plan's)")
    parser.add_argument("--tied", action="store_true")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--recompute", default="never")
    parser.add_argument("--noisy", action="store_true", help="models with dropout and drop-path")
    parser.add_argument("--clip", type=float, default=None)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument(
        "--save-at", type=int, default=None, help="save a checkpoint after this many steps, stop"
    )
    parser.add_argument("--resume", type=Path, default=None, help="load this checkpoint first")
    parser.add_argument("--other-plan", action="store_true", help="ranks > 0 compile another partition")
    parser.add_argument("--fail", default=None, help="RANK:STEP:raise|loss|kill|stop")
    parser.add_argument("--short-last", action="store_true", help="the last batch has 6 rows, not 8")
    parser.add_argument("--slow", default=None, help="RANK:KIND:SECONDS: that rank sleeps before each such task")
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    pipelines, pipeline = world // args.stages, rank // args.stages
    fail_rank, fail_step, fail_how = (args.fail or "-1:-1:none").split(":")

    def loss_fn(*outs: Any) -> torch.Tensor:
        if fail_how == "loss" and rank == int(fail_rank):
            raise ValueError("boom in the loss")
        return kd_loss(*outs) if args.mode == "kd" else byol_loss(*outs)

    student, teacher = models(args.mode, args.tied, args.noisy)
    x0 = batch(0, args.mode)[0][: BATCH // pipelines]
    options: dict[str, Any] = {"cost_model": "uniform", "stages_per_device": args.stages_per_device}
    if args.other_plan and rank > 0:  # 2 KD stages cut elsewhere than the uniform cost model cuts
        options = {"balance": (["head"], ["c"])}
    pipe = tspipe_fx.compile(student, teacher, args.stages, example_inputs=(x0,), mode=args.mode, **options)
    views = 1 if args.mode == "kd" else 2
    trainer = pipe.trainer(loss_fn, optimizer=sgd, runtime="dist", schedule=args.schedule, views=views,
                           momentum=0.9, clip_grad_norm=args.clip, timeout_s=30, loss=args.loss,
                           precision=args.precision, recompute=args.recompute)  # fmt: skip
    if args.slow is not None:  # a neighbour late against the plan: the others look ahead
        slow_rank, slow_kind, seconds = args.slow.split(":")
        if rank == int(slow_rank):
            run_task = type(trainer.runtime).run_task

            def slow(self: Any, d: Any, task: Any, data: Any, board: Any) -> None:
                if task.kind == slow_kind:
                    time.sleep(float(seconds))
                run_task(self, d, task, data, board)

            type(trainer.runtime).run_task = slow  # type: ignore[method-assign]
    start = 0
    if args.resume is not None:
        load_checkpoint(trainer, args.resume)
        start = trainer.next_index
    stop = args.save_at if args.save_at is not None else args.steps
    losses = []
    for step in range(start, stop):
        n = rows_of(step, args.steps, args.short_last)
        rows = slice(pipeline * n // pipelines, (pipeline + 1) * n // pipelines)
        if rank == int(fail_rank) and step == int(fail_step):
            if fail_how == "raise":
                raise ValueError(f"boom at step {step}")
            if fail_how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if fail_how == "stop":  # frozen: alive to the OS, silent to its peers
                os.kill(os.getpid(), signal.SIGSTOP)
        a, b = (t[rows] for t in batch(step, args.mode, n))
        r = trainer.step(a, target=b) if args.mode == "kd" else trainer.step(a, b)
        if r is not None:
            losses.append(r)
    losses.append(trainer.finish())
    if args.save_at is not None:
        save_checkpoint(trainer, args.out / "ckpt")
        save_consolidated(trainer, args.out / "consolidated.pt")
    torch.save(
        {
            "losses": [(r.batch, r.loss) for r in losses],
            "student": student.state_dict(),
            "teacher": teacher.state_dict(),
            "compiled_cuts": (pipe.plan.student.cuts, pipe.plan.teacher.cuts),
            "cuts": (trainer.plan.student.cuts, trainer.plan.teacher.cuts),
            "split_backward": trainer.schedules[3].split_backward,
            "micro_batches": trainer.m,
            "stages_per_device": trainer.plan.stages_per_device,
            "early": getattr(trainer.runtime, "early", 0),
            "time": time.time(),
        },
        args.out / f"rank-{rank}.pt",
    )


if __name__ == "__main__":
    main()
