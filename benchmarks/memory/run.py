"""Predicted against measured peak memory per stage (issue 15): the plan's prediction for every
device, and the peak each torchrun rank reaches while it trains.

    python benchmarks/memory/run.py                  # every case, prints the table
    python benchmarks/memory/run.py --only tspipe    # one case

The pair: a ResNet-18 student and a ViT-S/16 teacher (6 blocks) at 64 x 64 images, batch 32 in
4 micro-batches, KD loss, SGD with momentum (optimizer state: 1 byte per parameter byte),
measured costs (the bytes autograd saves per node; profiled once for every case), 2 stages. Each
case compiles its plan here
(its schedule, recompute policy and precision; the prediction is ``plan.memory``) and trains it
on 2 gloo ranks under torchrun (the distributed runtime: one stage per process, so each process's
memory is its stage's).

How a rank measures: the PyTorch profiler's memory events (``profile_memory=True``) from the
start of the process, every allocation and free of the CPU allocator in time order. The bytes
alive just before the trainer is built (the user's models, the batch) are the baseline; the
stage's peak is the most bytes alive above it from then through ``--steps`` training steps and
``finish()`` (which drains the pipeline): its parameter copies, gradients, optimizer state, activations and messages.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE.parents[1]))

import training.run as training  # noqa: E402
from training.run import kd_loss, sgd  # noqa: E402  (the same pair, loss and optimizer)

CASES: dict[str, dict[str, Any]] = {
    "tspipe": {"schedule": "tspipe"},
    "1f1b": {"schedule": "1f1b", "loss": "micro"},
    "tspipe-recompute": {"schedule": "tspipe", "recompute": "always"},
    "1f1b-except-last": {"schedule": "1f1b", "loss": "micro", "recompute": "except_last"},
    "tspipe-bf16": {"schedule": "tspipe", "precision": "bf16"},
}
IMAGE, BATCH, MICRO = 64, 32, 4
MARK = 7_654_321  # bytes of the marker allocation (a size nothing else has)


def pair() -> tuple[nn.Module, nn.Module]:
    return training.pair(IMAGE)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g), torch.randint(0, 10, (BATCH,), generator=g)


def peak_above(events: list[tuple[int, int]], start_ns: int) -> tuple[float, float]:
    """(bytes alive at ``start_ns``, the most alive at once from then on) of (time, +-bytes) events."""
    alive, base, peak = 0, None, 0
    for t, nbytes in sorted(events):
        if base is None and t >= start_ns:
            base = peak = alive
        alive += nbytes
        if base is not None:
            peak = max(peak, alive)
    assert base is not None, "no memory event after the trainer was built"
    return float(base), float(peak)


def worker(args: argparse.Namespace) -> None:
    """One rank: train the saved plan, measure the peak of this process's stage."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        import tspipe_fx
        from tspipe_fx.plan import Plan

        torch.set_num_threads(1)
        student, teacher = pair()
        x, y = data()
        plan = Plan.load(args.plan)
        pipe = tspipe_fx.compile(student, teacher, 2, example_inputs=(x[: BATCH // MICRO],), batch_size=BATCH,
                                 micro_batches=MICRO, plan=plan, optimizer_factor=1.0,
                                 **CASES[args.case])  # fmt: skip
        marker = torch.empty(MARK, dtype=torch.uint8)  # its allocation event marks the baseline
        del marker
        trainer = pipe.trainer(kd_loss, optimizer=sgd, runtime="dist")
        for _ in range(args.steps):
            trainer.step(x, target=y)
        marker = torch.empty(MARK + 1, dtype=torch.uint8)  # ... and the end of the steps
        del marker
        trainer.finish()
    events = [
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    ]
    start = min(t for t, nbytes in events if nbytes == MARK)
    end = min(t for t, nbytes in events if nbytes == MARK + 1)
    base, peak = peak_above([(t, b) for t, b in events if t < end], start)
    rank = int(os.environ["RANK"])
    Path(f"{args.result}.{rank}").write_text(json.dumps({"base": base, "peak": peak}))


def run_case(name: str, profiles: Any, tmp: Path, steps: int) -> list[tuple[float, float, Any]]:
    """Compile the case's plan, train it on 2 ranks; per stage (predicted, measured, memory parts)."""
    import tspipe_fx

    student, teacher = pair()
    x, _ = data()
    pipe = tspipe_fx.compile(student, teacher, 2, example_inputs=(x[: BATCH // MICRO],), batch_size=BATCH,
                             micro_batches=MICRO, optimizer_factor=1.0, profile=profiles, **CASES[name])  # fmt: skip
    plan_path, result = tmp / f"{name}.json", tmp / f"{name}.result"
    pipe.plan.save(plan_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(HERE),
           "--worker", "--case", name, "--plan", str(plan_path), "--result", str(result), "--steps", str(steps)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{name}: the ranks failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    out = []
    for j, m in enumerate(pipe.plan.memory):
        got = json.loads(Path(f"{result}.{j}").read_text())
        out.append((m.total, got["peak"] - got["base"], m))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=list(CASES))
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--plan", type=Path)
    parser.add_argument("--case", choices=list(CASES))
    parser.add_argument("--result", type=Path)
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    if args.steps < 3:  # the second window is the first with the optimizer's state: steady state
        parser.error(f"--steps must be at least 3 (the pipeline runs a batch behind), got {args.steps}")
    if args.worker:
        worker(args)
        return
    torch.set_num_threads(1)
    mib = 2**20
    rows, figures = [], {}
    import tspipe_fx

    student, teacher = pair()
    micro_x = data()[0][: BATCH // MICRO]
    profiles = (
        tspipe_fx.profile(student, (micro_x,)),
        tspipe_fx.profile(teacher, (micro_x,)),
    )  # once, for all
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or CASES:
            stages = run_case(name, profiles, Path(tmp), args.steps)
            for j, (pred, meas, m) in enumerate(stages):
                parts = " / ".join(
                    f"{x / mib:.1f}"
                    for x in (
                        m.student_params,
                        m.gradients,
                        m.optimizer_state,
                        m.teacher_params,
                        m.activations,
                        m.boundaries,
                        m.working,
                    )
                )
                rows.append(f"| {name} | {j} | {m.recompute} | {m.in_flight} | {parts} | {pred / mib:.1f} | "
                            f"{meas / mib:.1f} | {pred / meas - 1:+.1%} |")  # fmt: skip
                figures[f"{name}/{j}"] = {"predicted": pred, "measured": meas}
            print(rows[-2], rows[-1], sep="\n", flush=True)
    print(f"\ntorch {torch.__version__}, {os.cpu_count()} CPUs, {args.steps} steps per case\n")
    print("| case | stage | recompute | in flight | params / grads / optimizer / teacher / activations / cut "
          "buffers / working MiB | predicted MiB | measured MiB | error |")  # fmt: skip
    print("|---|---:|---|---:|---|---:|---:|---:|")
    print("\n".join(rows))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
