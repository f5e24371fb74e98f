"""Measure pass: forward and backward time of every node, from real runs on the target device.

Each node is run in isolation on the values the graph computed for it (an ``fx.Interpreter``
walks the graph once to produce them). Its inputs become detached leaves that require grad
exactly where the real training graph would, so the timed forward builds the same autograd
graph and the timed backward (``torch.autograd.grad`` with ``retain_graph``) computes the same
input and parameter gradients. Warm-up runs first (the first one also counts saved bytes and backward FLOPs), then the median of ``repeats`` timed runs;
CUDA events on a GPU, ``perf_counter`` elsewhere.

Also recorded: whether the node lies on the gradient path, the FLOPs of its backward
(``FlopCounterMode``) and the activation bytes autograd saves for its backward (saved-tensor
hooks; parameters excluded: they are counted as parameters).

The pass runs the graph for real: buffers such as BatchNorm statistics change. Run it on a
copy (:func:`tspipe_fx.profile` does).
"""

from __future__ import annotations

import operator
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._pytree import tree_leaves, tree_map_only
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from tspipe_fx.errors import ProfileError
from tspipe_fx.meta import update

__all__ = ["Timer", "annotate_measured", "may_mutate"]

_INPLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
    operator.ilshift, operator.irshift, operator.imatmul, operator.setitem,
}  # fmt: skip


class Timer:
    """Median wall time of a callable on one device, in milliseconds.

    On CUDA, ``hide_host=True`` times the device's work alone, as it runs inside a whole model
    whose kernels queue back to back: a spin kernel long enough to cover the host's launch goes
    first, so the start event fires only once the call's kernels are queued. Timing each
    isolated node from an idle device made it pay its launch latency on top of its work (on an
    H100 the node sums of a ViT-L came to 1.35x its measured forward, of a ResNet-152 2.4x);
    taking the slower of host and device time per node was worse still (2.05x for the
    ResNet-152: an isolated call's host time is far above its share inside a model). See
    ``benchmarks/README.md``, GPU section.
    """

    def __init__(self, device: torch.device | str, *, hide_host: bool = False):
        self.device = torch.device(device)
        self.hide_host = hide_host and self.device.type == "cuda"
        self._cycles_per_ms = 0.0
        self._host_ms = 0.0

    def median_ms(
        self, fn: Callable[[], Any], *, repeats: int, warmup: int, setup: Callable[[], Any] | None = None
    ) -> float:
        """Run ``fn`` ``warmup`` times, then time ``repeats`` runs; ``setup`` runs untimed before each."""
        self._host_ms = 0.0
        for _ in range(warmup):
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            fn()
            self._host_ms = max(self._host_ms, (time.perf_counter() - t0) * 1e3)
        samples = []
        for _ in range(repeats):
            if setup is not None:
                setup()
            samples.append(self.once(fn))
        return statistics.median(samples)

    def once(self, fn: Callable[[], Any]) -> float:
        """Milliseconds of one call of ``fn`` (no warm-up)."""
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            torch.cuda.synchronize(self.device)
            if self.hide_host:
                torch.cuda._sleep(self._spin_cycles())  # type: ignore[no-untyped-call]
            start.record()
            t0 = time.perf_counter()
            fn()
            end.record()
            self._host_ms = max(self._host_ms, (time.perf_counter() - t0) * 1e3)
            torch.cuda.synchronize(self.device)
            return float(start.elapsed_time(end))
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def _spin_cycles(self) -> int:
        """Clock cycles of spin that outlast the host time of one call (twice it, 50 us at least)."""
        if not self._cycles_per_ms:
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            start.record()
            torch.cuda._sleep(10_000_000)  # type: ignore[no-untyped-call]
            end.record()
            torch.cuda.synchronize(self.device)
            self._cycles_per_ms = 10_000_000 / max(float(start.elapsed_time(end)), 1e-3)
        return int(self._cycles_per_ms * max(2 * self._host_ms, 0.05))


