"""Compile time of real models: capture, passes, chains, partition and split, costs excluded.

    python benchmarks/compile_time/run.py [--models densenet121 resnet50 ...] [--rounds 3]

Each model is compiled as its own KD teacher into 2 stages with ``cost_model="uniform"`` (no
profiling: the time is the compiler's own), at a 64 px example of 2 images; rounds alternate
between the models so machine load falls on all alike, and the median is reported. Target
(issue 13.12): any model of up to 1,000 nodes in under 10 s.
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
from tabulate import tabulate

import tspipe_fx

MODELS = ["resnet50", "densenet121", "efficientnet_b0", "regnety_016", "mobilenetv3_large_100", "vit_small_patch16_224"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {m: [] for m in args.models}
    nodes: dict[str, int] = {}
    for _ in range(args.rounds):
        for name in args.models:
            torch.manual_seed(0)
            size = 224 if name.startswith("vit") else 64
            student = timm.create_model(name, pretrained=False)
            teacher = timm.create_model(name, pretrained=False).eval()
            t0 = time.perf_counter()
            pipe = tspipe_fx.compile(student, teacher, 2, example_inputs=(torch.randn(2, 3, size, size),),
                                     cost_model="uniform")  # fmt: skip
            times[name].append(time.perf_counter() - t0)
            nodes[name] = len(pipe.student.graph_module.graph.nodes)
            print(f"{name}: {times[name][-1]:.1f} s", flush=True)
    rows = [[m, nodes[m], statistics.median(t), min(t), max(t), "yes" if nodes[m] > 1000 or statistics.median(t) < 10 else "NO"]
            for m, t in times.items()]  # fmt: skip
    print(tabulate(rows, headers=["model", "nodes", "median s", "min s", "max s", "target met"], floatfmt=".1f"))


if __name__ == "__main__":
    main()
