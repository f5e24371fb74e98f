"""The splitter: cut positions of a chain -> one ``fx.GraphModule`` per stage.

Stage ``k`` holds chain nodes ``[cuts[k-1], cuts[k])``. Its inputs are the live set at its first
cut (stage 0: the graph's inputs), its outputs the live set at its last cut (the last stage: the
graph's outputs, in order); a value that only passes through goes from input to output. Node
names and ``node.meta`` are kept. Each stage's attributes are the original module's own
objects (``fx.GraphModule`` copies references), so parameters stay the user's tensors.

A parameter read in several stages (a tied weight) is referenced by each of them
(:func:`tspipe_fx.stage.tie_groups` reports it). Each stage records the inputs an in-place op
writes (:func:`tspipe_fx.passes.mutation.written_inputs`), found here once. Every name of a tensor (tied aliases, parameters no node reads) lands in some stage, so the
union of the stages' ``state_dict`` keys is the model's.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import nn

from tspipe_fx.errors import TspipeError
from tspipe_fx.passes.chain import GraphChain
from tspipe_fx.passes.meta import info
from tspipe_fx.passes.mutation import written_inputs
from tspipe_fx.stage import Stage, copy_buffer_persistence, tensors_by_id

__all__ = ["split"]


def split(gc: GraphChain, cuts: Sequence[int], *, name: str = "Stage") -> list[Stage]:
    """Cut ``gc``'s graph at chain positions ``cuts`` (increasing, within ``1..n-1``)."""
    bounds = [0, *cuts, gc.n]
    if any(b <= a for a, b in itertools.pairwise(bounds)) or (cuts and not 0 < cuts[0]):
        raise TspipeError(f"cuts must increase strictly within 1..{gc.n - 1}, got {list(cuts)}")
    for p in cuts:
        held = [v.name for v in gc.live[p] if info(v).tensor_container]
        if held:
            raise TspipeError(
                f"a cut before node {gc.nodes[p].name!r} (position {p}) would send {held}, tuples of "
                "tensors, between stages; hint: cut after the getitem nodes that unpack them"
            )
    graph_inputs = tuple(n for n in gc.gm.graph.nodes if n.op == "placeholder")
    output_node = next(n for n in gc.gm.graph.nodes if n.op == "output")
    final = tuple(fx.node.map_arg(output_node.args[0], lambda n: n))
    stages = []
    for k in range(len(bounds) - 1):
        ins = graph_inputs if k == 0 else gc.live[bounds[k]]
        last = k == len(bounds) - 2
        outs = final if last else gc.live[bounds[k + 1]]
        stages.append(_stage(gc, ins, gc.nodes[bounds[k] : bounds[k + 1]], outs, f"{name}{k}", as_tuple=last))
    _place_unread_attributes(gc.gm, [s.module for s in stages])
    for s in stages:
        copy_buffer_persistence(gc.gm, s.module)
    return stages


def _stage(
    gc: GraphChain,
    ins: Sequence[fx.Node],
    nodes: Sequence[fx.Node],
    outs: Sequence[fx.Node],
    class_name: str,
    *,
    as_tuple: bool,
) -> Stage:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for v in ins:
        env[v] = graph.placeholder(v.name)
        env[v].meta = dict(v.meta)

    def lookup(v: fx.Node) -> fx.Node:
        if v not in env:
            if v.op != "get_attr":
                raise TspipeError(f"{class_name}: node {v.name!r} is used before it is made or received")
            env[v] = graph.get_attr(str(v.target))
            env[v].meta = dict(v.meta)
        return env[v]

    for node in nodes:
        env[node] = graph.node_copy(node, lookup)
    graph.output(tuple(lookup(v) for v in outs))
    graph.lint()
    module = fx.GraphModule(gc.gm, graph, class_name=class_name)
    return Stage(
        module,
        tuple(v.name for v in ins),
        tuple(v.name for v in outs),
        tuple(n.name for n in nodes),
        frozenset(written_inputs(module)),
    )


def _set_attr(module: nn.Module, dotted: str, value: torch.Tensor) -> None:
    *path, leaf = dotted.split(".")
    for atom in path:
        if not hasattr(module, atom):
            module.add_module(atom, nn.Module())
        module = getattr(module, atom)
    if isinstance(value, nn.Parameter):
        module.register_parameter(leaf, value)
    else:
        module.register_buffer(leaf, value)


def _place_unread_attributes(root: nn.Module, stages: Sequence[nn.Module]) -> None:
    """Give every name of the root's tensors a home: aliases beside their tensor, the rest last."""
    root_names = tensors_by_id(root)
    lookup = {
        name: t
        for name, t in [
            *root.named_parameters(remove_duplicate=False),
            *root.named_buffers(remove_duplicate=False),
        ]
    }
    placed: set[int] = set()
    for stage in stages:
        present = tensors_by_id(stage)
        for tid, names in present.items():
            placed.add(tid)
            for alias in root_names.get(tid, []):
                if alias not in names:
                    _set_attr(stage, alias, lookup[alias])
    for tid, names in root_names.items():
        if tid not in placed:
            for name in names:
                _set_attr(stages[-1], name, lookup[name])
