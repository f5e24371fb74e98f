"""A saved plan rebuilt with the costs it recorded.

``compile(..., plan=p)`` without a cost model keeps ``p``'s costs: each stage's forward and
backward times, activation bytes and timed split backward per micro-batch, as ``p`` measured or
refined them, so the rebuilt plan reports, schedules (``auto`` is synthesized for these costs)
and fits memory as ``p`` did, with no profiling. Node costs come from the roofline model (no measurement; it spreads a
stage's time and activations over its nodes) and each stage's are scaled to ``p``'s sums.

The recorded costs are per micro-batch of ``p``'s size in ``p``'s precision: another micro-batch
size or precision prices the plan anew with compile's default cost model.
"""

from __future__ import annotations

from collections.abc import Sequence

from tspipe_fx.compiler.refine import ratios
from tspipe_fx.cost.model import CostModel, NodeCost
from tspipe_fx.cost.profile import Profile
from tspipe_fx.passes.chain import GraphChain
from tspipe_fx.plan import Plan, StagePlan

__all__ = ["keeps_saved_costs", "saved_costs"]


def keeps_saved_costs(
    plan: Plan | None,
    cost_model: CostModel | str | tuple[CostModel, CostModel] | None,
    profile: tuple[Profile, Profile] | None,
    micro_size: int,
    precision: str,
) -> bool:
    """Whether compile rebuilds ``plan`` on its own costs (see the module docstring)."""
    if plan is None or cost_model is not None or profile is not None:
        return False
    return -(-plan.batch_size // plan.micro_batches) == micro_size and plan.precision == precision


def saved_costs(
    plan: Plan,
    chains: tuple[GraphChain, GraphChain],
    cuts: tuple[Sequence[int], Sequence[int]],
    costs: tuple[Sequence[NodeCost], Sequence[NodeCost]],
    activation_scale: float,
) -> tuple[list[NodeCost], list[NodeCost]]:
    """``costs`` (student, teacher node costs) scaled stage by stage to ``plan``'s recorded sums."""
    out = []
    for gc, at, node_costs, recorded in zip(chains, cuts, costs, (plan.student, plan.teacher), strict=True):
        node_costs = _spread_where_unpriced(gc, at, node_costs, recorded.stages, activation_scale)
        sums = gc.to_partition_chain(node_costs, activation_scale=activation_scale).stage_sums(at)
        out.append(
            gc.rescaled(
                node_costs,
                at,
                ratios([s.fwd_ms for s in recorded.stages], [s.fwd_ms for s in sums]),
                ratios([s.bwd_ms for s in recorded.stages], [s.bwd_ms for s in sums]),
                ratios([s.activation_bytes for s in recorded.stages], [s.act_bytes for s in sums]),
            )
        )
    return out[0], out[1]


def _spread_where_unpriced(
    gc: GraphChain,
    cuts: Sequence[int],
    node_costs: Sequence[NodeCost],
    recorded: Sequence[StagePlan],
    activation_scale: float,
) -> list[NodeCost]:
    """``node_costs`` with a stage that the roofline prices at nothing in a field its record does
    not (a teacher stage of glue nodes has no roofline backward, a measured one a little) given a
    unit on each of its nodes, so that scaling reproduces the record there too."""
    sums = gc.to_partition_chain(node_costs, activation_scale=activation_scale).stage_sums(cuts)
    unpriced = [
        (s.fwd_ms == 0 < r.fwd_ms, s.bwd_ms == 0 < r.bwd_ms, s.act_bytes == 0 < r.activation_bytes)
        for s, r in zip(sums, recorded, strict=True)
    ]
    out = []
    for k, c in zip(gc.stage_of_nodes(cuts), node_costs, strict=True):
        fwd, bwd, mem = unpriced[k]
        out.append(
            NodeCost(1.0 if fwd else c.fwd_ms, 1.0 if bwd else c.bwd_ms, 1024 if mem else c.memory_bytes)
        )
    return out
