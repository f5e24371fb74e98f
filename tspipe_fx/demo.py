"""``make demo``: capture, profile and compile a real teacher-student pair on this machine's CPU.

The pair of the TSPipe paper's KD setting, scaled to a CPU: a timm ViT-B/16 teacher and a
ResNet-18 student, both from their configs (no weights are downloaded), batch 2 at 224x224.
Prints each model's per-module cost table, what three cost models make of it, and the plan
that cuts the pair into 2 pipeline stages for a batch of 64 in 4 micro-batches.
"""

from __future__ import annotations

import argparse
import time

import torch

import tspipe_fx
from tspipe_fx.cost_model import MeasuredCost, ParamCountCost, RooflineCost
from tspipe_fx.passes import annotate_structure, annotate_symbolic

__all__: list[str] = []


def main(argv: list[str] | None = None) -> None:
    import timm

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", default="vit_base_patch16_224")
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224)
    measured = {}
    for role, name in (("teacher", args.teacher), ("student", args.student)):
        model = timm.create_model(name, pretrained=False)
        if role == "teacher":
            model.eval()  # a KD teacher runs in eval mode
        t0 = time.perf_counter()
        captured = tspipe_fx.capture(model, (x,))
        t1 = time.perf_counter()
        prof = tspipe_fx.profile(captured, (x,), repeats=args.repeats)
        t2 = time.perf_counter()
        measured[role] = (captured, prof)
        print(
            f"\n== {role}: {name} (captured with {captured.method} in {t1 - t0:.1f} s, profiled in {t2 - t1:.1f} s)"
        )
        print(prof.report(by="module"))

        gm = prof.attach(captured)
        annotate_structure(gm)
        annotate_symbolic(gm, captured.flatten_inputs((x,), {}))
        print(f"\ncost models on {name}, per micro-batch of {args.batch} and of 1:")
        for cm in (MeasuredCost(prof), MeasuredCost(prof, batch_size=1), RooflineCost("h100"),
                   RooflineCost("h100", batch_size=1), ParamCountCost()):  # fmt: skip
            costs = cm.graph_costs(gm)
            fwd, bwd = sum(c.fwd_ms for c in costs), sum(c.bwd_ms for c in costs)
            batch = getattr(cm, "batch_size", None) or getattr(
                getattr(cm, "scaling", None), "target", {}
            ).get("B")
            print(f"  {cm.name:9s} batch {batch or args.batch}: fwd {fwd:10.3f}  bwd {bwd:10.3f}")
    print("\nms for measured (this CPU) and roofline (an H100), MiB-proportional units for params")

    (s_cap, s_prof), (t_cap, t_prof) = measured["student"], measured["teacher"]
    t0 = time.perf_counter()
    pipe = tspipe_fx.compile(
        s_cap, t_cap, 2, example_inputs=(x,), profile=(s_prof, t_prof), batch_size=64, micro_batches=4
    )
    print(f"\n== plan: 2 stages on this CPU, compiled in {time.perf_counter() - t0:.1f} s")
    print(pipe.report())

    # The plan's costs through the schedule simulator: where the teacher fills the bubbles.
    from tspipe_fx.schedule import make_schedule
    from tspipe_fx.simulate import simulate

    stages = list(zip(pipe.plan.student.stages, pipe.plan.teacher.stages, strict=True))
    cost = {
        "sf": [s.fwd_ms for s, _ in stages],
        "sb": [s.bwd_ms for s, _ in stages],
        "tf": [t.fwd_ms for _, t in stages],
    }
    for name in ("tspipe", "gpipe"):
        timeline = simulate(
            make_schedule(name, 2, 4, n_batches=3), lambda t: cost.get(t.kind, [0.0, 0.0])[t.stage]
        )
        print(f"\n== {name} schedule, simulated on these costs: {timeline.period:.0f} ms per batch")
        print(timeline.ascii(scale=timeline.makespan / 100))

    # Train a few steps through the local runtime (2 CPU worker threads), weights come home.
    import torch.nn.functional as F

    def kd_loss(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(s, y) + F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="batchmean")

    trainer = pipe.trainer(kd_loss, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.01), micro_batches=2)
    print("\n== training 4 batches of 4 through the pipeline (tspipe schedule, local runtime)")
    t0 = time.perf_counter()
    for _ in range(4):
        done = trainer.step(torch.randn(4, 3, 224, 224), target=torch.randint(0, 1000, (4,)))
        if done is not None:
            print(f"  batch {done.batch}: loss {done.loss:.4f}")
    done = trainer.finish()
    assert done is not None
    print(
        f"  batch {done.batch}: loss {done.loss:.4f}   ({time.perf_counter() - t0:.1f} s; the student module now holds the trained weights)"
    )


if __name__ == "__main__":
    main()
