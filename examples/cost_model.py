"""Plug in your own cost model: capture a model, profile it, and cost it three ways.

    python examples/cost_model.py [--model resnet18] [--batch 4] [--micro-batch 1]

A cost model maps each graph node to ``NodeCost(fwd_ms, bwd_ms, memory_bytes)`` for one
micro-batch. Here: the measured profile scaled to the micro-batch size, an H100 roofline, and a
custom model written as a plain function that charges measured compute plus a fixed per-op
dispatch overhead, combined with ``+`` and ``*``.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import timm
import torch
import torch.fx as fx
from tabulate import tabulate

import tspipe_fx
from tspipe_fx.cost import MeasuredCost, NodeCost, RooflineCost, cost_model
from tspipe_fx.passes import annotate_structure, annotate_symbolic


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--image", type=int, default=64)
    args = parser.parse_args()

    model = timm.create_model(args.model, pretrained=False)
    x = torch.randn(args.batch, 3, args.image, args.image)
    captured = tspipe_fx.capture(model, (x,))
    prof = tspipe_fx.profile(captured, (x,), repeats=3)
    gm = prof.attach(captured)  # node.meta["tspipe"] now holds the measurements
    annotate_structure(gm)
    annotate_symbolic(gm, captured.flatten_inputs((x,), {}))

    @cost_model
    def dispatch_overhead(node: fx.Node) -> NodeCost:
        """20 us per op launched, forward and backward: what a slow host adds."""
        return NodeCost(0.02, 0.02, 0) if node.op.startswith("call") else NodeCost()

    models = {
        "measured": MeasuredCost(prof, batch_size=args.micro_batch),
        "h100 roofline": RooflineCost("h100", batch_size=args.micro_batch),
        "measured x1.1 + overhead": MeasuredCost(prof, batch_size=args.micro_batch) * 1.1 + dispatch_overhead,
    }
    rows: dict[str, list[float]] = defaultdict(list)
    for cm in models.values():
        per_module: dict[str, float] = defaultdict(float)
        for node, cost in zip(gm.graph.nodes, cm.graph_costs(gm), strict=True):
            top = node.meta["tspipe"].module_path.split(".")[0] or "(io)"
            per_module[top] += cost.fwd_ms + cost.bwd_ms
        for module, ms in per_module.items():
            rows[module].append(ms)
    table = [[module, *costs] for module, costs in rows.items()]
    headers = ["module", *(f"{name} fwd+bwd ms" for name in models)]
    print(f"{args.model}, micro-batch {args.micro_batch} (profiled at batch {args.batch})")
    print(tabulate(table, headers=headers, floatfmt=".3f"))


if __name__ == "__main__":
    main()
