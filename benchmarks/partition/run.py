"""Partition quality and speed on the TSPipe paper's pairs, against peers' policies on the same costs.

    python benchmarks/partition/run.py [--pairs ...] [--gpus 2 4 8]

Costs: the CPU profiles of ``profile_pairs.py`` (shipped in ``tspipe_fx/profiles/cpu/``), scaled
to each micro-batch through the symbolic FLOPs; devices: identical, linked at 10 GB/s (two CPU
processes through shared memory), as the costs are CPU milliseconds. Every partition, ours and
the peers', is scored by the same model (``tspipe_fx.partition.evaluate``), so the ratios say
what each policy's cut points cost, not what each library would predict.

Peers, each balancing the student and the teacher separately as their users would:

* torchgpipe ``balance_by_time``: its block-partition solver
  (``torchgpipe.balance.blockpartition.solver``) on the per-node times;
* PiPPy ``split_into_equal_size``: a greedy walk cutting when a stage's parameter bytes reach
  ``total / n``;
* DeepSpeed ``partition_method="parameters"``: the exact min-max split of parameter counts
  (``ds_utils.partition_balanced``);
* DeepSpeed ``partition_method="uniform"``: equal node counts (``ds_utils.partition_uniform``).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).parent.parent))
from pairs import PAIRS, profiled

import tspipe_fx
from tspipe_fx.partition import Chain, Device, Problem, solve

BATCH = {"kd_vitl_r152": 256, "kd_bertl_distilbertl": 128, "byol_r18": 256, "mocov3_vitb": 256}


def cuts_from_sizes(sizes: Sequence[int]) -> list[int]:
    out, acc = [], 0
    for s in sizes[:-1]:
        acc += s
        out.append(acc)
    return out


def torchgpipe_cuts(costs: Sequence[float], n: int) -> list[int]:
    from torchgpipe.balance import blockpartition

    # blockpartition wants positive numbers; zero-cost nodes get a tiny weight.
    parts = blockpartition.solver([max(c, 1e-9) for c in costs], partitions=n)
    return cuts_from_sizes([len(p) for p in parts])


def pippy_equal_size_cuts(params: Sequence[int], n: int) -> list[int]:
    """PiPPy's split_into_equal_size: cut once a stage's parameter size reaches total / n."""
    threshold = sum(params) / n
    cuts, acc = [], 0.0
    for i, p in enumerate(params):
        acc += p
        if acc >= threshold and len(cuts) < n - 1 and i + 1 < len(params):
            cuts.append(i + 1)
            acc = 0.0
    while len(cuts) < n - 1:  # too few heavy nodes: the remaining stages get one node each
        cuts.append(len(params) - (n - 1 - len(cuts)))
    return sorted(set(cuts))


def deepspeed_parameters_cuts(params: Sequence[int], n: int) -> list[int]:
    chain = Chain.uniform([float(p) for p in params])
    return list(solve(Problem(chain, None, tuple(Device() for _ in range(n)))).student_cuts)


def deepspeed_uniform_cuts(count: int, n: int) -> list[int]:
    return [k * count // n for k in range(1, n)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--gpus", nargs="+", type=int, default=[2, 4, 8])
    args = parser.parse_args()
    rows = []
    for pair in args.pairs:
        pp = profiled(pair)
        for n in args.gpus:
            t0 = time.perf_counter()
            pipe = pp.compile(n, batch_size=BATCH[pair], micro_batches=n)
            compile_s = time.perf_counter() - t0
            plan = pipe.plan
            s_costs, t_costs, s_params, t_params = _per_node(pipe)
            peers = {
                "torchgpipe": (torchgpipe_cuts(s_costs, n), torchgpipe_cuts(t_costs, n)),
                "PiPPy equal size": (pippy_equal_size_cuts(s_params, n), pippy_equal_size_cuts(t_params, n)),
                "DS parameters": (
                    deepspeed_parameters_cuts(s_params, n),
                    deepspeed_parameters_cuts(t_params, n),
                ),
                "DS uniform": (
                    deepspeed_uniform_cuts(len(s_costs), n),
                    deepspeed_uniform_cuts(len(t_costs), n),
                ),
            }
            ours = plan.max_load_ms
            ratios = []
            for s_cuts, t_cuts in peers.values():
                ratios.append(f"{pipe.score(s_cuts, t_cuts).period_ms / ours:.2f}x")
            grain = max(c for c in s_costs) * plan.micro_batches / plan.lower_bound_ms
            rows.append(
                [
                    pair,
                    n,
                    f"{ours:.0f}",
                    f"{plan.lower_bound_ms:.0f}",
                    f"{100 * plan.imbalance:.1f}%",
                    f"{100 * grain:.1f}%",
                    *ratios,
                    f"{compile_s:.1f}",
                ]
            )
            print(rows[-1], flush=True)
    print()
    print(tabulate(rows, headers=["pair", "gpus", "period ms", "lower bound ms", "over bound", "largest node",
                                  *(f"{p} / ours" for p in ("torchgpipe", "PiPPy equal size", "DS parameters", "DS uniform")),
                                  "compile s"], tablefmt="github", disable_numparse=True))  # fmt: skip
    print()
    print(
        tabulate(
            solver_speed(),
            headers=["nodes per model", "candidates", "stages", "memory bound", "solve s (median of 3)"],
            tablefmt="github",
        )
    )


def _per_node(pipe: tspipe_fx.Pipeline) -> tuple[list[float], list[float], list[int], list[int]]:
    """Per chain node: student fwd+bwd ms, teacher fwd ms, parameter bytes of each."""
    s = pipe.student_chain.to_partition_chain(pipe.student_costs)
    t = pipe.teacher_chain.to_partition_chain(pipe.teacher_costs)
    return (
        [f + b for f, b in zip(s.fwd_ms, s.bwd_ms, strict=True)],
        list(t.fwd_ms),
        list(s.param_bytes),
        list(t.param_bytes),
    )


def solver_speed() -> list[list[object]]:
    """Time solve() on synthetic 5,000-node pairs with as many candidates as graph_chain keeps."""
    rng = random.Random(0)
    out = []
    for memory in (False, True):

        def chain() -> Chain:
            n = 5000
            pos = sorted(rng.sample(range(1, n), 128))
            return Chain(
                tuple(rng.random() for _ in range(n)), tuple(rng.random() for _ in range(n)),
                tuple(rng.randint(0, 10**6) for _ in range(n)), tuple(rng.randint(0, 10**5) for _ in range(n)),
                tuple((p, rng.randint(10**5, 10**7)) for p in pos),
            )  # fmt: skip

        s, t = chain(), chain()
        devices = tuple(Device(link_gbs=10.0, link_latency_ms=0.02) for _ in range(8))
        free = solve(Problem(s, t, devices, micro_batches=8))
        if memory:  # a limit 10% under the free optimum's largest memory: the constrained path
            cap = 0.9 * max(free.memory_bytes)
            devices = tuple(dataclasses.replace(d, memory_bytes=cap) for d in devices)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            solve(Problem(s, t, devices, micro_batches=8))
            times.append(time.perf_counter() - t0)
        out.append([5000, 128, 8, "yes" if memory else "no", f"{statistics.median(times):.2f}"])
    return out


if __name__ == "__main__":
    main()
