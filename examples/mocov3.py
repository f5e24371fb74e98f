"""MoCo v3 with a ViT, the TSPipe paper's largest momentum workload: a base encoder (ViT,
projector, predictor) learns by contrasting its queries against a momentum encoder's keys,
symmetric InfoNCE over the whole batch (every other sample of the batch is a negative).

    python examples/mocov3.py                                        # tiny ViT, 2 CPU stages
    torchrun --nproc-per-node 2 examples/mocov3.py --runtime dist
    torchrun --nproc-per-node 8 examples/mocov3.py --runtime dist --full --gpus 8

The student is the base encoder, the teacher the momentum encoder (``mode="momentum"``: an EMA
of the base ViT and projector, momentum 0.99 raised to 1 on a cosine schedule). The loss needs
the whole batch at once (its negatives are the other samples), which the ``tspipe`` schedule
gives: one loss per batch on the last stage, over all micro-batches.

Tiny: a 2-block ViT (32 x 32 images, patch 8, 64 wide); ``--full``: timm's ViT-B/16 on
224 x 224, MoCo v3's 4096-wide MLPs projecting to 256, batch 256. Views are two fixed random
augmentations of one synthetic batch.
"""

from __future__ import annotations

import copy
import itertools

import torch
import torch.nn.functional as F
from _common import compile_pair, cosine_momentum, finish_args, parser, say, train
from byol import augment
from torch import nn


def mlp(layers: int, dim: int, hidden: int, out: int) -> nn.Sequential:
    """MoCo v3's heads: Linear-BN-ReLU blocks, then Linear and an affine-free BatchNorm."""
    mods: list[nn.Module] = []
    for k in range(layers):
        last = k == layers - 1
        mods.append(nn.Linear(dim if k == 0 else hidden, out if last else hidden, bias=False))
        mods.append(nn.BatchNorm1d(out, affine=False) if last else nn.BatchNorm1d(hidden))
        if not last:
            mods.append(nn.ReLU(inplace=True))
    return nn.Sequential(*mods)


class BaseEncoder(nn.Module):
    def __init__(self, full: bool, hidden: int, proj: int):
        super().__init__()
        import timm
        from timm.models.vision_transformer import VisionTransformer

        if full:
            self.backbone = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
        else:
            self.backbone = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                                              num_classes=0)  # fmt: skip
        self.projector = mlp(3, self.backbone.num_features, hidden, proj)
        self.predictor = mlp(2, proj, hidden, proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.projector(self.backbone(x)))


class MomentumEncoder(nn.Module):
    """The EMA network: a copy of the base ViT and projector (the same parameter names)."""

    def __init__(self, base: BaseEncoder):
        super().__init__()
        self.backbone = copy.deepcopy(base.backbone)
        self.projector = copy.deepcopy(base.projector)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


def infonce(temperature: float):  # type: ignore[no-untyped-def]
    """ctr(q1, k2) + ctr(q2, k1): each query's positive is its own sample's key from the other view."""

    def ctr(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q, k = F.normalize(q, dim=1), F.normalize(k.detach(), dim=1)
        logits = q @ k.T / temperature  # (batch, batch): the diagonal are the positives
        labels = torch.arange(len(q), device=q.device)
        return F.cross_entropy(logits, labels) * 2 * temperature

    def loss(q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor) -> torch.Tensor:
        return ctr(q1, k2) + ctr(q2, k1)

    return loss


def main() -> None:
    p = parser(__doc__, batch=16, full_batch=256)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--base-momentum", type=float, default=0.99)
    args = finish_args(p.parse_args())
    hidden, proj, size = (4096, 256, 224) if args.full else (128, 32, 32)
    base = BaseEncoder(args.full, hidden, proj)
    momentum = MomentumEncoder(base)
    g = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch, 3, size, size, generator=g)
    v1, v2 = augment(images, g), augment(images, g)
    pipe = compile_pair(base, momentum, args, v1, mode="momentum")
    lr = args.lr or (1.5e-4 * args.batch / 256 if args.full else 1e-3)
    trainer = pipe.trainer(infonce(args.temperature), runtime=args.runtime, views=2, momentum=args.base_momentum,
                           optimizer=lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=0.1))  # fmt: skip
    train(trainer, itertools.repeat(((v1, v2), {}, None)), args.steps,
          momentum=cosine_momentum(args.base_momentum, args.steps))  # fmt: skip
    say("the base and momentum encoders hold the trained weights" if args.runtime == "local" else "")


if __name__ == "__main__":
    main()
