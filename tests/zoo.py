"""A small zoo of tiny real models built from configs (no downloads), shared by the tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__: list[str] = []


@dataclass
class Case:
    """One model and one example call of it."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], tuple[Any, ...]]  # batch size -> positional args
    kwargs: Callable[[int], dict[str, Any]] = field(default=lambda b: {})
    method: str = "fx"  # the tracer ``auto`` is expected to pick


def _image(b: int, size: int = 32) -> tuple[Any, ...]:
    return (torch.randn(b, 3, size, size),)


def _tokens(b: int, vocab: int = 97, seq: int = 8) -> dict[str, Any]:
    g = torch.Generator().manual_seed(b)
    return {
        "input_ids": torch.randint(0, vocab, (b, seq), generator=g),
        "attention_mask": torch.ones(b, seq, dtype=torch.long),
    }


def _torchvision_resnet() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=10)


def _timm(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **kw)

    return build


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForMaskedLM(cfg)


def _distilbert() -> nn.Module:
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    cfg = DistilBertConfig(
        vocab_size=97,
        dim=32,
        n_layers=2,
        n_heads=2,
        hidden_dim=64,
        max_position_embeddings=32,
        dropout=0.0,
        attention_dropout=0.0,
    )
    return DistilBertForMaskedLM(cfg)


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=97,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


def _hf_vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(cfg)


CASES = [
    Case("torchvision_resnet18", _torchvision_resnet, _image),
    Case("timm_resnet18", _timm("resnet18", num_classes=10), _image),
    Case(
        "timm_vit", _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10, depth=2), _image
    ),
    Case("timm_efficientnet", _timm("efficientnet_b0", num_classes=10), _image),
    Case("timm_convnext", _timm("convnext_atto", num_classes=10), _image),
    Case(
        "timm_swin",
        _timm(
            "swin_tiny_patch4_window7_224",
            img_size=32,
            window_size=2,
            embed_dim=24,
            depths=(1, 1),
            num_heads=(1, 2),
            num_classes=10,
        ),
        _image,
    ),  # fx since its tensor constants stay on the graph (they were looked up on the model)
    Case("hf_bert_mlm", _bert, lambda b: (), _tokens, method="export"),
    Case("hf_distilbert_mlm", _distilbert, lambda b: (), _tokens, method="export"),
    Case("hf_gpt2_lm", _gpt2, lambda b: (), lambda b: {**_tokens(b), "use_cache": False}, method="export"),
    Case(
        "hf_vit",
        _hf_vit,
        lambda b: (),
        lambda b: {"pixel_values": torch.randn(b, 3, 32, 32)},
        method="export",
    ),
]

BY_NAME = {c.name: c for c in CASES}
