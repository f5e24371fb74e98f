"""Schedules simulated on profiled costs, and the local runtime's overhead against plain PyTorch.

    python benchmarks/schedule/run.py simulate [--pairs ...] [--gpus 2 4 8] [--profiles h100 --link nvlink4]
    python benchmarks/schedule/run.py balance [--profiles h100] [--links nvlink4 pcie4]
    python benchmarks/schedule/run.py auto [--pairs ...] [--gpus 8] [--device h100] [--link nvlink4]
    python benchmarks/schedule/run.py plan_speed [--rounds 3]
    python benchmarks/schedule/run.py overhead [--repeats 15]

``simulate``: for each paper pair (CPU profiles of ``benchmarks/partition``, scaled to the
paper's batch sizes) and device count, compile, take the plan's per-stage costs per micro-batch
and simulate ``tspipe``, ``gpipe``, ``1f1b`` (M micro-batches) and ``sequential`` (one
micro-batch: inter-layer model parallelism, the paper's baseline, compiled at full batch), and
``auto`` compiled as a user would (compile chooses M; the loss per micro-batch).
Transfers cost cut bytes / 10 GB/s, or over ``--link`` (``tspipe_fx.cost.devices.LINKS``: bandwidth
and latency; the partitioner sees the same link). ``--profiles h100`` costs with the H100
profiles of ``benchmarks/gpu/`` instead of the CPU ones (the pairs they exist for). Prints periods,
tspipe's speed-up over each, and auto's over sequential.

``balance``: the KD pair (ViT-L/16 -> ResNet-152, 4 stages, batch 256) cut by our partitioner
and by the TSPipe repository's hand-written balance lists mapped onto our graphs, both costed
alike and simulated under the ``tspipe`` schedule.

``overhead``: one device, the same KD pair, a tspipe_fx trainer step against a plain eager step
(teacher forward under no_grad, student forward, loss, backward, SGD step), alternated, medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).parent.parent))
from pairs import PAIRS, profiled

import tspipe_fx
from tspipe_fx.cost.devices import LINKS
from tspipe_fx.plan import simulate_plan

BATCH = {"kd_vitl_r152": 256, "kd_bertl_distilbertl": 128, "byol_r18": 256, "mocov3_vitb": 256}
PAPER = {"kd_vitl_r152": "4.68x over sequential (8 V100, KD ViT-L -> ResNet-152)",
         "mocov3_vitb": "12.15x over sequential (16 V100, MoCo v3 ViT)"}  # fmt: skip


def period(
    pipe: tspipe_fx.Pipeline, name: str, views: int, mode: str, link: tuple[float, float] = (10.0, 0.0)
) -> float:
    """The steady-state period of schedule ``name`` on the plan's per-stage costs (ms a batch)."""
    return simulate_plan(pipe.plan, name, views=views, n_batches=6, link=link).period


def simulate_pairs(args: argparse.Namespace) -> None:
    from tspipe_fx.cost.devices import device_spec

    rows = []
    link = LINKS[args.link] if args.link else (10.0, 0.0)
    for pair in args.pairs:
        pp = profiled(pair, args.profiles)
        mode = pp.mode
        views = 2 if mode == "momentum" else 1
        for n in args.gpus:
            hw: dict[str, Any] = {}
            if args.link:  # the partitioner weighs the same link
                hw["device_specs"] = [device_spec(args.profiles).with_link(args.link)] * n
            pipe = pp.compile(n, micro_batches=n, batch_size=BATCH[pair], **hw)
            whole = pp.compile(n, micro_batches=1, batch_size=BATCH[pair], **hw)
            best = pp.compile(n, batch_size=BATCH[pair], loss=LOSS[pair], **hw)  # auto: M, loss per micro-batch
            p = {name: period(pipe, name, views, mode, link) for name in ("tspipe", "gpipe", "1f1b")}
            p["sequential"] = period(whole, "sequential", views, mode, link)
            p["auto"] = period(best, "auto", views, mode, link)
            rows.append([pair, n, *(f"{p[k] / 1e3:.2f}" for k in ("auto", "tspipe", "gpipe", "1f1b", "sequential")),
                         *(f"{p[k] / p['tspipe']:.2f}x" for k in ("gpipe", "1f1b", "sequential")),
                         f"{p['sequential'] / p['auto']:.2f}x", PAPER.get(pair, "")])  # fmt: skip
            print(rows[-1], flush=True)
    print(tabulate(rows, headers=["pair", "gpus", "auto s", "tspipe s", "gpipe s", "1f1b s", "sequential s", "tspipe vs gpipe",
                                  "tspipe vs 1f1b", "tspipe vs sequential", "auto vs sequential", "paper"],
                   tablefmt="github", disable_numparse=True))  # fmt: skip


