"""The GPU script's issue-14 steps: every schedule's runtime against the reference trainer on the
device, and how a model's time per sample grows as its micro-batch shrinks against what the
cost models predict (what compile's choice of M rests on).

Both are called by ``benchmarks/gpu/run.py``; each writes into its ``results`` dictionary.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import tspipe_fx
from tspipe_fx.passes.timer import Timer
from tspipe_fx.runtime.reference import ReferenceTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pairs import PAIRS, Online, Target, example, profiled
from training.run import kd_loss, sgd

# On a GPU cuDNN's convolutions round their inputs to TF32 (10-bit mantissa) by default: a last-bit
# difference in a weight (gradients summed in another order) can move a convolution's output by
# 1e-3, and training carries it on. This case runs with TF32 off, to tell that from a fault.
NO_TF32 = "momentum auto, staleness 0, convolutions without TF32"

# (name, mode, compile options, trainer options): KD with a ResNet-34 teacher and a ResNet-18
# student, momentum with a ResNet-18 online network (BatchNorm in backbone and heads) as its own
# EMA target; 2 devices' stages on the one GPU, each on its own stream.
CASES: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    ("tspipe", "kd", {"schedule": "tspipe", "loss": "batch"}, {}),
    ("gpipe", "kd", {"schedule": "gpipe", "loss": "batch"}, {}),
    ("1f1b", "kd", {"schedule": "1f1b", "loss": "micro"}, {}),
    ("auto, loss per batch", "kd", {"schedule": "auto", "loss": "batch"}, {}),
    ("auto, loss per micro-batch", "kd", {"schedule": "auto", "loss": "micro"}, {}),
    ("auto, teacher_parts=2", "kd", {"schedule": "auto", "loss": "micro", "teacher_parts": 2}, {}),
    ("momentum auto, staleness 0", "momentum", {"schedule": "auto", "loss": "micro"}, {"staleness": 0}),
    (NO_TF32, "momentum", {"schedule": "auto", "loss": "micro"}, {"staleness": 0}),
    ("momentum auto, staleness 1", "momentum", {"schedule": "auto", "loss": "micro"}, {"staleness": 1}),
    ("momentum auto, 2 stages per device", "momentum", {"schedule": "auto", "loss": "micro", "stages_per_device": 2},
     {"staleness": 1}),
    ("momentum auto, InfoNCE per query micro-batch", "momentum", {"schedule": "auto", "loss": "micro_full_teacher"},
     {"staleness": 1}),
]  # fmt: skip


def byol_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    def one(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return 2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1).mean()

    return one(p1, z2) + one(p2, z1)


def info_nce(
    q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, *, rows: slice
) -> torch.Tensor:
    """MoCo v3's symmetric InfoNCE of a micro-batch of queries against every key of the batch."""
    labels = torch.arange(rows.start, rows.stop, device=q1.device)

    def ctr(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        logits = F.normalize(q, dim=-1) @ F.normalize(k.detach(), dim=-1).T / 0.2
        return F.cross_entropy(logits, labels)

    return ctr(q1, k2) + ctr(q2, k1)


def _largest_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
               if x.is_floating_point())  # fmt: skip


def schedule_equality(device: torch.device, smoke: bool, results: dict[str, Any]) -> None:
    """Each case of :data:`CASES`, 6 batches of 16 at 64 px (smoke: 3 batches of 8 at 32 px):
    the largest relative loss difference and the largest parameter difference (student; the EMA
    teacher too in momentum mode) from the reference trainer on the same device."""
    cudnn = torch.backends.cudnn
    flags = cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        _equality(device, smoke, results)
    finally:  # the later steps time the default (fastest) kernels
        cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32 = flags


