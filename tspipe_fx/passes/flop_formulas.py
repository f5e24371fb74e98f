"""FLOP formulas that ``torch.utils.flop_counter`` lacks, registered on import.

On the CPU, ``F.scaled_dot_product_attention`` runs ``aten._scaled_dot_product_flash_attention_for_cpu``
(and its backward), which the counter does not know: an attention then counts zero FLOPs, and a
roofline prices it as a memory-bound node (a few per cent of a ViT, more at long sequences) and
the partitioner sees no compute between its projections. The CUDA kernels' formulas apply as
they are: the same products of the same shapes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import (
    flop_registry,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

__all__: list[str] = []

_aten = torch.ops.aten


def _register() -> None:
    forward = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is not None and forward not in flop_registry:

        @register_flop_formula(forward)
        def cpu_attention(
            query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any
        ) -> Any:  # a symbolic count where the shapes are (int() would specialize the batch size)
            return sdpa_flop_count(query_shape, key_shape, value_shape)  # type: ignore[no-untyped-call]

    if backward is not None and backward not in flop_registry:

        @register_flop_formula(backward)
        def cpu_attention_backward(grad_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any, *args: Any,
                                   **kwargs: Any) -> Any:  # fmt: skip
            return sdpa_backward_flop_count(grad_shape, query_shape, key_shape, value_shape)  # type: ignore[no-untyped-call]


_register()