# The TSPipe repository's hand-written 4-stage split of its soft-target KD benchmark
# (benchmarks/soft_target/tspipe.yaml: online [7, 8, 16, 26], target [8, 4, 4, 14] layers of its
# flattened nn.Sequential models). ResNet-152 flattens to conv1, bn1, relu, maxpool, the 50
# bottlenecks, avgpool, flatten, fc; ViT-L/16 to patch_embed, cls token, pos drop, the 24 blocks,
# norm, pre-logits, head. As split points of our graphs, by module name:
TSPIPE_BALANCE = {"kd_vitl_r152": (["layer2.0", "layer3.0", "layer3.16"], ["blocks.5", "blocks.9", "blocks.13"])}


def balance(args: argparse.Namespace) -> None:
    """Our partition against the TSPipe repository's hand-written balance, both scored and
    simulated on the same costs, for every link."""
    from tspipe_fx.cost.devices import device_spec

    rows = []
    for pair, split in TSPIPE_BALANCE.items():
        pp = profiled(pair, args.profiles)
        n = len(split[0]) + 1
        for link_name in args.links:
            hw = {"device_specs": [device_spec(args.profiles).with_link(link_name)] * n}
            link = LINKS[link_name]
            ours = pp.compile(n, micro_batches=n, batch_size=BATCH[pair], **hw)
            theirs = pp.compile(n, micro_batches=n, batch_size=BATCH[pair], balance=split, **hw)
            p_ours, p_theirs = (period(x, "tspipe", 1, pp.mode, link) for x in (ours, theirs))
            rows.append([pair, args.profiles, link_name, n, f"{ours.plan.max_load_ms:.1f}", f"{theirs.plan.max_load_ms:.1f}",
                         f"{p_ours:.1f}", f"{p_theirs:.1f}", f"{p_theirs / p_ours:.2f}x"])  # fmt: skip
            print(rows[-1], flush=True)
    print(tabulate(rows, headers=["pair", "costs", "link", "gpus", "load ours ms", "load TSPipe's ms", "tspipe ours ms",
                                  "tspipe TSPipe's ms", "TSPipe's / ours"], tablefmt="github", disable_numparse=True))  # fmt: skip


LOSS = {"kd_vitl_r152": "micro", "kd_bertl_distilbertl": "micro", "byol_r18": "micro",
        "mocov3_vitb": "micro_full_teacher"}  # fmt: skip


def auto(args: argparse.Namespace) -> None:
    """The synthesized schedule against the fixed ones and the physical limit: each paper pair
    planned with roofline costs of ``--device`` and ``--link`` for ``--gpus`` devices
    (``schedule="auto"``, the loss per micro-batch, M chosen by compile), then simulated: auto
    as planned and with finer teacher micro-batches, tspipe on the same partition."""
    import dataclasses

    import tspipe_fx
    from tspipe_fx.cost.devices import device_spec

    rows = []
    for pair in args.pairs:
        pp = profiled(pair, "cpu")  # (the captures; costs come from the roofline)
        views = 2 if pp.mode == "momentum" else 1
        n = args.gpus
        t0 = time.perf_counter()
        pipe = tspipe_fx.compile(pp.student, pp.teacher, n, example_inputs=pp.inputs, example_kwargs=pp.kwargs,
                                 mode=pp.mode, batch_size=BATCH[pair], cost_model="roofline", schedule="auto",
                                 loss=LOSS[pair], views=views,
                                 device_specs=[device_spec(args.device).with_link(args.link)] * n)  # fmt: skip
        compile_s = time.perf_counter() - t0
        plan = pipe.plan
        bound = plan.lower_bound_ms
        for name, parts in (("tspipe", 1), ("auto", 1), ("auto", 2), ("auto", 4)):
            t0 = time.perf_counter()
            tl = simulate_plan(dataclasses.replace(plan, schedule=name, teacher_parts=parts), n_batches=6)
            took = time.perf_counter() - t0
            label = name if parts == 1 else f"{name}, teacher_parts={parts}"
            rows.append([pair, n, plan.micro_batches, label, f"{tl.period:.1f}", f"{bound / tl.period:.3f}",
                         f"{tl.period / bound:.2f}x", f"{plan.busiest_ms / bound:.2f}x",
                         f"{took:.1f}" if name == "auto" else "", f"{compile_s:.0f}" if name == "tspipe" else ""])  # fmt: skip
            print(rows[-1], flush=True)
    print(tabulate(rows, headers=["pair", "gpus", "M", "schedule", "ms per batch", "efficiency", "vs lower bound",
                                  "busiest device vs bound", "synthesis s", "compile s"], tablefmt="github",
                   disable_numparse=True))  # fmt: skip


