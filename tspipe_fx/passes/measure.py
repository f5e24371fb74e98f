"""Measure pass: forward and backward time of every node, from real runs on the target device.

Each node is run in isolation on the values the graph computed for it (an ``fx.Interpreter``
walks the graph once to produce them). Its inputs become detached leaves that require grad
exactly where the real training graph would, so the timed forward builds the same autograd
graph and the timed backward (``torch.autograd.grad`` with ``retain_graph``) computes the same
input and parameter gradients. Warm-up runs first, then the median of ``repeats`` timed runs;
CUDA events on a GPU, ``perf_counter`` elsewhere; one more forward counts the saved bytes.

Also recorded: whether the node lies on the gradient path, the FLOPs of its backward
(``FlopCounterMode``), the ATen operations of its forward and backward (:class:`OpCount`: on a
GPU, kernel launches) and the activation bytes autograd saves for its backward (saved-tensor
hooks; each storage once over the graph, at the first node that saves it; parameters excluded:
they are counted as parameters).

The pass runs the graph for real: buffers such as BatchNorm statistics change. Run it on a
copy (:func:`tspipe_fx.profile` does).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map_only
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

import tspipe_fx.passes.flop_formulas  # noqa: F401  (attention FLOPs on the CPU)
from tspipe_fx.errors import ProfileError
from tspipe_fx.passes.meta import update
from tspipe_fx.passes.mutation import may_mutate
from tspipe_fx.passes.timer import Timer

__all__ = ["OpCount", "annotate_measured"]


class OpCount(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Counts the ATen operations dispatched within it (on a GPU, each launches kernels)."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func not in VIEWS:  # metadata only: no kernel
            self.count += 1
        return func(*args, **(kwargs or {}))


VIEWS = {torch.ops.aten.view.default, torch.ops.aten.t.default, torch.ops.aten.detach.default,
         torch.ops.aten.transpose.int, torch.ops.aten.permute.default, torch.ops.aten.expand.default,
         torch.ops.aten._unsafe_view.default, torch.ops.aten.unsqueeze.default, torch.ops.aten.squeeze.dim,
         torch.ops.aten.select.int, torch.ops.aten.slice.Tensor, torch.ops.aten.as_strided.default,
         torch.ops.aten.alias.default}  # fmt: skip


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
        self.saved: dict[int, torch.Tensor] = {}  # storages saved for backward so far, by address

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

        fwd_ms = self.timer.median_ms(forward, repeats=self.repeats, warmup=self.warmup, setup=setup)
        # One more run, whose output the graph walk keeps, counts the storages saved for backward
        # that no earlier node saved (the producer that saves its output and the consumer that
        # saves its input hold one storage): each storage once, at the first node saving it.
        saved, mine = 0, set()

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal saved
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            mine.add(ptr)
            if ptr not in self.param_ptrs and ptr not in self.saved:
                self.saved[ptr] = t  # kept alive: its address is not reused by a later node
                saved += storage.nbytes()
            return t

        setup()
        with saved_tensors_hooks(pack, lambda t: t), OpCount() as fwd_ops:
            forward()
        rest = max(self.warmup - 1, 0)
        out = box["out"]
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
        bwd_ms, bwd_flops, bwd_ops = 0.0, 0, OpCount()
        if outs:
            self.grad_path.add(n)
            wrt = list(box["in"][2])
            if n.op == "call_module":
                wrt += [p for p in self.module.get_submodule(str(n.target)).parameters() if p.requires_grad]
            if wrt:
                grads = [torch.ones_like(t) for t in outs]

                def backward() -> None:
                    torch.autograd.grad(outs, wrt, grads, retain_graph=True, allow_unused=True)

                with FlopCounterMode(display=False) as counter, bwd_ops:  # the first warm-up run
                    backward()
                bwd_flops = counter.get_total_flops()
                bwd_ms = self.timer.median_ms(backward, repeats=self.repeats, warmup=rest)
        update(
            n,
            on_grad_path=bool(outs),
            fwd_ms=fwd_ms,
            bwd_ms=bwd_ms,
            bwd_flops=bwd_flops,
            saved_bytes=saved if outs else 0,
            fwd_ops=fwd_ops.count,
            bwd_ops=bwd_ops.count,
        )
        if mutates:  # the real mutation, on the real values, as the model would do it
            real = self._call(n, *fx.node.map_arg((n.args, n.kwargs), lambda p: self.env[p]))
            for ran, kept in zip(tree_leaves(out), tree_leaves(real), strict=False):  # saved: counted
                if isinstance(ran, torch.Tensor) and ran.untyped_storage().data_ptr() in mine:
                    self.saved.setdefault(kept.untyped_storage().data_ptr(), kept)
            return real
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
