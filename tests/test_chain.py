"""The chain view of a graph: positions, live sets, candidate cuts, costs per position, mirrors."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from toys import Online, Target

from tspipe_fx import TspipeError, capture
from tspipe_fx.cost import NodeCost, UniformCost
from tspipe_fx.passes import annotate_structure, annotate_symbolic
from tspipe_fx.passes.chain import GraphChain, candidate_cuts, graph_chain, mirrored_cuts


def _chain(model: nn.Module, x: torch.Tensor, **kwargs: int) -> GraphChain:
    gm = capture(model, (x,)).graph_module
    annotate_structure(gm)
    annotate_symbolic(gm, [x])
    return graph_chain(gm, {"B": x.shape[0]}, **kwargs)


def test_candidates_are_local_minima_spread_in_windows() -> None:
    nbytes = [0, 5, 1, 5, 2, 5, 3, 5, 1, 5, 0]
    assert candidate_cuts(nbytes, 10) == (2, 4, 6, 8)
    # two windows over positions 1..9: the cheapest in each (the later one on ties)
    assert candidate_cuts(nbytes, 2) == (2, 8)
    assert candidate_cuts(nbytes, 10, [False, False, True] + [False] * 8) == (4, 6, 8)  # a blocked one is none


def test_candidates_between_heavy_nodes_come_first() -> None:
    """Between two heavy nodes the cheapest position is a candidate though no local minimum
    (inside a block); over the limit, those gaps are kept before the local minima."""
    nbytes = [9, 1, 5, 5, 3, 6, 2, 4, 2, 9]  # positions 0..9, nodes 0..8
    heavy = [False, True, False, True, False, False, False, False, True]  # nodes 1, 3, 8
    assert candidate_cuts(nbytes, 10) == (1, 4, 6, 8)  # local minima alone
    # gaps: after node 1 up to node 3 (positions 2, 3 tie: the later one, no local minimum), after
    # node 3 up to node 8 (positions 4..8: 6 and 8 tie at 2, the later one)
    assert candidate_cuts(nbytes, 10, heavy=heavy) == (1, 3, 4, 6, 8)
    assert candidate_cuts(nbytes, 2, heavy=heavy) == (3, 8)  # only the gaps' picks fit
    assert candidate_cuts(nbytes, 3, heavy=heavy) == (1, 3, 8)  # and the cheapest local minimum
    blocked = [False] * 3 + [True] + [False] * 6
    assert candidate_cuts(nbytes, 10, blocked, heavy) == (1, 2, 4, 6, 8)  # 3 blocked: 2 stands for the gap


class Attention(nn.Module):
    """Pre-norm self-attention and MLP with residuals: inside it no position is a local minimum
    of the live bytes between the projections, the scores and the MLP's two products."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.norm1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + self.proj(nn.functional.scaled_dot_product_attention(q, k, v))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


def test_a_block_may_be_cut_between_its_heavy_nodes() -> None:
    """The attention's scores count their FLOPs on the CPU (torch's counter lacks the CPU kernel's
    formula: :mod:`tspipe_fx.passes.flop_formulas`), and a candidate cut lies between each two of
    the block's heavy nodes: qkv | scores | proj | fc1 | fc2."""
    model = nn.Sequential(Attention(), Attention())
    gc = _chain(model, torch.randn(2, 5, 16))
    flops = {n.name: n.meta["tspipe"].fwd_flops for n in gc.nodes}
    sdpa = [name for name in flops if "scaled_dot_product" in name]
    assert sdpa and all(flops[name] == 2 * (2 * 2 * 5 * 5 * 16) for name in sdpa)  # QK^T and PV
    exprs = {n.name: n.meta["tspipe"].flops_expr for n in gc.nodes}
    assert all("B" in exprs[name] for name in [*sdpa, "_0_fc1"]), exprs  # still symbolic in the batch
    heavy = [p for p, n in enumerate(gc.nodes) if flops[n.name] > 0]
    assert len(heavy) == 10  # five per block
    for a, b in itertools.pairwise(heavy):
        assert any(a < p <= b for p in gc.candidates), (gc.nodes[a].name, gc.nodes[b].name)


def test_positions_modules_and_costs() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    gc = _chain(model, torch.randn(3, 4))
    assert gc.n == 5 and [n.name for n in gc.nodes][:2] == ["_0", "_1"]
    assert gc.position_of("_2") == 2 and gc.module_position("4") == 4
    assert gc.live_bytes[2] == 3 * 8 * 4  # one (3, 8) float tensor crosses the cut before node 2
    with pytest.raises(TspipeError, match="no compute node named 'nope'"):
        gc.position_of("nope")
    with pytest.raises(TspipeError, match=r"no module 'head' in the graph; top-level modules: \['0', '1'"):
        gc.module_position("head")
    costs = UniformCost().graph_costs(gc.gm)
    per_position = gc.costs(costs)  # the placeholder's and get_attr's costs land on their first reader
    assert [c.fwd_ms for c in per_position] == [1.0] * 5
    chain = gc.to_partition_chain(costs)
    assert chain.fwd_ms == (1.0,) * 5 and chain.cuts == tuple((p, gc.live_bytes[p]) for p in gc.candidates)
    assert chain.param_bytes[0] == (4 * 8 + 8) * 4  # the first Linear's weight and bias
    scaled = gc.rescaled(costs, [2], fwd=[2.0, 1.0], bwd=[1.0, 3.0])
    by_position = gc.costs(scaled)
    assert [c.fwd_ms for c in by_position] == [2.0, 2.0, 1.0, 1.0, 1.0]
    assert [c.bwd_ms for c in by_position] == [2.0, 2.0, 6.0, 6.0, 6.0]
    assert gc.costs([NodeCost(1.0)] * len(costs))[0].fwd_ms == 2.0  # the input placeholder + node 0


def test_mirrored_cuts_split_the_shared_parameters_alike() -> None:
    online = Online()
    x = torch.randn(4, 8)
    s, t = _chain(online, x), _chain(Target(online), x)
    shared = {n for n, _ in Target(online).named_parameters()}
    pairs = mirrored_cuts(s, t, shared)
    assert pairs and all(a < b and c < d for (a, c), (b, d) in itertools.pairwise(pairs))
    for p, q in pairs:  # the parameters used before the cut are the same in both graphs
        before_s = {n for node in s.nodes[:p] for n in node.meta["tspipe"].param_names} & shared
        before_t = {n for node in t.nodes[:q] for n in node.meta["tspipe"].param_names} & shared
        assert before_s == before_t


def test_a_momentum_copy_mirrors_every_candidate() -> None:
    """A copy's graph has the same candidates between the same parameter users: they pair in
    order, so a stage may end after a block's attention scores (parameter-free) as well as before."""
    import copy

    model = nn.Sequential(Attention(), Attention())
    x = torch.randn(2, 5, 16)
    s, t = _chain(model, x), _chain(copy.deepcopy(model), x)
    pairs = mirrored_cuts(s, t, {n for n, _ in model.named_parameters()})
    assert pairs == [(p, p) for p in s.candidates]
