"""Training options of issue 15 on this CPU: bf16 and compiled stages against fp32 eager, and what
recompute pays (time) and saves (activations), side by side on one KD pair.

    python benchmarks/training/run.py                       # 5 rounds, prints the tables
    python benchmarks/training/run.py --rounds 1 --steps 1  # a quick check

The pair: a ResNet-18 student and a ViT-S/16 teacher (6 blocks) at 64 x 64 images, batch 32 in
4 micro-batches, KD loss, 2 stages (uniform costs) on the local runtime (two CPU devices, one
worker thread each). Every contender is one trainer built once (compiled stages compile in their
warm-up steps); each round times ``--steps`` steps of every contender in turn, so machine noise
spreads over all. The table gives each one's median seconds per step over the rounds and its
speed-up over ``fp32``.

The activation table measures, per stage, the bytes autograd saves for one micro-batch's
backward (through saved-tensor hooks, each storage once): what ``recompute`` drops; and the
bytes of the stage's inputs, which a recomputed forward keeps instead.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import tspipe_fx  # noqa: E402

CONTENDERS: dict[str, dict[str, Any]] = {
    "fp32": {},
    "bf16": {"precision": "bf16"},
    "fp32-compiled": {"compile_stages": True},
    "bf16-compiled": {"precision": "bf16", "compile_stages": True},
    "fp32-recompute": {"recompute": "always"},
}


def pair(image: int) -> tuple[nn.Module, nn.Module]:
    import timm

    torch.manual_seed(0)
    student = timm.create_model("resnet18", pretrained=False, num_classes=10)
    teacher = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10, img_size=image, depth=6)
    return student, teacher.eval()


def kd_loss(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(s, y) + F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="batchmean")


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


def saved_bytes(module: nn.Module, args: list[Any]) -> int:
    """Bytes autograd saves for the backward of one forward of ``module`` (each storage once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad():
        module(*args)
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params)


def activations(pipe: Any, x: torch.Tensor) -> list[tuple[int, int]]:
    """Per student stage: (saved activation bytes, input bytes) for micro-batch ``x``."""
    stages = pipe.staged("student").stages
    env = dict(zip(stages[0].inputs, [x], strict=True))
    rows = []
    for st in stages:
        args = [env[n].detach().requires_grad_(env[n].is_floating_point()) if isinstance(env[n], torch.Tensor)
                else env[n] for n in st.inputs]  # fmt: skip
        inputs = sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
        rows.append((saved_bytes(st.module, args), inputs))
        with torch.no_grad():
            env.update(zip(st.outputs, st.module(*args), strict=True))
    return rows


def time_contenders(pipe: Any, x: torch.Tensor, y: torch.Tensor, names: list[str], rounds: int,
                    steps: int, say: Any = print) -> dict[str, dict[str, float]]:  # fmt: skip
    """Each contender's median seconds per step over ``rounds`` (the contenders in turn each round)
    and, on a GPU, its peak allocated memory."""
    trainers = {}
    for name in names:
        t0 = time.perf_counter()
        trainer = copy.deepcopy(pipe).trainer(kd_loss, optimizer=sgd, **CONTENDERS[name])
        for _ in range(2):  # warm-up: compiled stages compile here
            trainer.step(x, target=y)
        trainers[name] = trainer
        say(f"{name}: ready in {time.perf_counter() - t0:.1f} s")
    cuda = x.device.type == "cuda"
    times: dict[str, list[float]] = {name: [] for name in trainers}
    peaks: dict[str, float] = {}
    for r in range(rounds):
        for name, trainer in trainers.items():
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(steps):
                trainer.step(x, target=y)
            if cuda:
                torch.cuda.synchronize()
                peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**20)
            times[name].append((time.perf_counter() - t0) / steps)
        say(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {v[-1]:.3f} s" for n, v in times.items()))
    for trainer in trainers.values():
        trainer.finish()
    return {n: {"s_per_step": statistics.median(v), **({"peak_mib": peaks[n]} if n in peaks else {})}
            for n, v in times.items()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--image", type=int, default=64)
    parser.add_argument("--only", nargs="*", default=list(CONTENDERS), help="contenders to run")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one per worker thread: the two stages share this machine's 2 cores
    student, teacher = pair(args.image)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.image, args.image, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    pipe = tspipe_fx.compile(student, teacher, 2, example_inputs=(x,), micro_batches=args.micro, cost_model="uniform")
    figures = time_contenders(pipe, x, y, args.only, args.rounds, args.steps, lambda m: print(m, flush=True))
    base = figures["fp32"]["s_per_step"] if "fp32" in figures else None
    print(f"\n| contender | s / step (median of {args.rounds}) | speed-up over fp32 |")
    print("|---|---|---|")
    for name, f in figures.items():
        med = f["s_per_step"]
        print(f"| {name} | {med:.3f} | {base / med:.2f}x |" if base else f"| {name} | {med:.3f} | |")
    print("\n| student stage | saved activations / micro-batch | inputs kept under recompute |")
    print("|---|---|---|")
    for j, (saved, kept) in enumerate(activations(pipe, x[: args.batch // args.micro])):
        print(f"| {j} | {saved / 2**20:.1f} MiB | {kept / 2**20:.2f} MiB |")


if __name__ == "__main__":
    main()
