"""Soft-target knowledge distillation, the TSPipe paper's KD workload: a ViT-L/16 teacher, a
ResNet-152 student, cross-entropy on the labels plus KL between the softened outputs times T^2.

    python examples/kd_vit_resnet.py                                   # tiny models, 2 CPU stages
    torchrun --nproc-per-node 2 examples/kd_vit_resnet.py --runtime dist
    torchrun --nproc-per-node 8 examples/kd_vit_resnet.py --runtime dist --full --gpus 8

Tiny: a 2-block ViT (32 x 32 images, patch 8) and a bottleneck ResNet with one block per stage,
one fixed synthetic batch. ``--full``: timm's ``vit_large_patch16_224`` and ``resnet152`` (no
weights downloaded) on 224 x 224 synthetic images, batch 256.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from _common import compile_pair, finish_args, parser, say, train
from torch import nn


def models(full: bool, classes: int) -> tuple[nn.Module, nn.Module]:
    import timm
    from timm.models.resnet import Bottleneck, ResNet
    from timm.models.vision_transformer import VisionTransformer

    if full:
        teacher = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=classes)
        student = timm.create_model("resnet152", pretrained=False, num_classes=classes)
    else:
        teacher = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=classes)
        student = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=classes, stem_width=16, base_width=16)
    return student, teacher.eval()  # the teacher is frozen: eval mode, no optimizer


def kd_loss(temperature: float, alpha: float):  # type: ignore[no-untyped-def]
    """(1 - alpha) * CE(student, labels) + alpha * T^2 * KL(teacher_T || student_T)."""

    def loss(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        soft = F.kl_div(F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1), reduction="batchmean")
        return (1 - alpha) * F.cross_entropy(s, y) + alpha * temperature**2 * soft

    return loss


def main() -> None:
    p = parser(__doc__, batch=16, full_batch=256)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.9)
    args = finish_args(p.parse_args())
    classes = 1000 if args.full else 10
    student, teacher = models(args.full, classes)
    size = 224 if args.full else 32
    x = torch.randn(args.batch, 3, size, size)
    y = torch.randint(0, classes, (args.batch,))
    pipe = compile_pair(student, teacher, args, x)
    lr = args.lr or (0.1 if args.full else 0.05)
    trainer = pipe.trainer(kd_loss(args.temperature, args.alpha), runtime=args.runtime,
                           optimizer=lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.9, weight_decay=1e-4))  # fmt: skip
    train(trainer, itertools.repeat(((x,), {}, y)), args.steps)
    say("the student module holds the trained weights" if args.runtime == "local" else "")


if __name__ == "__main__":
    main()
