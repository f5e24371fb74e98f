"""The plan written down: each model's stages with their costs per micro-batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tspipe_fx.cost.model import NodeCost
from tspipe_fx.passes.chain import GraphChain
from tspipe_fx.passes.fingerprint import graph_fingerprint
from tspipe_fx.passes.meta import info
from tspipe_fx.passes.symbolic import evaluate as eval_expr
from tspipe_fx.plan import ModelPlan, StagePlan
from tspipe_fx.stage import Stage, tie_groups
from tspipe_fx.tracing.model import CapturedModel

__all__ = ["model_plan"]


def model_plan(
    cap: CapturedModel,
    gc: GraphChain,
    stages: list[Stage],
    cuts: Sequence[int],
    costs: Sequence[NodeCost],
    run_on: Sequence[torch.device],
    micro: dict[str, int],
    activation_scale: float = 1.0,
    split_shares: Sequence[tuple[float, float]] = (),
) -> ModelPlan:
    """One model's stages, each with its nodes, modules and costs per micro-batch (activations and
    cut bytes in the compute dtype: ``activation_scale`` of the graph's fp32), and the split
    backward's timed halves per stage where given."""
    sums = gc.to_partition_chain(costs, activation_scale=activation_scale).stage_sums(cuts)
    bounds = [0, *cuts, gc.n]
    plans = []
    for k, (stage, total) in enumerate(zip(stages, sums, strict=True)):
        lo, hi = bounds[k], bounds[k + 1]
        nodes = gc.nodes[lo:hi]
        paths = [info(node).module_path for node in nodes]  # "" for glue nodes (getattr, eq)
        plans.append(
            StagePlan(
                index=k,
                device=str(run_on[k]),
                nodes=stage.nodes,
                inputs=stage.inputs,
                outputs=stage.outputs,
                first_module=next((p for p in paths if p), ""),
                last_module=next((p for p in reversed(paths) if p), ""),
                param_bytes=total.param_bytes,
                fwd_flops=sum(eval_expr(info(node).flops_expr, micro) for node in nodes),
                fwd_ms=total.fwd_ms,
                bwd_ms=total.bwd_ms,
                activation_bytes=total.act_bytes,
                cut_in_bytes=round(gc.live_bytes[lo] * activation_scale) if k > 0 else 0,
                cut_out_bytes=round(gc.live_bytes[hi] * activation_scale) if k < len(stages) - 1 else 0,
                split_shares=tuple(split_shares[k]) if len(split_shares) == len(stages) else (),
            )
        )
    return ModelPlan(
        model_name=cap.model_name,
        method=cap.method,
        graph_hash=graph_fingerprint(cap.graph_module),
        cuts=tuple(gc.nodes[p].name for p in cuts),
        stages=tuple(plans),
        tie_groups=tuple(tie_groups(stages)),
    )
