"""Capture a user's ``nn.Module`` as a flat ``fx.GraphModule`` that can still be called like the original.

Two tracers, tried in order by ``method="auto"``:

1. ``torch.fx.symbolic_trace`` (through :class:`_FlatTracer`): module calls stay ``call_module``
   nodes, parameters stay in the user's modules.
2. ``torch.export.export(..., strict=False)``: for models fx cannot trace (Hugging Face
   transformers). The batch dimension of every tensor input, and the sequence dimension of
   integer (token) inputs, are exported as dynamic so other batch sizes run the same graph.

Either way the result's ``graph_module`` takes the tensor leaves of ``(args, kwargs)`` as flat
positional inputs and returns a flat tuple of tensors; :class:`CapturedModel` keeps the pytree
specs to rebuild the original calling convention and output structure (tensor, tuple, dict,
Hugging Face ``ModelOutput``). Non-tensor leaves of the example call (``use_cache=False``) are
baked into the graph as constants and checked on every call.

Parameters: both tracers reference the user's own ``nn.Parameter`` objects (no copies), so
the captured model trains the user's model in place. The tests check identity.
"""

from tspipe_fx.tracing.model import CapturedModel
from tspipe_fx.tracing.trace import capture

__all__ = ["CapturedModel", "capture"]
