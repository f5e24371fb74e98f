"""Graph passes: each takes an ``fx.GraphModule`` and writes ``node.meta["tspipe"]``.

* :func:`annotate_structure`: module paths and the parameters each node reads (no execution).
* :func:`annotate_symbolic`: FLOPs and output bytes as sympy expressions of batch size (and
  sequence length), from one fake-tensor run with symbolic shapes (no real compute).
* :func:`annotate_measured`: measured forward/backward time, backward FLOPs and the bytes kept
  for backward, from real runs of every node.
"""

from tspipe_fx.passes.measure import annotate_measured
from tspipe_fx.passes.structure import annotate_structure
from tspipe_fx.passes.symbolic import annotate_symbolic

__all__ = ["annotate_measured", "annotate_structure", "annotate_symbolic"]