def may_mutate(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether running ``node`` may write to its inputs (then each timed run gets clones)."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(str(node.target)), "inplace", False))
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            return bool(target._schema.is_mutable)
        if target in _INPLACE_OPERATORS:
            return True
        name = getattr(target, "__name__", "")
        return name.endswith("_") and not name.endswith("__")
    return False


class _Measure(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, timer: Timer, repeats: int, warmup: int, bar: Any):
        super().__init__(gm)
        self.gm = gm
        self.timer = timer
        self.repeats = repeats
        self.warmup = warmup
        self.bar = bar
        self.grad_path: set[fx.Node] = set()
        self.param_ptrs = {p.data_ptr() for p in gm.parameters()}

    def run_node(self, n: fx.Node) -> Any:
        self.bar.update(1)
        if n.op in ("placeholder", "output", "get_attr"):
            out = super().run_node(n)
            on_path = n.op == "get_attr" and isinstance(out, torch.Tensor) and out.requires_grad
            if on_path:
                self.grad_path.add(n)
            update(n, on_grad_path=on_path, fwd_ms=0.0, bwd_ms=0.0)
            return out
        try:
            return self._measure(n)
        except Exception as e:
            raise ProfileError(
                f"profiling failed at node {n.name!r} ({n.op} {n.target}): {type(e).__name__}: {e}"
            ) from e

    def _inputs(self, n: fx.Node, clone: bool) -> tuple[Any, Any, list[torch.Tensor]]:
        """Detached copies of the node's inputs, requiring grad where training would.

        Returns ``(args, kwargs, leaves)``: ``leaves`` are the tensors gradients are taken
        for; with ``clone`` the node gets clones of them, so in-place ops stay legal.
        """
        leaves: list[torch.Tensor] = []

        def leaf(t: torch.Tensor, grad: bool) -> torch.Tensor:
            t = t.detach()
            if grad and (t.is_floating_point() or t.is_complex()):
                t.requires_grad_()
                leaves.append(t)
            if not clone:
                return t
            with torch.enable_grad():  # the clone must be part of the autograd graph
                return t.clone()

        def prep(p: fx.Node) -> Any:
            return tree_map_only(torch.Tensor, lambda t: leaf(t, p in self.grad_path), self.env[p])

        return fx.node.map_arg(n.args, prep), fx.node.map_arg(n.kwargs, prep), leaves

    def _call(self, n: fx.Node, args: Any, kwargs: Any) -> Any:
        return getattr(self, n.op)(n.target, args, kwargs)

    def _measure(self, n: fx.Node) -> Any:
        mutates = may_mutate(n, self.gm)
        box: dict[str, Any] = {}

        def setup() -> None:
            box["in"] = self._inputs(n, clone=mutates)

        def forward() -> None:
            args, kwargs, _ = box["in"]
            with torch.enable_grad():
                box["out"] = self._call(n, args, kwargs)

        # The first warm-up run also counts the activations saved for backward.
        saved: dict[tuple[int, tuple[int, ...]], int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.data_ptr() not in self.param_ptrs:
                saved[(t.data_ptr(), tuple(t.shape))] = t.numel() * t.element_size()
            return t

        setup()
        with saved_tensors_hooks(pack, lambda t: t):
            forward()
        rest = max(self.warmup - 1, 0)
        fwd_ms = self.timer.median_ms(forward, repeats=self.repeats, warmup=rest, setup=setup)
        out = box["out"]
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
        bwd_ms, bwd_flops = 0.0, 0
        if outs:
            self.grad_path.add(n)
            wrt = list(box["in"][2])
            if n.op == "call_module":
                wrt += [p for p in self.module.get_submodule(str(n.target)).parameters() if p.requires_grad]
            if wrt:
                grads = [torch.ones_like(t) for t in outs]

                def backward() -> None:
                    torch.autograd.grad(outs, wrt, grads, retain_graph=True, allow_unused=True)

                with FlopCounterMode(display=False) as counter:  # the first warm-up run
                    backward()
                bwd_flops = counter.get_total_flops()
                bwd_ms = self.timer.median_ms(backward, repeats=self.repeats, warmup=rest)
        update(
            n,
            on_grad_path=bool(outs),
            fwd_ms=fwd_ms,
            bwd_ms=bwd_ms,
            bwd_flops=bwd_flops,
            saved_bytes=sum(saved.values()) if outs else 0,
        )
        if mutates:  # the real mutation, on the real values, as the model would do it
            return self._call(n, *fx.node.map_arg((n.args, n.kwargs), lambda p: self.env[p]))
        return tree_map_only(torch.Tensor, lambda t: t.detach(), out)


def annotate_measured(
    gm: fx.GraphModule,
    inputs: list[torch.Tensor],
    *,
    repeats: int = 5,
    warmup: int = 1,
    progress: bool = False,
) -> fx.GraphModule:
    """Write ``fwd_ms``, ``bwd_ms``, ``bwd_flops``, ``saved_bytes`` and ``on_grad_path``.

    ``gm`` and ``inputs`` must be on the device to measure; ``gm`` should be a copy (see above).
    """
    device = inputs[0].device if inputs else torch.device("cpu")
    nodes = len(gm.graph.nodes)
    with tqdm(total=nodes, desc="profiling nodes", disable=not progress, leave=False) as bar:
        with torch.no_grad():
            _Measure(gm, Timer(device, hide_host=True), repeats, warmup, bar).run(*inputs)
    return gm
