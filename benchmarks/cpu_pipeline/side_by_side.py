"""``free`` and ``auto`` in the same two processes, block after block, with plain 1-thread
training's step between them (issue 14: where the 2-rank pipeline's time goes on this CPU).

    python benchmarks/cpu_pipeline/run.py --micro auto --rounds 1 --only plain-1t --save-plan plan.json
    python benchmarks/cpu_pipeline/side_by_side.py --plan plan.json --rounds 8

``run.py`` starts each contender in fresh processes, minutes apart, on a VM whose speed drifts
±20% over minutes. Here one torchrun holds both: each round times ``--steps`` steps of plain
1-thread training (in a process of its own, both ranks parked), of ``free`` (each rank's own work
of the plan, nothing to wait for) and of ``auto`` (our dist runtime, the plan's synthesized
schedule, a loss per micro-batch), in turn (the order alternating), on the same stage modules'
twins. Per contender it prints each rank's ms per step (to the barrier after its last step and to
its own last step) and its main thread's CPU ms per step: a runtime that costs CPU shows there,
a schedule that waits shows between the two. Then the ratios over plain training of the same
round, and the two ranks' CPU together against one plain step: the work the pipeline adds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # (the contenders' steps, the plain step's server)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--plan", type=Path, required=True, help="a plan saved by run.py --save-plan")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed block")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    if not args.plan.is_file():
        parser.error(f"--plan {args.plan}: no such file; hint: save one with run.py --save-plan")
    if "RANK" not in os.environ:  # the launcher: both ranks under torchrun, as run.py's contenders
        args.malloc = "kept"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *sys.argv]
        os.execve(sys.executable, cmd, bench.worker_env(args))
    import torch.distributed as dist

    from tspipe_fx.plan import Plan

    torch.set_num_threads(1)
    args.micro = Plan.load(args.plan).micro_batches
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    step_of = {"free": bench.free_step(args), "auto": bench.pipeline_step(args, "auto")[0]}
    plain = bench.served(args) if rank == 0 else None
    for step in step_of.values():
        for _ in range(2):
            step()
    rows: dict[str, list[tuple[float, ...]]] = {"free": [], "auto": []}  # per round: wall, own, CPU ms
    plain_ms: list[float] = []  # per round (rank 0's)
    for r in range(args.rounds):
        for name in ("free", "auto") if r % 2 == 0 else ("auto", "free"):
            dist.barrier()
            t0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(args.steps):
                step_of[name]()
            own, cpu = time.perf_counter() - t0, time.thread_time() - c0
            dist.barrier()
            rows[name].append(tuple(1e3 * v / args.steps for v in (time.perf_counter() - t0, own, cpu)))
        dist.barrier()
        if plain is not None:
            plain_ms.append(1e3 * statistics.mean(plain() for _ in range(args.steps)))
    every: list[dict[str, list[tuple[float, ...]]]] = [{}] * dist.get_world_size()
    dist.all_gather_object(every, rows)
    if rank == 0:
        report(args, plain_ms, every)
    dist.destroy_process_group()


def report(args: argparse.Namespace, plain: list[float], every: list[dict[str, list[tuple[float, ...]]]]) -> None:
    print(f"{args.rounds} rounds x {args.steps} steps, batch {args.batch} in {args.micro} micro-batches, "
          f"plan {args.plan.name}, torch {torch.__version__}, {os.cpu_count()} CPUs\n")  # fmt: skip
    print("| contender | rank | ms per step (median) | own steps | main-thread CPU | x plain 1 thread, same round (median, min–max) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| plain-1t | | {statistics.median(plain):.0f} | | | 1.00x |")
    for name in ("free", "auto"):
        for rank, rows in enumerate(every):
            wall, own, cpu = (statistics.median(c) for c in zip(*rows[name], strict=True))
            speed = [p / w for p, (w, *_) in zip(plain, rows[name], strict=True)]
            by = f"{statistics.median(speed):.2f}x ({min(speed):.2f}–{max(speed):.2f})" if rank == 0 else ""
            print(f"| {name} | {rank} | {wall:.0f} | {own:.0f} | {cpu:.0f} | {by} |")
    free_ms, auto_ms = ([w for w, *_ in every[0][n]] for n in ("free", "auto"))
    share = [f / a for f, a in zip(free_ms, auto_ms, strict=True)]
    print(f"\nauto: {statistics.median(share):.3f} of free, same round (min {min(share):.3f}, max {max(share):.3f})")
    for name in ("free", "auto"):
        work = [sum(rows[name][i][2] for rows in every) / plain[i] for i in range(len(plain))]
        print(f"{name}: both ranks' CPU {statistics.median(work):.3f}x one plain step's time (the most "
              f"2 ranks can then give: {2 / statistics.median(work):.2f}x plain 1 thread)")  # fmt: skip
    auto = statistics.median(p / a for p, a in zip(plain, auto_ms, strict=True))
    print(bench.target_state(auto))


if __name__ == "__main__":
    main()
