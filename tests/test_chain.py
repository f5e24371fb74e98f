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