def _equality(device: torch.device, smoke: bool, results: dict[str, Any]) -> None:
    import timm

    size, batch, steps = (32, 8, 3) if smoke else (64, 16, 6)
    rows = results["schedule_equality"] = {}
    for name, mode, compile_opts, train_opts in CASES:
        torch.backends.cudnn.allow_tf32 = name != NO_TF32
        torch.manual_seed(0)
        if mode == "kd":
            student = timm.create_model("resnet18", pretrained=False, num_classes=10).to(device)
            teacher = timm.create_model("resnet34", pretrained=False, num_classes=10).to(device).eval()
        else:
            student = Online(timm.create_model("resnet18", pretrained=False, num_classes=0), 512, 256, 64).to(
                device
            )
            teacher = Target(student)
        x = torch.randn(batch, 3, size, size, device=device)
        loss_fn = (
            kd_loss
            if mode == "kd"
            else info_nce
            if compile_opts["loss"] == "micro_full_teacher"
            else byol_loss
        )
        n_stages = 2 * compile_opts.get("stages_per_device", 1)
        pipe = tspipe_fx.compile(copy.deepcopy(student), copy.deepcopy(teacher), 2, example_inputs=(x,), mode=mode,
                                 cost_model="uniform", devices=[device, device], **compile_opts)  # fmt: skip
        assert pipe.plan.n_stages == n_stages, (name, pipe.plan.n_stages)
        trainer = pipe.trainer(loss_fn, optimizer=sgd, momentum=0.9, **train_opts)
        ref = ReferenceTrainer(copy.deepcopy(student), copy.deepcopy(teacher), loss_fn, optimizer=sgd, mode=mode,
                               micro_batches=trainer.m, views=trainer.plan.views, loss=trainer.plan.loss,
                               micro_major=trainer.micro_major, momentum=0.9, **train_opts)  # fmt: skip
        if mode == "kd":
            data = [((torch.randn(batch, 3, size, size, device=device),),
                     {"target": torch.randint(0, 10, (batch,), device=device)}) for _ in range(steps)]  # fmt: skip
        else:
            data = [((torch.randn(batch, 3, size, size, device=device), torch.randn(batch, 3, size, size, device=device)), {})
                    for _ in range(steps)]  # fmt: skip
        got = [r.loss for r in (trainer.step(*a, **k) for a, k in data) if r is not None] + [
            trainer.finish().loss
        ]
        want = [ref.step(*a, **k) for a, k in data]
        trained_s, trained_t = copy.deepcopy(student), copy.deepcopy(teacher)
        trainer.sync_to_modules(student=trained_s, teacher=trained_t)
        rows[name] = {
            "stages": n_stages,
            "micro_batches": trainer.m,
            "split_backward": any(s.split_backward for s in trainer.schedules.values()),
            "loss_max_rel_diff": max(abs(g - w) / abs(w) for g, w in zip(got, want, strict=True)),
            "param_max_abs_diff": _largest_diff(trained_s, ref.student),
            "teacher_max_abs_diff": _largest_diff(trained_t, ref.teacher),
        }
        print(name, rows[name], flush=True)


def launch_queue_depth(device: torch.device, most: int = 4096) -> int | None:
    """Kernels the host can launch behind a long-running one before a launch blocks (the
    launch queue's depth): the first launch that takes over a millisecond, behind a 0.5 s spin."""
    if device.type != "cuda":
        return None
    from tspipe_fx.passes.timer import spin_cycles_per_ms

    x = torch.zeros(1, device=device)
    torch.cuda.synchronize(device)
    torch.cuda._sleep(int(spin_cycles_per_ms(device) * 500))
    depth = None
    for i in range(most):
        t0 = time.perf_counter()
        x.add_(1.0)
        if time.perf_counter() - t0 > 1e-3:
            depth = i
            break
    torch.cuda.synchronize(device)
    return depth


