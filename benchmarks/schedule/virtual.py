"""Do virtual stages pay? Momentum pairs on H100s (roofline), one stage per device against two.

    python benchmarks/schedule/virtual.py [--pair vit_b16] [--gpus 16] [--slack 0.2 0.4 0.6 1.0]  # ~4 min
    python benchmarks/schedule/virtual.py --pair byol_r18 --gpus 8

Compiles the issue's momentum workload as the CLI does (``tspipe-fx plan
timm:vit_base_patch16_224 --mode momentum --gpus 16 --batch 256 --cost-model roofline
--device-spec h100 --link nvlink4 --schedule auto --loss micro_full_teacher``): one stage per
device, its period simulated. Then the same partition problem cut into two stages per device
(``tspipe_fx.partition.interleave.interleaved``, device ``d`` holding stages ``d`` and
``d + N``, each stage at most ``(1 + slack) / 2`` of the period sought), its schedule synthesized
(``auto`` with ``stages_per_device=2``, the same M, loss and memory cap) and simulated on the
same costs; and what compile takes with ``stages_per_device="auto"`` (its caps, the faster of one
and two stages per device). Prints each one's period, its busiest device's compute and the
lower bound.
``--pair byol_r18`` or ``mocov3_vitb``: the paper's momentum pairs (``benchmarks/pairs.py``,
batch 256, their loss as in ``run.py auto``) instead.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import timm
import torch
from tabulate import tabulate

import tspipe_fx
from tspipe_fx.cost.devices import device_spec
from tspipe_fx.partition.interleave import interleaved, stage_problem
from tspipe_fx.partition.objective import schedule_costs
from tspipe_fx.schedule.generators import make_schedule
from tspipe_fx.schedule.simulator import simulate_costs

sys.path.insert(0, str(Path(__file__).parent.parent))
from pairs import profiled

LOSS = {"vit_b16": "micro_full_teacher", "mocov3_vitb": "micro_full_teacher", "byol_r18": "micro"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", default="vit_b16", choices=list(LOSS))
    parser.add_argument("--gpus", type=int, default=16)
    parser.add_argument("--slack", type=float, nargs="+", default=[0.2, 0.4, 0.5, 0.6, 1.0])
    args = parser.parse_args()
    n = args.gpus
    loss = LOSS[args.pair]
    if args.pair == "vit_b16":
        model = timm.create_model("vit_base_patch16_224", pretrained=False)
        student, teacher, inputs, kwargs = model, copy.deepcopy(model), (torch.randn(2, 3, 224, 224),), None
    else:
        pp = profiled(args.pair, "cpu")  # (the captures; costs come from the roofline)
        student, teacher, inputs, kwargs = pp.student, pp.teacher, pp.inputs, pp.kwargs
    t0 = time.perf_counter()
    pipe = tspipe_fx.compile(student, teacher, n, example_inputs=inputs, example_kwargs=kwargs, mode="momentum",
                             batch_size=256, cost_model="roofline", schedule="auto", loss=loss, views=2,
                             device_specs=[device_spec("h100").with_link("nvlink4")] * n)  # fmt: skip
    plan = pipe.plan
    m, bound = plan.micro_batches, plan.lower_bound_ms
    print(f"compiled in {time.perf_counter() - t0:.0f} s: M = {m}, lower bound {bound:.1f} ms", flush=True)
    rows = [["compile, one stage per device", "", f"{plan.period_ms:.1f}", f"{plan.busiest_ms:.1f}",
             f"{plan.period_ms / bound:.3f}x", f"{plan.busiest_ms / bound:.3f}x", ""]]  # fmt: skip
    print(rows[-1], flush=True)
    t0 = time.perf_counter()
    two = tspipe_fx.compile(student, teacher, n, example_inputs=inputs, example_kwargs=kwargs, mode="momentum",
                            batch_size=256, cost_model="roofline", schedule="auto", loss=loss, views=2,
                            device_specs=[device_spec("h100").with_link("nvlink4")] * n,
                            stages_per_device="auto")  # fmt: skip
    p2 = two.plan
    rows.append([f"compile, stages_per_device='auto': {p2.stages_per_device} per device", "",
                 f"{p2.period_ms:.1f}", f"{p2.busiest_ms:.1f}", f"{p2.period_ms / bound:.3f}x",
                 f"{p2.busiest_ms / bound:.3f}x", f"{time.perf_counter() - t0:.0f}"])  # fmt: skip
    print(rows[-1], flush=True)
    problem = pipe.partitioner.problem(pipe.student_costs, pipe.teacher_costs)
    for slack in args.slack:
        t0 = time.perf_counter()
        part = interleaved(problem, stage_slack=slack)
        costs = schedule_costs(stage_problem(problem, 2), part.student_cuts, part.teacher_cuts)
        s = make_schedule("auto", 2 * n, m, views=2, mode="momentum", loss=loss, costs=costs,
                          stages_per_device=2, n_batches=6)  # fmt: skip
        period = simulate_costs(s, costs).period
        busiest = max(costs.loads_ms(m, 2, stages_per_device=2))
        rows.append(["two stages per device", f"{slack:g}", f"{period:.1f}", f"{busiest:.1f}",
                     f"{period / bound:.3f}x", f"{busiest / bound:.3f}x", f"{time.perf_counter() - t0:.0f}"])  # fmt: skip
        print(rows[-1], flush=True)
    print(tabulate(rows, headers=["partition", "stage slack", "ms per batch", "busiest device ms", "period vs bound",
                                  "busiest vs bound", "s"], tablefmt="github", disable_numparse=True))  # fmt: skip


if __name__ == "__main__":
    main()
