"""Per-node profiles of a captured model: measure, save as JSON, load, match and report.

A :class:`Profile` is plain data: the fingerprint it is keyed by (graph, inputs, device, torch
version), one :class:`NodeProfile` per graph node and the whole-model times that show its
fidelity. It never pickles; loading checks every field.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.fx as fx
from tabulate import tabulate
from torch import nn

from tspipe_fx.capture import CapturedModel, capture
from tspipe_fx.errors import ProfileError
from tspipe_fx.files import write_text_atomic
from tspipe_fx.meta import META_KEY, NodeInfo, info
from tspipe_fx.passes import annotate_measured, annotate_structure, annotate_symbolic
from tspipe_fx.passes.measure import Timer
from tspipe_fx.passes.symbolic import SIZES_KEY, input_sizes

__all__ = ["InputSpec", "NodeProfile", "Profile", "graph_fingerprint", "profile"]

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
            specs = _input_specs(gm, inputs)
            if specs != self.inputs:
                raise ProfileError(
                    f"profile of {self.model_name} was made for inputs {_fmt_inputs(self.inputs)}, "
                    f"got {_fmt_inputs(specs)}; hint: profile again with these inputs, or let a "
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
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ProfileError(f"cannot read profile {path}: {e}") from None
        return cls.from_json(text)

    # --- report ----------------------------------------------------------------------------

    def report(
        self, by: Literal["module", "node"] = "module", *, top: int | None = None, depth: int | None = None
    ) -> str:
        """Cost table as a string: per module (at ``depth``, automatic if None) or per node.

        ``top`` keeps the N most expensive rows (by forward+backward time); otherwise rows
        come in graph order.
        """
        if by not in ("module", "node"):
            raise ProfileError(f"report(by=...) must be 'module' or 'node', got {by!r}")
        rows = self._node_rows() if by == "node" else self._module_rows(depth)
        if top is not None:
            rows = sorted(rows, key=lambda r: -(r[-6] + r[-5]))[:top]
        headers = (["node", "op", "module"] if by == "node" else ["module", "type", "nodes"]) + [
            "fwd ms", "bwd ms", "GFLOP fwd", "params MB", "out MB", "saved MB",
        ]  # fmt: skip
        table = tabulate(rows, headers=headers, floatfmt=".3f", intfmt=",")
        return f"{table}\n{self.summary()}"

    def summary(self) -> str:
        """Totals and fidelity, one line each."""
        gflops = sum(n.info.fwd_flops for n in self.nodes) / 1e9
        params = sum(n.info.param_bytes for n in self.nodes) / 2**20
        return "\n".join(
            [
                f"{self.model_name} on {self.device_name} (torch {self.torch_version}), inputs "
                f"{_fmt_inputs(self.inputs)}: {len(self.nodes)} nodes, {gflops:.3f} GFLOP fwd, "
                f"{params:.1f} MB params",
                f"forward:          sum of nodes {self.sum_fwd_ms:9.3f} ms, whole model "
                f"{self.model_fwd_ms:9.3f} ms, fidelity {self.fidelity_fwd:.2f}",
                f"forward+backward: sum of nodes {self.sum_fwd_ms + self.sum_bwd_ms:9.3f} ms, whole model "
                f"{self.model_fwd_bwd_ms:9.3f} ms, fidelity {self.fidelity_fwd_bwd:.2f}",
            ]
        )

    def _node_rows(self) -> list[list[Any]]:
        return [
            [n.name, n.op, n.info.module_path, *_figures([n.info])]
            for n in self.nodes
            if n.op not in ("placeholder", "output")
        ]

    def _module_rows(self, depth: int | None) -> list[list[Any]]:
        paths = [n.info.module_path for n in self.nodes if n.op not in ("placeholder", "output")]
        if depth is None:
            depth = _auto_depth(paths)
        groups: dict[str, list[NodeInfo]] = {}
        types: dict[str, set[str]] = {}
        for n in self.nodes:
            if n.op in ("placeholder", "output"):
                continue
            key = ".".join(n.info.module_path.split(".")[:depth]) if n.info.module_path else "(top)"
            groups.setdefault(key, []).append(n.info)
            if n.info.module_path.count(".") + 1 == len(key.split(".")):
                types.setdefault(key, set()).add(n.info.module_type)
        return [
            [key, ",".join(sorted(types.get(key, set()) - {""})), len(infos), *_figures(infos)]
            for key, infos in groups.items()
        ]


def _figures(infos: Sequence[NodeInfo]) -> list[float]:
    return [
        sum(i.fwd_ms or 0.0 for i in infos),
        sum(i.bwd_ms or 0.0 for i in infos),
        sum(i.fwd_flops for i in infos) / 1e9,
        sum(i.param_bytes for i in infos) / 2**20,
        sum(i.output_bytes for i in infos) / 2**20,
        sum(i.saved_bytes for i in infos) / 2**20,
    ]


def _auto_depth(paths: Sequence[str], max_rows: int = 40) -> int:
    """The deepest module level (up to 6) that still gives at most ``max_rows`` groups."""
    best = 1
    for depth in range(1, 7):
        if len({".".join(p.split(".")[:depth]) for p in paths}) <= max_rows:
            best = depth
    return best


def _node_info(data: dict[str, Any]) -> NodeInfo:
    fields = {f.name for f in dataclasses.fields(NodeInfo)}
    unknown = set(data) - fields
    if unknown:
        raise KeyError(f"unknown node fields {sorted(unknown)}")
    data = dict(data, param_names=tuple(data.get("param_names", ())))
    return NodeInfo(**data)


def _fmt_inputs(specs: Sequence[InputSpec]) -> str:
    return ", ".join(f"{s.name}[{'x'.join(map(str, s.shape))}]:{s.dtype}" for s in specs)


def _target_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    module = getattr(target, "__module__", None) or ""
    return f"{module}.{getattr(target, '__qualname__', getattr(target, '__name__', repr(target)))}"


def graph_fingerprint(gm: fx.GraphModule) -> str:
    """A hash of the graph's structure: ops, targets and how nodes feed each other."""
    index: dict[fx.Node, int] = {}
    rows = []
    for i, n in enumerate(gm.graph.nodes):
        index[n] = i
        args = fx.node.map_arg((n.args, n.kwargs), lambda a: f"%{index[a]}")
        rows.append([n.op, _target_name(n.target), repr(args)])
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def _input_specs(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> tuple[InputSpec, ...]:
    names = [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
    return tuple(
        InputSpec(name, tuple(x.shape), str(x.dtype).removeprefix("torch."))
        for name, x in zip(names, inputs, strict=False)
    )


def device_name(device: torch.device) -> str:
    """A human name of the device: the GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or device.type


def _resolve_device(device: torch.device | str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ProfileError(f"not a device: {device!r} ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ProfileError(
                f"cannot profile on {dev}: torch.cuda.is_available() is False; hint: device='cpu'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ProfileError(f"cannot profile on {dev}: only {torch.cuda.device_count()} CUDA devices")
    elif dev.type != "cpu":
        raise ProfileError(f"cannot profile on {dev}: only 'cpu' and 'cuda' devices are supported")
    return dev


def profile(
    model: nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor,
    *,
    example_kwargs: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    repeats: int = 5,
    warmup: int = 1,
    progress: bool | None = None,
) -> Profile:
    """Measure every node of ``model`` (captured first if it is a plain module).

    Works on a deep copy on ``device``, with the RNG forked: the user's parameters, buffers,
    ``.grad`` and train/eval flags are untouched.

    Args:
        model: an ``nn.Module`` or a :class:`CapturedModel`.
        example_inputs: positional arguments of one training batch.
        example_kwargs: keyword arguments of that call.
        device: where to measure (``"cpu"``, ``"cuda:0"``).
        repeats: timed runs per node; the median is kept.
        warmup: untimed runs per node before timing.
        progress: show a progress bar (default: when stderr is a terminal).

    Example:
        >>> prof = profile(timm.create_model("resnet18"), (torch.randn(8, 3, 224, 224),))
        >>> prof.fidelity_fwd_bwd  # doctest: +SKIP
        0.97
    """
    if repeats < 1 or warmup < 0:
        raise ProfileError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    dev = _resolve_device(device)
    devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"):
        captured, gm, inputs, fwd_ms, fwd_bwd_ms = _profile(
            model, example_inputs, example_kwargs, dev, repeats, warmup, progress
        )
    return Profile(
        model_name=captured.model_name,
        graph_hash=graph_fingerprint(captured.graph_module),
        inputs=_input_specs(gm, inputs),
        device_name=device_name(dev),
        torch_version=torch.__version__,
        repeats=repeats,
        model_fwd_ms=fwd_ms,
        model_fwd_bwd_ms=fwd_bwd_ms,
        nodes=tuple(NodeProfile(n.name, n.op, _target_name(n.target), info(n)) for n in gm.graph.nodes),
    )


def _profile(
    model: nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor,
    example_kwargs: dict[str, Any] | None,
    dev: torch.device,
    repeats: int,
    warmup: int,
    progress: bool | None,
) -> tuple[CapturedModel, fx.GraphModule, list[torch.Tensor], float, float]:
    if isinstance(model, CapturedModel):
        captured = model
    elif isinstance(model, nn.Module):
        captured = capture(model, example_inputs, example_kwargs=example_kwargs)
    else:
        raise ProfileError(f"profile() needs an nn.Module or a CapturedModel, got {type(model).__name__}")
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    flat = captured.flatten_inputs(args, example_kwargs or {})
    gm = copy.deepcopy(captured.graph_module).to(dev)
    inputs = [x.to(dev) for x in flat]
    show = sys.stderr.isatty() if progress is None else progress
    fwd_ms, fwd_bwd_ms = _whole_model_ms(gm, inputs, captured.model_name, repeats, max(warmup, 1))
    annotate_structure(gm)
    annotate_symbolic(gm, inputs)
    annotate_measured(gm, inputs, repeats=repeats, warmup=warmup, progress=show)
    return captured, gm, inputs, fwd_ms, fwd_bwd_ms


def _whole_model_ms(
    gm: fx.GraphModule, inputs: list[torch.Tensor], name: str, repeats: int, warmup: int
) -> tuple[float, float]:
    """Median forward and forward+backward time of the whole graph (the fidelity reference)."""
    timer = Timer(inputs[0].device)
    try:
        with torch.enable_grad():
            gm(*inputs)
    except Exception as e:
        shapes = ", ".join(f"{tuple(x.shape)}:{x.dtype}" for x in inputs)
        raise ProfileError(
            f"the example inputs ({shapes}) do not fit {name}: {type(e).__name__}: {e}; "
            "hint: check the batch's shape and dtype against what the model expects"
        ) from e

    def forward() -> None:
        with torch.enable_grad():
            gm(*inputs)

    def forward_backward() -> None:
        with torch.enable_grad():
            outs = [t for t in gm(*inputs) if isinstance(t, torch.Tensor) and t.requires_grad]
            if outs:
                torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])
        for p in gm.parameters():
            p.grad = None

    # Warm up with full steps (the first backward allocates the gradients), then alternate the
    # two measurements so that drifts in machine load hit both alike.
    timer.median_ms(forward_backward, repeats=1, warmup=warmup)
    fwd, fwd_bwd = [], []
    for _ in range(repeats):
        fwd.append(timer.median_ms(forward, repeats=1, warmup=0))
        fwd_bwd.append(timer.median_ms(forward_backward, repeats=1, warmup=0))
    return statistics.median(fwd), statistics.median(fwd_bwd)