def host_rules(model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """The host's microseconds per operation of ``model``'s training step at ``x``, timed behind a
    spin as one step (None: the spin was over, the host may have waited) and in two parts (what
    a profile now does); with the host's return time and the wall time of a plain step."""
    from tspipe_fx.cost.launch import step_host_us
    from tspipe_fx.passes.measure import OpCount

    held: list[torch.Tensor] = []

    def forward() -> None:
        held[:] = [model(x).float().sum()]

    def backward() -> None:
        held.pop().backward()
        model.zero_grad(set_to_none=True)

    def step() -> None:
        forward()
        backward()

    step()
    with OpCount() as counted:
        step()
    host, wall = [], []
    for _ in range(5):
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        t0 = time.perf_counter()
        step()
        host.append(time.perf_counter() - t0)
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        wall.append(time.perf_counter() - t0)
    return {
        "host_us_whole": step_host_us(step, device),
        "host_us_parts": step_host_us((forward, backward), device),
        "ops": counted.count,
        "plain_host_ms": statistics.median(host) * 1e3,
        "plain_wall_ms": statistics.median(wall) * 1e3,
    }


def micro_batch_scaling(device: torch.device, smoke: bool, results: dict[str, Any]) -> None:
    """The flagship pair (ViT-L/16 teacher, ResNet-152 student) at the micro-batches compile
    weighs for a batch of 256 on 8 devices (M = 8, 16, 32: 32, 16 and 8 samples): the student's
    forward+backward and the teacher's forward measured on the device (wall time, launches
    included; median of 5), against the plan's per-micro-batch stage costs from profiles taken
    on the device now at batch 32 (scaled to the micro-batch, each node at least its operations
    times the host's cost per operation) and from the H100 roofline. Smoke: the shipped CPU
    profiles, micro-batches of 2 and 4, one repeat."""
    from tspipe_fx.cost.devices import device_spec
    from tspipe_fx.cost.launch import launch_us

    pair = "kd_vitl_r152"
    pp = profiled(pair, "cpu")
    student, teacher, _ = PAIRS[pair]()
    student, teacher = student.to(device).train(), teacher.to(device).eval()
    rows = results["micro_batch_scaling"] = {}
    timer = Timer(device)  # launches included: a host-bound model's time is its host's
    if not smoke:
        (x32,), _ = example(pair, 32)
        x32 = x32.to(device)
        profiles = tuple(
            tspipe_fx.profile(cap, (x32,), device=device, repeats=5) for cap in (pp.student, pp.teacher)
        )
        loop = launch_us(device)  # what a profile kept before it timed the model's own step
        before = dataclasses.replace(
            pp, profiles=tuple(dataclasses.replace(p, launch_us=loop, launch_bwd_us=loop) for p in profiles)
        )
        pp = dataclasses.replace(pp, profiles=profiles)
        results["micro_batch_scaling_launch_us"] = {"loop": loop,
                                                    "student": (profiles[0].launch_us, profiles[0].launch_bwd_us),
                                                    "teacher": (profiles[1].launch_us, profiles[1].launch_bwd_us),
                                                    "queue_depth": launch_queue_depth(device)}  # fmt: skip
    for micro in (2, 4) if smoke else (8, 16, 32):
        plans = {
            "profile": pp.compile(1, batch_size=micro, micro_batches=1, devices=[device]).plan,
            "loop_launch": (before if not smoke else pp).compile(1, batch_size=micro, micro_batches=1, devices=[device]).plan,
            "roofline": pp.compile(1, batch_size=micro, micro_batches=1, devices=[device], cost_model="roofline",
                                   device_specs=[device_spec("h100")]).plan,
        }  # fmt: skip
        (x,), _ = example(pair, micro)
        x = x.to(device)

        def student_step(x: torch.Tensor = x) -> None:
            student.zero_grad(set_to_none=True)  # as the profile's step: no accumulation
            student(x).float().sum().backward()

        def teacher_fwd(x: torch.Tensor = x) -> None:
            with torch.no_grad():
                teacher(x)

        repeats, warmup = (1, 1) if smoke else (5, 2)
        row = rows[str(micro)] = {
            "student_fwd_bwd_ms": timer.median_ms(student_step, repeats=repeats, warmup=warmup),
            "teacher_fwd_ms": timer.median_ms(teacher_fwd, repeats=repeats, warmup=warmup),
        }
        row.update(host_rules(student, x, device))
        student.zero_grad(set_to_none=True)
        for how, plan in plans.items():
            s, t = plan.student.stages[0], plan.teacher.stages[0]
            row[f"student_{how}_ms"] = s.fwd_ms + s.bwd_ms
            row[f"teacher_{how}_ms"] = t.fwd_ms
        print(f"micro-batch {micro}: {row}", flush=True)
