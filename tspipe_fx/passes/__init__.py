"""Graph passes: each takes an ``fx.GraphModule`` and writes ``node.meta["tspipe"]``
(:mod:`tspipe_fx.passes.meta` lists who writes what), or derives from what is written.

* :func:`annotate_structure`: module paths and the parameters each node reads (no execution).
* :func:`annotate_symbolic`: FLOPs and output bytes as sympy expressions of batch size (and
  sequence length), from one fake-tensor run with symbolic shapes (no real compute).
* :func:`annotate_measured`: measured forward/backward time, backward FLOPs and the bytes kept
  for backward, from real runs of every node.
* :mod:`~tspipe_fx.passes.chain`: the graph as the partitioner's chain (live sets, candidate cuts).
* :mod:`~tspipe_fx.passes.split`: cut positions -> one ``fx.GraphModule`` per stage.
* :mod:`~tspipe_fx.passes.mutation` (in-place writes) and :mod:`~tspipe_fx.passes.fingerprint`
  (a graph's identity).
"""

from tspipe_fx.passes.measure import annotate_measured
from tspipe_fx.passes.structure import annotate_structure
from tspipe_fx.passes.symbolic import annotate_symbolic

__all__ = ["annotate_measured", "annotate_structure", "annotate_symbolic"]
