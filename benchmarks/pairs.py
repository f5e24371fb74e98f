"""The teacher-student pairs of the TSPipe paper, full size, built from configs (no downloads).

Shared by the benchmark scripts. Each builder returns ``(student, teacher, mode)``; the example
batch comes from :func:`example`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def mlp(dim_in: int, hidden: int, dim_out: int) -> nn.Sequential:
    """BYOL / MoCo v3 projector and predictor: Linear-BN-ReLU-Linear."""
    return nn.Sequential(
        nn.Linear(dim_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim_out)
    )


class Online(nn.Module):
    """A momentum-SSL online network: backbone, projector, predictor (the target lacks the predictor)."""

    def __init__(self, backbone: nn.Module, feat: int, hidden: int, out: int):
        super().__init__()
        self.backbone = backbone
        self.projector = mlp(feat, hidden, out)
        self.predictor = mlp(out, hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.projector(self.backbone(x)))


class Target(nn.Module):
    """The momentum target: a copy of the online backbone and projector, updated by EMA."""

    def __init__(self, online: Online):
        super().__init__()
        self.backbone = copy.deepcopy(online.backbone)
        self.projector = copy.deepcopy(online.projector)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


def kd_vit_l_resnet152() -> tuple[nn.Module, nn.Module, str]:
    import timm

    teacher = timm.create_model("vit_large_patch16_224", pretrained=False).eval()
    return timm.create_model("resnet152", pretrained=False), teacher, "kd"


def kd_bert_large_distilbert_large() -> tuple[nn.Module, nn.Module, str]:
    from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

    teacher = BertForMaskedLM(
        BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    ).eval()
    student = DistilBertForMaskedLM(DistilBertConfig(dim=1024, n_layers=12, n_heads=16, hidden_dim=4096))
    return student, teacher, "kd"


def byol_resnet18() -> tuple[nn.Module, nn.Module, str]:
    import timm

    online = Online(timm.create_model("resnet18", pretrained=False, num_classes=0), 512, 4096, 256)
    return online, Target(online), "momentum"


def mocov3_vit_b() -> tuple[nn.Module, nn.Module, str]:
    import timm

    online = Online(
        timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0), 768, 4096, 256
    )
    return online, Target(online), "momentum"


PAIRS: dict[str, Callable[[], tuple[nn.Module, nn.Module, str]]] = {
    "kd_vitl_r152": kd_vit_l_resnet152,
    "kd_bertl_distilbertl": kd_bert_large_distilbert_large,
    "byol_r18": byol_resnet18,
    "mocov3_vitb": mocov3_vit_b,
}


def example(pair: str, batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """One batch for ``pair``: images at 224, or 128 tokens."""
    if pair.startswith("kd_bert"):
        ids = torch.randint(0, 30522, (batch, 128))
        return (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return (torch.randn(batch, 3, 224, 224),), {}


@dataclass
class ProfiledPair:
    """A pair captured at batch 2 with its shipped CPU profiles: what the planners need."""

    student: Any  # CapturedModel
    teacher: Any
    mode: str
    inputs: tuple[Any, ...]
    kwargs: dict[str, Any]
    profiles: tuple[Any, Any]  # (student Profile, teacher Profile)

    def compile(self, n: int, **options: Any) -> Any:
        import tspipe_fx

        return tspipe_fx.compile(self.student, self.teacher, n, example_inputs=self.inputs, example_kwargs=self.kwargs,
                                 mode=self.mode, profile=self.profiles, **options)  # type: ignore[arg-type]  # fmt: skip


# The GPU profiles of benchmarks/gpu/ that are these pairs' own graphs (and scale with the batch:
# the HF ones do not, see benchmarks/README.md, gpu; the momentum pairs have heads of their own).
GPU_PROFILES = {"h100": {"kd_vitl_r152": ("h100/resnet152_b32", "h100/vit_l16_b32")}}


def profiled(pair: str, device: str = "cpu") -> ProfiledPair:
    """Build, capture and attach the shipped profiles: the CPU ones of
    ``benchmarks/partition/profile_pairs.py``, or a GPU's (``device="h100"``)."""
    import tspipe_fx
    from tspipe_fx.cost import profiles

    if device == "cpu":
        names = (f"cpu/{pair}_student_b2", f"cpu/{pair}_teacher_b2")
    elif pair in GPU_PROFILES.get(device, {}):
        names = GPU_PROFILES[device][pair]
    else:
        raise SystemExit(
            f"no {device} profiles for {pair}; there are for {sorted(GPU_PROFILES.get(device, {}))}"
        )
    student, teacher, mode = PAIRS[pair]()
    inputs, kwargs = example(pair, 2)
    return ProfiledPair(
        tspipe_fx.capture(student, inputs, example_kwargs=kwargs),
        tspipe_fx.capture(teacher, inputs, example_kwargs=kwargs),
        mode, inputs, kwargs, (profiles.load(names[0]), profiles.load(names[1])),
    )  # fmt: skip
