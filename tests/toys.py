"""Toy teacher-student pairs shared by the runtime tests and the torchrun worker."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    """BatchNorm and a skip connection that crosses stages."""

    def __init__(self, width: int = 16, out: int = 4):
        super().__init__()
        self.a = nn.Linear(8, width)
        self.bn = nn.BatchNorm1d(width)
        self.b = nn.Linear(width, width)
        self.c = nn.Linear(width, width)
        self.head = nn.Linear(width, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.a(x)))
        return self.head(torch.relu(self.c(torch.relu(self.b(h)))) + h)


class Noisy(nn.Module):
    """Dropout (a module and a functional) and a drop-path (timm's: a per-sample Bernoulli mask
    from ``new_empty(...).bernoulli_``) around a residual connection that crosses stages."""

    def __init__(self, width: int = 16, out: int = 4):
        super().__init__()
        self.a = nn.Linear(8, width)
        self.drop = nn.Dropout(0.3)
        self.b = nn.Linear(width, width)
        self.c = nn.Linear(width, width)
        self.head = nn.Linear(width, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.relu(self.a(x)))
        r = torch.relu(self.b(h))
        keep = r.new_empty(r.shape[0], 1).bernoulli_(0.8) / 0.8
        h = h + r * keep
        h = F.dropout(torch.relu(self.c(h)), 0.2, self.training)
        return self.head(h)


def kd_loss(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(s, y) + F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="batchmean")


def sgd(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


class Online(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = Net(16, 8)
        self.projector = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        self.predictor = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.projector(self.backbone(x)))


class Target(nn.Module):
    def __init__(self, online: Online) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(online.backbone)
        self.projector = copy.deepcopy(online.projector)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


def byol_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    def one(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return 2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1).mean()

    return one(p1, z2) + one(p2, z1)


def run_batches(trainer: Any, batches: list[tuple[Any, ...]], **kw: Any) -> list[float]:
    losses = []
    for inputs in batches:
        r = (
            trainer.step(*inputs, **kw)
            if not isinstance(inputs[-1], dict)
            else trainer.step(*inputs[:-1], **inputs[-1])
        )
        if r is not None:
            losses.append(r)
    losses.append(trainer.finish())
    first = losses[0].batch
    assert [r.batch for r in losses] == list(range(first, first + len(batches)))  # tagged, in order
    return [r.loss for r in losses]