def overhead(args: argparse.Namespace) -> None:
    import copy

    import timm

    torch.manual_seed(0)
    torch.set_num_threads(1)
    student = timm.create_model("resnet18", pretrained=False, num_classes=10)
    teacher = timm.create_model("resnet34", pretrained=False, num_classes=10).eval()
    x, y = torch.randn(32, 3, 64, 64), torch.randint(0, 10, (32,))

    def loss_fn(s: torch.Tensor, t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(s, target) + F.kl_div(
            F.log_softmax(s, -1), F.softmax(t, -1), reduction="batchmean"
        )

    eager_s, eager_t = copy.deepcopy(student), copy.deepcopy(teacher)
    opt = torch.optim.SGD(eager_s.parameters(), lr=0.01)
    pipe = tspipe_fx.compile(student, teacher, 1, example_inputs=(x,), cost_model="uniform")
    trainer = pipe.trainer(loss_fn, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.01))

    def eager_step() -> None:
        with torch.no_grad():
            t = eager_t(x)
        loss_fn(eager_s(x), t, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def ours_step() -> None:
        trainer.step(x, target=y)

    for _ in range(3):
        eager_step()
        ours_step()
    e, o = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        eager_step()
        e.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ours_step()
        o.append(time.perf_counter() - t0)
    trainer.finish()
    em, om = statistics.median(e), statistics.median(o)
    print(tabulate([["eager PyTorch", f"{em * 1e3:.1f}"], ["tspipe_fx, 1 device", f"{om * 1e3:.1f}"], ["ratio", f"{om / em:.3f}"]],
                   headers=["step (ResNet-34 -> ResNet-18, batch 32, 64x64, 1 thread)", "median ms"], tablefmt="github"))  # fmt: skip


def plan_speed(args: argparse.Namespace) -> None:
    """Planning a synthetic 5,000-node pair into 8 stages with its synthesized schedule: the
    min-max solve, the student-capped partitions ranked by the quick estimate, the best two
    synthesized in full (what compile does for ``schedule="auto"``), costs and capture aside."""
    import random

    from tspipe_fx.partition import Chain, Device, Problem, solve
    from tspipe_fx.partition.balance import fastest, schedule_period
    from tspipe_fx.schedule.generators import make_schedule

    def chain(rng: random.Random, n: int = 5000) -> Chain:
        pos = sorted(rng.sample(range(1, n), 128))
        return Chain(
            tuple(rng.random() for _ in range(n)), tuple(2 * rng.random() for _ in range(n)),
            tuple(rng.randint(0, 10**6) for _ in range(n)), tuple(rng.randint(0, 10**5) for _ in range(n)),
            tuple((p, rng.randint(10**5, 10**7)) for p in pos),
        )  # fmt: skip

    rows, times = [], []
    for seed in range(args.rounds):  # a new pair each round: nothing cached from the last
        rng = random.Random(seed)
        problem = Problem(chain(rng), chain(rng), tuple(Device(link_gbs=100.0, link_latency_ms=0.01) for _ in range(8)),
                          micro_batches=8)  # fmt: skip
        skeleton = make_schedule("tspipe", 8, 8, loss="micro", n_batches=4)
        t0 = time.perf_counter()
        start = solve(problem)
        t1 = time.perf_counter()
        part = fastest(problem, start, skeleton, synthesize=True)
        took = time.perf_counter() - t0
        times.append(took)
        s, t = problem.student, problem.teacher
        assert t is not None
        bound = 8 * (sum(s.fwd_ms) + sum(s.bwd_ms) + sum(t.fwd_ms)) / 8  # M micro-batches over 8 devices
        rows.append([seed, f"{t1 - t0:.2f}", f"{took:.2f}",
                     f"{schedule_period(problem, start, skeleton, synthesize=True) / bound:.3f}x",
                     f"{schedule_period(problem, part, skeleton, synthesize=True) / bound:.3f}x"])  # fmt: skip
        print(rows[-1], flush=True)
    print(tabulate(rows, headers=["pair (seed)", "min-max solve s", "plan with schedule s", "auto on min-max vs bound",
                                  "auto on chosen vs bound"], tablefmt="github", disable_numparse=True))  # fmt: skip
    print(f"median plan with schedule: {statistics.median(times):.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="part", required=True)
    sim = sub.add_parser("simulate")
    sim.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    sim.add_argument("--gpus", nargs="+", type=int, default=[2, 4, 8])
    sim.add_argument("--profiles", default="cpu", help="cpu, or h100 (benchmarks/gpu/'s profiles)")
    sim.add_argument(
        "--link", default=None, help="a tspipe_fx.cost.devices.LINKS name (default: 10 GB/s, no latency)"
    )
    bal = sub.add_parser("balance", help="ours against the TSPipe repository's hand-written balance")
    bal.add_argument("--profiles", default="h100", help="h100 (benchmarks/gpu/'s profiles), or cpu")
    bal.add_argument("--links", nargs="+", default=["nvlink4", "pcie4"])
    aut = sub.add_parser("auto", help="the synthesized schedule on roofline plans of the paper's pairs")
    aut.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    aut.add_argument("--gpus", type=int, default=8)
    aut.add_argument("--device", default="h100")
    aut.add_argument("--link", default="nvlink4")
    spd = sub.add_parser("plan_speed", help="a synthetic 5,000-node pair planned into 8 stages with auto")
    spd.add_argument("--rounds", type=int, default=3)
    ovh = sub.add_parser("overhead")
    ovh.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    {"simulate": simulate_pairs, "balance": balance, "auto": auto, "plan_speed": plan_speed,
     "overhead": overhead}[args.part](args)  # fmt: skip


if __name__ == "__main__":
    main()
