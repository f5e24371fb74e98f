"""BYOL with a ResNet-18, the TSPipe paper's momentum workload: an online network (backbone,
projector, predictor) trained to predict, from one view, a momentum target network's
projection of the other view; the target is an EMA of the online network's backbone and
projector, its momentum raised from 0.996 to 1 on BYOL's cosine schedule.

    python examples/byol.py                                          # small images, 2 CPU stages
    torchrun --nproc-per-node 2 examples/byol.py --runtime dist
    torchrun --nproc-per-node 8 examples/byol.py --runtime dist --full --gpus 8

The student is the online network; the teacher is the target (``mode="momentum"``): tspipe_fx
mirrors the student's cuts in the target (each EMA update stays on its device) and leaves the
predictor on the last stage. Two views: ``trainer.step(view1, view2)``, the symmetric loss
``loss(p1, p2, z1, z2)``. The target is one step late (TSPipe's staleness 1).

Small: torchvision's ResNet-18 (full width) on 32 x 32 images, a 256-wide projector; ``--full``:
224 x 224, BYOL's 4096-wide MLPs projecting to 256, batch 256. Views are two fixed random
augmentations (flips, crops, colour jitter) of one synthetic batch.
"""

from __future__ import annotations

import copy
import itertools

import torch
import torch.nn.functional as F
from _common import compile_pair, cosine_momentum, finish_args, parser, say, train
from torch import nn


def mlp(dim: int, hidden: int, out: int) -> nn.Sequential:
    """BYOL's projector and predictor: Linear, BatchNorm, ReLU, Linear."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))


class Online(nn.Module):
    def __init__(self, hidden: int, proj: int):
        super().__init__()
        from torchvision.models import resnet18

        self.backbone = resnet18()
        features = self.backbone.fc.in_features
        self.backbone.fc = nn.Identity()
        self.projector = mlp(features, hidden, proj)
        self.predictor = mlp(proj, hidden, proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.projector(self.backbone(x)))


class Target(nn.Module):
    """The EMA network: a copy of the online backbone and projector (the same parameter names)."""

    def __init__(self, online: Online):
        super().__init__()
        self.backbone = copy.deepcopy(online.backbone)
        self.projector = copy.deepcopy(online.projector)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


def byol_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Symmetric: each view's prediction against the other view's target projection."""

    def one(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)).mean()

    return one(p1, z2) + one(p2, z1)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random view: horizontal flip, a crop resized back, brightness and contrast jitter."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    size = int(h * 0.75)
    top, left = (int(torch.randint(0, h - size + 1, (1,), generator=g)) for _ in range(2))
    x = F.interpolate(x[:, :, top : top + size, left : left + size], size=(h, w), mode="bilinear", align_corners=False)
    bright = 1 + 0.4 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)
    contrast = 1 + 0.4 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean) * bright


def main() -> None:
    p = parser(__doc__, batch=16, full_batch=256)
    p.add_argument("--base-momentum", type=float, default=0.996)
    args = finish_args(p.parse_args())
    hidden, proj, size = (4096, 256, 224) if args.full else (256, 64, 32)
    online = Online(hidden, proj)
    target = Target(online)
    g = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch, 3, size, size, generator=g)
    v1, v2 = augment(images, g), augment(images, g)
    pipe = compile_pair(online, target, args, v1, mode="momentum")
    lr = args.lr or (0.2 if args.full else 0.05)
    trainer = pipe.trainer(byol_loss, runtime=args.runtime, views=2, momentum=args.base_momentum,
                           optimizer=lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.9, weight_decay=1.5e-6))  # fmt: skip
    train(trainer, itertools.repeat(((v1, v2), {}, None)), args.steps,
          momentum=cosine_momentum(args.base_momentum, args.steps))  # fmt: skip
    say("the online and target modules hold the trained weights" if args.runtime == "local" else "")


if __name__ == "__main__":
    main()
