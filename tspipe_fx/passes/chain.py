"""A captured graph seen as a chain: its compute nodes in order and what crosses each cut.

The partitioner (:mod:`tspipe_fx.partition`) works on plain numbers; this module derives them
from an annotated ``fx.GraphModule``:

* the *chain*: ``call_module`` / ``call_function`` / ``call_method`` nodes in topological order.
  Graph inputs count as produced before the first node; ``get_attr`` nodes (parameters) are not
  values that travel: each stage reads its own, so their bytes count at the nodes that use them.
* the *live set* of the cut before chain position ``p``: every value made before ``p`` and used
  at or after it (the graph's outputs are used at the end). Skip connections make it several
  tensors; they all travel over the link at that cut.
* *candidate cuts*: positions whose live bytes are a local minimum (block boundaries, where only
  the residual stream crosses), and between every two consecutive heavy nodes (matrix products,
  convolutions, attention) the position there with the fewest live bytes, so that a stage may
  end inside a block (after a transformer's attention, between its two MLP products): at most
  ``max_candidates`` of them, spread along the chain. A
  position where a tuple of tensors is live (``q, k, v = qkv.unbind(0)`` before the ``getitem``
  nodes) is never one: stage boundaries carry tensors and plain values, not containers of tensors.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch.fx as fx

from tspipe_fx.cost.model import NodeCost
from tspipe_fx.errors import TspipeError
from tspipe_fx.partition.problem import Chain
from tspipe_fx.passes.meta import info
from tspipe_fx.passes.symbolic import evaluate

__all__ = ["GraphChain", "candidate_cuts", "graph_chain", "mirror_map", "mirrored_cuts"]

COMPUTE_OPS = ("call_module", "call_function", "call_method")


@dataclass(frozen=True)
class GraphChain:
    """The chain of one graph at one micro-batch size.

    Attributes:
        nodes: compute nodes in topological order; position ``p`` is the cut before ``nodes[p]``.
        live: per position ``0..n``, the values crossing the cut there (position 0: the inputs).
        live_bytes: their bytes per micro-batch.
        candidates: positions ``1..n-1`` the partitioner may cut at.
        peak_bytes: per node, the values alive while it runs (the cut before it and its output).
    """

    gm: fx.GraphModule
    nodes: tuple[fx.Node, ...]
    live: tuple[tuple[fx.Node, ...], ...]
    live_bytes: tuple[int, ...]
    candidates: tuple[int, ...]
    peak_bytes: tuple[int, ...] = ()

    @property
    def n(self) -> int:
        return len(self.nodes)

    def position_of(self, node_name: str) -> int:
        """The chain position of the compute node called ``node_name``."""
        for p, node in enumerate(self.nodes):
            if node.name == node_name:
                return p
        raise TspipeError(f"no compute node named {node_name!r} in {self.gm.__class__.__name__}")

    def module_position(self, module_path: str) -> int:
        """The first position whose node belongs to ``module_path`` (a split point "layer3")."""
        paths = []
        for p, node in enumerate(self.nodes):
            path = info(node).module_path
            if path == module_path or path.startswith(module_path + "."):
                return p
            paths.append(path.split(".")[0])
        known = sorted(set(paths) - {""})
        raise TspipeError(f"no module {module_path!r} in the graph; top-level modules: {known[:20]}")

    def costs(self, node_costs: Sequence[NodeCost]) -> list[NodeCost]:
        """Per chain node: its own cost plus that of the inputs and parameters it reads first."""
        out = [NodeCost()] * self.n
        for node, cost in zip(self.gm.graph.nodes, node_costs, strict=True):
            p = self._position(node)
            if p is not None and self.n:
                out[p] = out[p] + cost
        return out

    def rescaled(
        self,
        node_costs: Sequence[NodeCost],
        cuts: Sequence[int],
        fwd: Sequence[float],
        bwd: Sequence[float],
        memory: Sequence[float] | None = None,
    ) -> list[NodeCost]:
        """``node_costs`` with stage ``k``'s (the chain cut at ``cuts``) scaled by ``fwd[k]``,
        ``bwd[k]`` and (activation bytes) ``memory[k]``."""
        return [
            cost.scaled(fwd[k], bwd[k], memory[k] if memory is not None else 1.0)
            for k, cost in zip(self.stage_of_nodes(cuts), node_costs, strict=True)
        ]

    def stage_of_nodes(self, cuts: Sequence[int]) -> list[int]:
        """Per graph node, the stage (of the chain cut at ``cuts``) its cost counts in."""
        bounds = [0, *cuts, self.n]
        out = []
        for node in self.gm.graph.nodes:
            p = self._position(node)
            out.append(0 if p is None else next(k for k in range(len(bounds) - 1) if p < bounds[k + 1]))
        return out

    def _position(self, node: fx.Node) -> int | None:
        """The chain position a graph node's cost counts at: its own, or (inputs, parameters) that
        of its first reader; None for the output."""
        if node.op in COMPUTE_OPS:
            return self._index[node]
        if node.op in ("placeholder", "get_attr"):
            return min((self._index[u] for u in node.users if u in self._index), default=0)
        return None

    @functools.cached_property
    def _index(self) -> dict[fx.Node, int]:
        return {n: p for p, n in enumerate(self.nodes)}

    def param_bytes(self) -> list[int]:
        """Per chain node: bytes of the parameters it reads (a module's own, or through get_attr)."""
        out = []
        for node in self.nodes:
            total = info(node).param_bytes
            for arg in node.all_input_nodes:
                if arg.op == "get_attr":
                    total += info(arg).param_bytes
            out.append(total)
        return out

    def to_partition_chain(
        self,
        node_costs: Sequence[NodeCost],
        cuts: Sequence[int] | None = None,
        *,
        activation_scale: float = 1.0,
    ) -> Chain:
        """The partitioner's view: costs, parameter and activation bytes, candidate cuts.
        ``activation_scale``: activations (kept and crossing) in another dtype than the graph's
        fp32, such as 0.5 for bf16; parameters stay as they are."""
        costs = self.costs(node_costs)
        positions = self.candidates if cuts is None else tuple(cuts)
        return Chain(
            fwd_ms=tuple(c.fwd_ms for c in costs),
            bwd_ms=tuple(c.bwd_ms for c in costs),
            param_bytes=tuple(self.param_bytes()),
            act_bytes=tuple(round(c.memory_bytes * activation_scale) for c in costs),
            cuts=tuple((p, round(self.live_bytes[p] * activation_scale)) for p in positions),
            peak_bytes=tuple(round(b * activation_scale) for b in self.peak_bytes),
        )


def graph_chain(gm: fx.GraphModule, sizes: dict[str, int], *, max_candidates: int = 128) -> GraphChain:
    """Build the chain of an annotated graph (structure and symbolic passes have run).

    Args:
        gm: the captured graph.
        sizes: symbol values of one micro-batch, ``{"B": 4}`` or ``{"B": 4, "S": 128}``.
        max_candidates: at most this many candidate cuts (the cheapest in each of as many windows).
    """
    nodes = tuple(n for n in gm.graph.nodes if n.op in COMPUTE_OPS)
    n = len(nodes)
    index = {node: p for p, node in enumerate(nodes)}
    values = [v for v in gm.graph.nodes if v.op == "placeholder"] + list(nodes)
    starts: list[list[fx.Node]] = [[] for _ in range(n + 1)]  # live from position p
    ends: list[list[fx.Node]] = [[] for _ in range(n + 2)]  # no longer live from position p
    for v in values:
        first = index[v] + 1 if v in index else 0
        uses = [index[u] if u in index else n for u in v.users]  # the output node uses at the end
        if not uses:
            continue
        last = max(uses)
        if last >= first:
            starts[first].append(v)
            ends[last + 1].append(v)
    live: list[tuple[fx.Node, ...]] = []
    current: dict[fx.Node, None] = {}
    for p in range(n + 1):
        for v in ends[p]:
            current.pop(v, None)
        for v in starts[p]:
            current[v] = None
        live.append(tuple(current))
    size = {v: evaluate(info(v).output_bytes_expr, sizes) for v in values}  # once per value, not per position
    nbytes = tuple(sum(size[v] for v in vs) for vs in live)
    blocked = [any(info(v).tensor_container for v in vs) for vs in live]
    peak = tuple(nbytes[p] + size[node] for p, node in enumerate(nodes))
    flops = [info(node).fwd_flops for node in nodes]
    least = sum(flops) / (HEAVY_SHARE * max_candidates)
    heavy = [f > 0 and f >= least for f in flops]
    candidates = candidate_cuts(nbytes, max_candidates, blocked, heavy)
    return GraphChain(gm, nodes, tuple(live), nbytes, candidates, peak)


# A node is heavy when it holds at least 1 / (HEAVY_SHARE * max_candidates) of the graph's FLOPs.
HEAVY_SHARE = 4


def candidate_cuts(
    nbytes: Sequence[int], max_candidates: int, blocked: Sequence[bool] = (), heavy: Sequence[bool] = ()
) -> tuple[int, ...]:
    """Between every two consecutive ``heavy`` nodes the cheapest position (the later one on
    ties), and the positions whose live bytes are a local minimum; at most ``max_candidates``.

    A block's inside rarely has a local minimum between its heavy nodes (a transformer's
    attention output joins the residual stream only after its projection), yet a balance finer
    than a block needs a cut there. When there are more, the heavy nodes' gaps come first, and
    the local minima fill what is left: each set is divided into as many equal windows as it may
    keep, and each window keeps its smallest cut (the later one on ties). Cuts stay spread along
    the whole chain, which is what balance needs, and each is the cheapest to send in its
    neighbourhood.
    """
    n = len(nbytes) - 1
    free = [p for p in range(1, n) if not (blocked and blocked[p])]
    marks = [p for p in range(n) if heavy and heavy[p]]
    gaps = [[p for p in range(a + 1, b + 1) if not (blocked and blocked[p])]  # after heavy a, up to heavy b
            for a, b in itertools.pairwise(marks)]  # fmt: skip
    between = {min(reversed(gap), key=lambda p: nbytes[p]) for gap in gaps if gap}
    minima = {p for p in free if nbytes[p] <= nbytes[p - 1] and nbytes[p] <= nbytes[p + 1]} - between
    chosen = _spread(sorted(between), nbytes, max_candidates)
    chosen += _spread(sorted(minima), nbytes, max_candidates - len(chosen))
    return tuple(sorted(chosen))


def _spread(positions: Sequence[int], nbytes: Sequence[int], keep: int) -> list[int]:
    """At most ``keep`` of ``positions``: the cheapest in each of ``keep`` equal windows of the chain."""
    if len(positions) <= keep or keep <= 0:
        return list(positions)[: max(keep, 0)]
    n = len(nbytes) - 1
    best: dict[int, int] = {}
    for p in positions:
        window = (p - 1) * keep // (n - 1)
        if window not in best or nbytes[p] <= nbytes[best[window]]:
            best[window] = p
    return sorted(best.values())


# --- momentum: teacher cuts mirroring the student's -----------------------------------------


def _param_split_keys(gc: GraphChain, shared: set[str]) -> list[str]:
    """Per position, a digest of which shared parameters are used before it."""
    acc = 0
    keys = []
    for p in range(gc.n + 1):
        keys.append(f"{acc:032x}")
        if p < gc.n:
            node = gc.nodes[p]
            names = list(info(node).param_names) + [
                name for a in node.all_input_nodes if a.op == "get_attr" for name in info(a).param_names
            ]
            for name in names:
                if name in shared:
                    acc ^= int(hashlib.blake2b(name.encode(), digest_size=16).hexdigest(), 16)
                    shared = shared - {name}  # a tied or reused parameter counts at its first use
    return keys


def mirror_map(
    student: GraphChain, teacher: GraphChain, shared: set[str], positions: Sequence[int]
) -> dict[int, int]:
    """For each student position, the teacher candidate that splits the shared parameters alike.

    Among equal teacher candidates the one with the fewest live bytes wins, the later one on
    ties (module boundaries). Student positions no teacher cut can mirror are left out.
    """
    s_keys = _param_split_keys(student, set(shared))
    t_keys = _param_split_keys(teacher, set(shared))
    best_t: dict[str, int] = {}
    for q in teacher.candidates:
        k = t_keys[q]
        if k not in best_t or teacher.live_bytes[q] <= teacher.live_bytes[best_t[k]]:
            best_t[k] = q
    return {p: best_t[s_keys[p]] for p in positions if s_keys[p] in best_t}


def mirrored_cuts(student: GraphChain, teacher: GraphChain, shared: set[str]) -> list[tuple[int, int]]:
    """Pairs ``(student position, teacher position)`` that split the shared parameters alike.

    Candidates between the same two parameter users differ only by parameter-free nodes (an
    attention's scores, an activation). Where both graphs have as many candidates there (a
    momentum copy's identical graph), they pair in order: a stage may end after a block's
    attention as well as before it. Otherwise one pair per way of splitting the shared
    parameters, the one with the fewest live bytes (the later one on ties). Pairs increase in
    both positions.
    """
    groups: list[dict[str, list[int]]] = [{}, {}]
    for gc, group in zip((student, teacher), groups, strict=True):
        keys = _param_split_keys(gc, set(shared))
        for p in gc.candidates:
            group.setdefault(keys[p], []).append(p)
    pairs: list[tuple[int, int]] = []
    for key, ps in groups[0].items():
        qs = groups[1].get(key, [])
        if len(ps) == len(qs):
            pairs += zip(ps, qs, strict=True)
        elif qs:
            pairs.append((min(reversed(ps), key=lambda p: student.live_bytes[p]),
                          min(reversed(qs), key=lambda q: teacher.live_bytes[q])))  # fmt: skip
    out: list[tuple[int, int]] = []
    for p, q in sorted(pairs):
        if not out or q > out[-1][1]:  # a graph that reorders first uses: keep the increasing chain
            out.append((p, q))
    return out
