"""Per-node profiles of a captured model as data: match a graph, save as JSON, load.

A :class:`Profile` is plain data: the fingerprint it is keyed by (graph, inputs, device, torch
version), one :class:`NodeProfile` per graph node and the whole-model times that show its
fidelity. It never pickles; loading checks every field. :func:`tspipe_fx.profile` makes one,
:func:`tspipe_fx.report.profile.render_profile` tables it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from tspipe_fx.errors import ProfileError
from tspipe_fx.files import read_text, write_text_atomic
from tspipe_fx.passes.fingerprint import graph_fingerprint
from tspipe_fx.passes.meta import META_KEY, NodeInfo
from tspipe_fx.passes.symbolic import SIZES_KEY, input_sizes
from tspipe_fx.tracing import CapturedModel

__all__ = ["InputSpec", "NodeProfile", "Profile", "format_inputs", "input_specs"]

FORMAT_VERSION = 1


@dataclass(frozen=True)
class InputSpec:
    """Name, shape and dtype of one flat graph input."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class NodeProfile:
    """One node: its identity in the graph and what the passes recorded for it."""

    name: str
    op: str
    target: str
    info: NodeInfo


@dataclass(frozen=True)
class Profile:
    """Measured per-node costs of one graph, on one device, for one input signature.

    Example:
        >>> prof = tspipe_fx.profile(model, (x,), repeats=3)
        >>> print(prof.report(by="module", top=10))
        >>> prof.save("resnet18.json"); Profile.load("resnet18.json") == prof
        True
    """

    model_name: str
    graph_hash: str
    inputs: tuple[InputSpec, ...]
    device_name: str
    torch_version: str
    repeats: int
    model_fwd_ms: float  # whole captured model, grad enabled, median
    model_fwd_bwd_ms: float  # whole model forward + backward, median
    nodes: tuple[NodeProfile, ...]
    launch_us: float = 0.0  # the host's cost per operation on this device (0: not measured)
    launch_bwd_us: float = 0.0  # the host's cost per backward operation (0: launch_us's)

    # --- derived figures -------------------------------------------------------------------

    @property
    def sizes(self) -> dict[str, int]:
        """Symbol values of the example: ``{"B": batch, "S": sequence}``."""
        return input_sizes(
            [torch.empty(i.shape, dtype=getattr(torch, i.dtype), device="meta") for i in self.inputs]
        )

    @property
    def sum_fwd_ms(self) -> float:
        return sum(n.info.fwd_ms or 0.0 for n in self.nodes)

    @property
    def sum_bwd_ms(self) -> float:
        return sum(n.info.bwd_ms or 0.0 for n in self.nodes)

    @property
    def fidelity_fwd(self) -> float:
        """Sum of node forward times / measured whole-model forward time."""
        return self.sum_fwd_ms / self.model_fwd_ms if self.model_fwd_ms else float("nan")

    @property
    def fidelity_fwd_bwd(self) -> float:
        """Sum of node forward+backward times / measured whole-model forward+backward time."""
        total = self.sum_fwd_ms + self.sum_bwd_ms
        return total / self.model_fwd_bwd_ms if self.model_fwd_bwd_ms else float("nan")

    # --- matching a graph ------------------------------------------------------------------

    def check(
        self, graph: fx.GraphModule | CapturedModel, inputs: Sequence[torch.Tensor] | None = None
    ) -> None:
        """Raise :class:`ProfileError` unless this profile was made for ``graph`` (and ``inputs``)."""
        gm = graph.graph_module if isinstance(graph, CapturedModel) else graph
        got = graph_fingerprint(gm)
        if got != self.graph_hash:
            raise ProfileError(
                f"profile of {self.model_name} (graph {self.graph_hash}) does not match this graph "
                f"({got}, {len(gm.graph.nodes)} nodes vs {len(self.nodes)} profiled); hint: profile "
                "this model again, or capture it exactly as it was profiled"
            )
        if inputs is not None:
            specs = input_specs(gm, inputs)
            if specs != self.inputs:
                raise ProfileError(
                    f"profile of {self.model_name} was made for inputs {format_inputs(self.inputs)}, "
                    f"got {format_inputs(specs)}; hint: profile again with these inputs, or let a "
                    "symbolic cost model scale the profile to this batch size"
                )

    def attach(self, graph: fx.GraphModule | CapturedModel) -> fx.GraphModule:
        """Check ``graph`` matches, then write each node's recorded info into its ``node.meta``."""
        self.check(graph)
        gm = graph.graph_module if isinstance(graph, CapturedModel) else graph
        for node, rec in zip(gm.graph.nodes, self.nodes, strict=True):
            node.meta[META_KEY] = rec.info
        gm.meta[SIZES_KEY] = self.sizes
        return gm

    # --- JSON ------------------------------------------------------------------------------

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["format_version"] = FORMAT_VERSION
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Profile:
        try:
            data = json.loads(text)
            if data.pop("format_version", None) != FORMAT_VERSION:
                raise ValueError(f"format_version is not {FORMAT_VERSION}")
            nodes = tuple(
                NodeProfile(n["name"], n["op"], n["target"], _node_info(n["info"])) for n in data.pop("nodes")
            )
            inputs = tuple(InputSpec(i["name"], tuple(i["shape"]), i["dtype"]) for i in data.pop("inputs"))
            return cls(nodes=nodes, inputs=inputs, **data)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ProfileError(
                f"not a tspipe_fx profile (format {FORMAT_VERSION}): {type(e).__name__}: {e}; hint: "
                "the file is corrupted or was written by another version: profile the model again"
            ) from None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write JSON atomically: a crash leaves the old file or the new one, never half of one."""
        write_text_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Profile:
        return cls.from_json(read_text(path, "profile", ProfileError))


def _node_info(data: dict[str, Any]) -> NodeInfo:
    fields = {f.name for f in dataclasses.fields(NodeInfo)}
    unknown = set(data) - fields
    if unknown:
        raise KeyError(f"unknown node fields {sorted(unknown)}")
    data = dict(data, param_names=tuple(data.get("param_names", ())))
    return NodeInfo(**data)


def format_inputs(specs: Sequence[InputSpec]) -> str:
    return ", ".join(f"{s.name}[{'x'.join(map(str, s.shape))}]:{s.dtype}" for s in specs)


def input_specs(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> tuple[InputSpec, ...]:
    names = [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
    return tuple(
        InputSpec(name, tuple(x.shape), str(x.dtype).removeprefix("torch."))
        for name, x in zip(names, inputs, strict=False)
    )
