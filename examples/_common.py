"""What the four workload examples share: their flags, where the stages run, the training loop.

Every example runs three ways:

    python examples/byol.py                                          # tiny, 2 CPU devices, local runtime
    torchrun --nproc-per-node 2 examples/byol.py --runtime dist      # tiny, one rank per device (gloo)
    torchrun --nproc-per-node 8 examples/byol.py --runtime dist --full --gpus 8   # paper size, NCCL

The tiny runs train on one fixed synthetic batch, so their loss must fall within a few steps
(the tests run each for a few steps and check that).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

import tspipe_fx


def parser(doc: str | None, *, batch: int, full_batch: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the paper's model sizes (GPUs)")
    p.add_argument("--runtime", choices=["local", "dist"], default="local",
                   help="local: one process, a thread per device; dist: one rank per device under torchrun")  # fmt: skip
    p.add_argument("--gpus", type=int, default=2, help="pipeline stages")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=None, help=f"samples per batch (default {batch}, {full_batch} with --full)")
    p.add_argument("--micro-batches", type=int, default=None, help="default: --gpus")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plan-only", metavar="SPEC", default=None,
                   help="print the plan for --gpus devices of this kind (h100, a100, v100) from a roofline "
                   "model, computed here on the CPU, and stop")  # fmt: skip
    p.set_defaults(default_batch=batch, default_full_batch=full_batch)
    return p


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    if args.batch is None:
        args.batch = args.default_full_batch if args.full else args.default_batch
    args.micro_batches = args.micro_batches or args.gpus
    torch.manual_seed(args.seed)
    if not args.full:
        torch.set_num_threads(1)  # one core per stage on the CPU
    return args


def devices(args: argparse.Namespace) -> list[str]:
    """Where the stages are costed and run: under torchrun each rank's own device (every rank
    compiles, and profiles on its own GPU; rank 0's plan wins), else the GPUs with --full, else
    the CPU once per stage."""
    if args.runtime == "dist":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return [f"cuda:{local}" if torch.cuda.is_available() else "cpu"] * args.gpus
    if args.full:
        if torch.cuda.device_count() < args.gpus:
            raise SystemExit(f"--full needs {args.gpus} GPUs, found {torch.cuda.device_count()}; use --gpus")
        return [f"cuda:{i}" for i in range(args.gpus)]
    return ["cpu"] * args.gpus


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def say(*text: Any) -> None:
    if is_main():
        print(*text, flush=True)


def compile_pair(student: torch.nn.Module, teacher: torch.nn.Module, args: argparse.Namespace, example: Any,
                 **options: Any) -> tspipe_fx.Pipeline:  # fmt: skip
    """Compile on one micro-batch's worth of the example batch, for the whole batch (with
    ``--plan-only``: on 2 samples, for devices modelled by a roofline; print the plan and stop)."""
    t0 = time.perf_counter()
    micro = 2 if args.plan_only else math.ceil(args.batch / args.micro_batches)
    if args.plan_only:
        options.update(cost_model="roofline", device_specs=[args.plan_only] * args.gpus)
    run_on = ["cpu"] * args.gpus if args.plan_only else devices(args)
    inputs, kwargs = ((), example) if isinstance(example, dict) else ((example,), {})
    pipe = tspipe_fx.compile(
        student, teacher, args.gpus, example_inputs=[x[:micro] for x in inputs],
        example_kwargs={k: v[:micro] if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()} or None,
        batch_size=args.batch, micro_batches=args.micro_batches, devices=run_on, **options,
    )  # fmt: skip
    say(f"compiled in {time.perf_counter() - t0:.1f} s\n{pipe.report()}\n")
    if args.plan_only:
        raise SystemExit(0)
    return pipe


def train(
    trainer: Any,
    batches: Iterator[tuple[tuple[Any, ...], dict[str, Any], Any]],
    steps: int,
    *,
    momentum: Callable[[int], float] | None = None,
) -> list[float]:
    """Feed ``steps`` batches ``(args, kwargs, target)``; print and return each batch's loss.

    ``momentum(k)``: the EMA momentum of optimizer step ``k`` (a momentum teacher). Feeding batch
    ``k + 1`` runs the optimizer step of batch ``k`` (the teacher forward of ``k + 1`` fills its
    bubbles), so the momentum of step ``k`` is set just before that call.
    """
    losses: list[float] = []
    t0 = time.perf_counter()

    def show(done: Any) -> None:
        if done is not None:
            losses.append(done.loss)
            say(f"step {done.batch}: loss {done.loss:.4f}")

    for step in range(steps):
        args, kwargs, target = next(batches)
        if momentum is not None and step > 0:
            trainer.update_momentum(momentum(step - 1))
        show(trainer.step(*args, target=target, **kwargs))
    if momentum is not None:
        trainer.update_momentum(momentum(steps - 1))
    show(trainer.finish())
    seconds = time.perf_counter() - t0
    say(f"{steps} steps in {seconds:.1f} s; loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return losses


def cosine_momentum(base: float, steps: int) -> Callable[[int], float]:
    """BYOL's EMA schedule: ``1 - (1 - base) * (cos(pi k / K) + 1) / 2``, from base up to 1."""
    return lambda k: 1 - (1 - base) * (math.cos(math.pi * k / max(steps, 1)) + 1) / 2
