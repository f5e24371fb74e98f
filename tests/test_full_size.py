"""Full-size models from their configs: capture and symbolic costs hold beyond the tiny zoo (slow)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import sympy
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tspipe_fx import capture
from tspipe_fx.passes import annotate_structure, annotate_symbolic
from tspipe_fx.passes.meta import info
from tspipe_fx.passes.symbolic import BATCH, SEQ, evaluate

pytestmark = pytest.mark.slow


def _resnet50() -> nn.Module:
    import torchvision

    return torchvision.models.resnet50()


def _vit_l16() -> nn.Module:
    import timm

    return timm.create_model("vit_large_patch16_224", pretrained=False)


def _bert_large() -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(
        BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    )


def _images(b: int, s: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (torch.randn(b, 3, 224, 224),), {}


def _tokens(b: int, s: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    ids = torch.randint(0, 1000, (b, s))
    return (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize(
    ("build", "make", "method"),
    [(_resnet50, _images, "fx"), (_vit_l16, _images, "fx"), (_bert_large, _tokens, "export")],
    ids=["resnet50", "vit_l16", "bert_large"],
)
def test_full_size_symbolic_flops_match_the_counter(
    build: Callable[[], nn.Module], make: Any, method: str
) -> None:
    model = build()
    args, kwargs = make(2, 16)
    cm = capture(model, args, example_kwargs=kwargs)
    assert cm.method == method and cm.dynamic_batch
    gm = cm.graph_module
    annotate_structure(gm)
    annotate_symbolic(gm, cm.flatten_inputs(args, kwargs))
    # Every parameter and buffer is read by some node (a tied weight by several).
    state = gm.state_dict(keep_vars=True)
    read = {id(state[p]): state[p] for n in gm.graph.nodes for p in info(n).param_names if p in state}
    unique = {id(t): t for t in model.state_dict(keep_vars=True).values()}
    assert read.keys() == unique.keys()
    total = sum(sympy.sympify(info(n).flops_expr, locals={"B": BATCH, "S": SEQ}) for n in gm.graph.nodes)
    args, kwargs = make(1, 24)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        cm(*args, **kwargs)
    assert evaluate(str(total), {"B": 1, "S": 24}) == counter.get_total_flops()
