"""Symbolic pass: FLOPs and output bytes of every node as sympy expressions of batch size.

One run of the graph on fake tensors (no memory, no compute) whose batch dimension, and the
sequence dimension of integer (token) inputs, are symbolic. ``torch.utils.flop_counter``'s own
formulas then produce expressions such as ``2*B*S**2*64 + ...`` instead of numbers, so costs at
another batch size (a micro-batch) need no new profiling: :func:`evaluate` substitutes it.

Symbols: ``B`` the batch size, ``S`` the sequence length (only where the inputs have one).
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Sequence
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeCopyMode, FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

import tspipe_fx.passes.flop_formulas  # noqa: F401  (attention FLOPs on the CPU)
from tspipe_fx.passes.meta import update
from tspipe_fx.passes.mutation import may_mutate

__all__ = [
    "BATCH",
    "SEQ",
    "SIZES_KEY",
    "annotate_symbolic",
    "evaluate",
    "input_sizes",
]

log = logging.getLogger(__name__)

BATCH = sympy.Symbol("B", positive=True, integer=True)
SEQ = sympy.Symbol("S", positive=True, integer=True)
SIZES_KEY = "tspipe_sizes"  # gm.meta: the example's {"B": ..., "S": ...} this pass ran on


def input_sizes(inputs: Sequence[torch.Tensor]) -> dict[str, int]:
    """The example's values of the symbols: ``{"B": batch, "S": sequence length}``."""
    sizes: dict[str, int] = {}
    for x in inputs:
        if x.dim() >= 1:
            sizes.setdefault("B", x.shape[0])
        if _has_seq(x):
            sizes.setdefault("S", x.shape[1])
    return sizes


def _has_seq(x: torch.Tensor) -> bool:
    return x.dim() >= 2 and not x.is_floating_point() and not x.is_complex()


def evaluate(expr: str, sizes: dict[str, int]) -> int:
    """Evaluate an expression of ``B``/``S`` (as written by this pass) at ``sizes``."""
    return _at(expr, sizes.get("B", 1), sizes.get("S", 1))


@functools.lru_cache(maxsize=65536)
def _at(expr: str, batch: int, seq: int) -> int:
    """``expr`` parsed once and evaluated (a graph asks for the same few expressions many times)."""
    return int(sympy.sympify(expr, locals={"B": BATCH, "S": SEQ}).subs({BATCH: batch, SEQ: seq}))


class _Interpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.flops: dict[fx.Node, Any] = {}
        self.out_bytes: dict[fx.Node, Any] = {}
        self.container: dict[fx.Node, bool] = {}
        self.view: dict[fx.Node, bool] = {}

    def run_node(self, n: fx.Node) -> Any:
        with FlopCounterMode(display=False) as counter:
            out = super().run_node(n)
        if n.op in ("call_module", "call_function", "call_method"):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            self.view[n] = _is_view(out, (args, kwargs)) and not may_mutate(n, self.module)  # type: ignore[arg-type]
        self.flops[n] = counter.get_total_flops() if n.op != "placeholder" else 0
        self.out_bytes[n] = sum(
            t.numel() * t.element_size() for t in tree_leaves(out) if isinstance(t, torch.Tensor)
        )
        self.container[n] = not isinstance(out, torch.Tensor) and any(
            isinstance(t, torch.Tensor) for t in tree_leaves(out)
        )
        return out


def _is_view(out: Any, inputs: Any) -> bool:
    """Whether every tensor of ``out`` lies in the storage of a tensor of ``inputs``."""
    outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    storages = {_storage(t) for t in tree_leaves(inputs) if isinstance(t, torch.Tensor)}
    return bool(outs) and all(_storage(t) in storages for t in outs)


def _storage(t: torch.Tensor) -> StorageWeakRef:
    """A key equal for tensors that share storage (torch's own alias checks use it)."""
    return StorageWeakRef(t.untyped_storage())  # type: ignore[no-untyped-call]


def annotate_symbolic(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    """Write ``flops_expr``, ``output_bytes_expr``, ``fwd_flops``, ``output_bytes``,
    ``tensor_container`` and ``view``.

    Falls back to static shapes (constant expressions) if the graph specialises the batch size.
    """
    sizes = input_sizes(inputs)
    gm.meta[SIZES_KEY] = sizes
    try:
        interp, symbols = _run(gm, inputs, dynamic=True)
    except Exception as e:  # noqa: BLE001 - a graph that bakes in its batch size is still costed
        log.warning("symbolic shapes failed (%s); costs will not scale with batch size", e)
        interp, symbols = _run(gm, inputs, dynamic=False)
    for node in gm.graph.nodes:
        flops = _expr(interp.flops.get(node, 0), symbols)
        out_bytes = _expr(interp.out_bytes.get(node, 0), symbols)
        update(
            node,
            flops_expr=str(flops),
            output_bytes_expr=str(out_bytes),
            fwd_flops=evaluate(str(flops), sizes),
            output_bytes=evaluate(str(out_bytes), sizes),
            tensor_container=interp.container.get(node, False),
            view=interp.view.get(node, False),
        )
    return gm


def _run(
    gm: fx.GraphModule, inputs: Sequence[torch.Tensor], *, dynamic: bool
) -> tuple[_Interpreter, dict[sympy.Basic, sympy.Symbol]]:
    env = ShapeEnv(duck_shape=False)  # equal example sizes must not merge B and S
    mode = FakeTensorMode(shape_env=env, allow_non_fake_inputs=False)
    symbols: dict[sympy.Basic, sympy.Symbol] = {}
    fakes = []
    for x in inputs:
        dims = [DimDynamic.STATIC] * x.dim()
        if dynamic and x.dim() >= 1:
            dims[0] = DimDynamic.DYNAMIC
            if _has_seq(x):
                dims[1] = DimDynamic.DYNAMIC
        fake = mode.from_tensor(x, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims))
        for d, sym in ((0, BATCH), (1, SEQ)):
            if d < len(dims) and dims[d] is DimDynamic.DYNAMIC:
                size = fake.shape[d]
                assert isinstance(size, torch.SymInt)
                symbols[size.node.expr] = sym
        fakes.append(fake)
    # Parameters become fake copies too: nothing below can touch the user's tensors.
    with FakeCopyMode(mode):
        fake_gm = copy.deepcopy(gm)
    interp = _Interpreter(fake_gm)
    with mode, torch.no_grad():
        interp.run(*fakes)
    # Report results against the original graph's nodes (same order, same names).
    by_name = {n.name: n for n in gm.graph.nodes}
    interp.flops = {by_name[n.name]: v for n, v in interp.flops.items()}
    interp.out_bytes = {by_name[n.name]: v for n, v in interp.out_bytes.items()}
    interp.container = {by_name[n.name]: v for n, v in interp.container.items()}
    interp.view = {by_name[n.name]: v for n, v in interp.view.items()}
    symbols = {env.replace(k): v for k, v in symbols.items()} | symbols
    return interp, symbols


def _expr(value: Any, symbols: dict[sympy.Basic, sympy.Symbol]) -> sympy.Expr:
    if isinstance(value, torch.SymInt):
        return sympy.expand(value.node.expr.xreplace(symbols))
    return sympy.Integer(int(value))
