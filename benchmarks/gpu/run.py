"""The GPU script (issues 7, 14, 15): runtime equality, micro-batch scaling, training options,
memory, profiles and cost-model fidelity on one GPU.

    python benchmarks/gpu/run.py --out "$OUT"            # on the GPU machine, under 8 minutes
    python benchmarks/gpu/run.py --out /tmp/x --smoke    # on a CPU: tiny sizes, checks the script
    python benchmarks/gpu/run.py --out "$OUT" --steps equality scaling   # some steps only

Steps, in the order they run (``--steps`` names them):

- ``equality`` (issue 14): every schedule (tspipe, gpipe, 1f1b, auto with its loss per batch or
  per micro-batch, split backward, finer teacher parts; momentum at staleness 0 and 1, two stages
  per device, InfoNCE per query micro-batch) in the local runtime, its stages on the one device
  on their own streams, against the reference trainer there (``schedules.py``).
- ``scaling`` (issue 14): the flagship pair's models at micro-batches of 8, 16 and 32, measured
  against the plan's costs from the H100 profiles and the roofline (``schedules.py``).
- ``training`` (issue 15): step time and peak memory of fp32, bf16, compiled stages and
  recompute, a ResNet-18 student and a ViT-S/16 teacher, 2 stages on the device
  (``benchmarks/training/run.py``'s contenders).
- ``memory`` (issue 15): one stage's predicted peak (``plan.memory``, measured costs) against
  ``max_memory_allocated`` while it trains, for fp32, recompute and bf16.
- ``profiles`` (issue 7): the paper's models (ViT-L/16, ResNet-152, ResNet-18, ViT-S/16, ViT-B/16,
  BERT-large, DistilBERT-large) at batch 32 (BERT: 8 x 128 tokens) on the device; writes
  ``profiles.tar.gz`` holding ``TAG/NAME_bB.json`` (unpack into ``tspipe_fx/cost/profiles/``).
- ``fidelity`` (issue 7): a 4-stage plan of each KD pair from those profiles; each stage
  GraphModule's measured forward and backward time against the plan's prediction.

Writes ``results.json`` and ``results.md`` after every step, so a run cut short still returns
what it measured; a step that fails records its error and the rest go on. Steps start only
while the time budget (``--budget`` seconds) lasts.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import tspipe_fx
from tspipe_fx.passes.timer import Timer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from schedules import micro_batch_scaling, schedule_equality


def models(smoke: bool) -> dict[str, Any]:
    import timm
    from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

    if smoke:
        return {
            "resnet18": lambda: timm.create_model("resnet18", pretrained=False, num_classes=10),
            "vit_s16": lambda: timm.create_model("vit_small_patch16_224", pretrained=False, depth=2, img_size=64),
            "distilbert": lambda: DistilBertForMaskedLM(DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64)),
        }  # fmt: skip
    return {
        "vit_l16": lambda: timm.create_model("vit_large_patch16_224", pretrained=False),
        "resnet152": lambda: timm.create_model("resnet152", pretrained=False),
        "resnet18": lambda: timm.create_model("resnet18", pretrained=False),
        "vit_s16": lambda: timm.create_model("vit_small_patch16_224", pretrained=False),
        "vit_b16": lambda: timm.create_model("vit_base_patch16_224", pretrained=False),
        "bert_large": lambda: BertForMaskedLM(BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)),
        "distilbert_large": lambda: DistilBertForMaskedLM(DistilBertConfig(dim=1024, n_layers=12, n_heads=16, hidden_dim=4096)),
    }  # fmt: skip


def batch_for(
    name: str, batch: int, device: torch.device, smoke: bool
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if "bert" in name:
        ids = torch.randint(
            0, 100 if smoke else 30522, (max(batch // 4, 2), 16 if smoke else 128), device=device
        )
        return (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    size = 64 if smoke else 224
    return (torch.randn(batch, 3, size, size, device=device),), {}


def device_tag(device: torch.device) -> str:
    """``h100`` for "NVIDIA H100 80GB HBM3": the chip's model number, lower case."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device)
    chips = re.findall(r"\b[A-Z]+\d{2,4}[A-Za-z]*\b", name.replace("NVIDIA", ""))
    return (chips[0] if chips else name.split()[-1]).lower()


def profile_all(
    out: Path,
    device: torch.device,
    batch: int,
    smoke: bool,
    results: dict[str, Any],
    left: Callable[[], float],
    only: list[str] | None = None,
) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    tag = "smoke" if smoke else device_tag(device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / tag
        for name, build in models(smoke).items():
            if only and name not in only:
                continue
            if left() < 60:
                results["skipped"].append(f"profile {name}: out of time")
                continue
            t0 = time.perf_counter()
            try:
                kept[name] = profile_one(name, build, root, device, batch, smoke, results)
            except Exception:  # noqa: BLE001 - recorded in the results, the other models go on
                results["errors"][f"profile {name}"] = traceback.format_exc(limit=-6)
                print(results["errors"][f"profile {name}"], flush=True)
                continue
            results["profiles"][name]["seconds"] = round(time.perf_counter() - t0, 1)
            print(name, results["profiles"][name], flush=True)
            with tarfile.open(out / "profiles.tar.gz", "w:gz") as tar:
                tar.add(root, arcname=tag)
            write_results(out, results)
    return kept


def profile_one(
    name: str,
    build: Callable[[], torch.nn.Module],
    root: Path,
    device: torch.device,
    batch: int,
    smoke: bool,
    results: dict[str, Any],
) -> tuple[Any, ...]:
    """Capture and profile one model; saves ``root/NAME_bB.json``."""
    model = build().to(device)
    args, kwargs = batch_for(name, batch, device, smoke)
    captured = tspipe_fx.capture(model, args, example_kwargs=kwargs)
    prof = tspipe_fx.profile(captured, args, example_kwargs=kwargs, device=device, repeats=3 if smoke else 5)
    b = prof.sizes["B"]
    prof.save(root / f"{name}_b{b}.json")
    results["profiles"][name] = {
        "nodes": len(prof.nodes), "batch": b,
        "fwd_ms": prof.model_fwd_ms, "fwd_bwd_ms": prof.model_fwd_bwd_ms,
        "fidelity_fwd": prof.fidelity_fwd, "fidelity_fwd_bwd": prof.fidelity_fwd_bwd,
    }  # fmt: skip
    return (model, captured, prof, args, kwargs)


def stage_fidelity(
    kept: dict[str, Any],
    device: torch.device,
    pairs: list[tuple[str, str]],
    results: dict[str, Any],
    left: Callable[[], float],
) -> None:
    """Each stage of a 4-stage plan: measured fwd/bwd on the device against the plan."""
    timer = Timer(device)
    for student, teacher in pairs:
        if student not in kept or teacher not in kept or left() < 30:
            results["skipped"].append(f"stage fidelity {teacher}->{student}: no profile or out of time")
            continue
        _, s_cap, s_prof, args, kwargs = kept[student]
        _, t_cap, t_prof, _, _ = kept[teacher]
        pipe = tspipe_fx.compile(s_cap, t_cap, 4, example_inputs=args, example_kwargs=kwargs, profile=(s_prof, t_prof),
                                 micro_batches=1, devices=[device] * 4)  # fmt: skip
        flat = s_cap.flatten_inputs(args, kwargs)
        env = dict(zip(pipe.student_io[0].inputs, flat, strict=True))
        rows = []
        for io, plan_stage in zip(pipe.student_io, pipe.plan.student.stages, strict=True):
            box: dict[str, Any] = {}

            def setup(io: Any = io, box: dict[str, Any] = box, env: dict[str, Any] = env) -> None:
                # Inputs as the runtime gives them: leaves that need grad, cloned (a stage may write to them).
                box["xs"] = [env[n].detach().requires_grad_().clone() if isinstance(env[n], torch.Tensor) and env[n].is_floating_point()
                             else env[n] for n in io.inputs]  # fmt: skip

            def fwd(io: Any = io, box: dict[str, Any] = box) -> None:
                box["out"] = io.module(*box["xs"])

            def bwd(box: dict[str, Any] = box) -> None:
                outs = [o for o in box["out"] if isinstance(o, torch.Tensor) and o.requires_grad]
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs], retain_graph=True)

            f_ms = timer.median_ms(fwd, repeats=5, warmup=2, setup=setup)
            setup()
            fwd()  # one clean graph for the backward timings
            b_ms = timer.median_ms(bwd, repeats=5, warmup=2)
            rows.append({"stage": plan_stage.index, "fwd_ms": f_ms, "fwd_pred_ms": plan_stage.fwd_ms,
                         "bwd_ms": b_ms, "bwd_pred_ms": plan_stage.bwd_ms,
                         "fwd_err": f_ms / plan_stage.fwd_ms - 1 if plan_stage.fwd_ms else None,
                         "bwd_err": b_ms / plan_stage.bwd_ms - 1 if plan_stage.bwd_ms else None})  # fmt: skip
            env.update(
                zip(
                    io.outputs,
                    [o.detach() if isinstance(o, torch.Tensor) else o for o in box["out"]],
                    strict=True,
                )
            )
        results["stage_fidelity"][f"{teacher}->{student}"] = rows
        print(f"{teacher}->{student}", rows, flush=True)


def training_options(device: torch.device, smoke: bool, results: dict[str, Any]) -> None:
    """Issue 15 on the device: each training option's step time and peak memory, side by side."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from training.run import CONTENDERS, pair, time_contenders

    image, batch = (64, 8) if smoke else (224, 64)
    student, teacher = (m.to(device) for m in pair(image))
    x = torch.randn(batch, 3, image, image, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    pipe = tspipe_fx.compile(student, teacher, 2, example_inputs=(x,), micro_batches=4, cost_model="uniform",
                             devices=[device, device])  # fmt: skip
    names = [n for n in CONTENDERS if not (smoke and "compiled" in n)]  # CPU compiles take minutes
    results["training"] = time_contenders(pipe, x, y, names, 1 if smoke else 3, 1 if smoke else 3,
                                          lambda m: print(m, flush=True))  # fmt: skip


def memory(device: torch.device, smoke: bool, results: dict[str, Any]) -> None:
    """Issue 15.5 on the device: the plan's predicted peak of one stage against
    ``max_memory_allocated`` over 3 steps (above what was allocated before the trainer), for
    fp32, recompute and bf16; in smoke mode (CPU) the prediction only."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from training.run import kd_loss, pair, sgd

    image, batch = (32, 8) if smoke else (224, 64)
    student, teacher = (m.to(device) for m in pair(image))
    x = torch.randn(batch, 3, image, image, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    cuda = device.type == "cuda"
    rows = results["memory"] = {}
    for name, options in (
        ("fp32", {}),
        ("recompute", {"recompute": "always"}),
        ("bf16", {"precision": "bf16"}),
    ):
        pipe = tspipe_fx.compile(student, teacher, 1, example_inputs=(x[: batch // 4],), batch_size=batch,
                                 micro_batches=4, devices=[device], optimizer_factor=1.0,
                                 cost_model="roofline" if smoke else None, **options)  # fmt: skip
        row = rows[name] = {"predicted_mib": pipe.plan.memory[0].total / 2**20}
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            trainer = pipe.trainer(kd_loss, optimizer=sgd)
            for _ in range(3):
                trainer.step(x, target=y)
            torch.cuda.synchronize()
            row["measured_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            trainer.finish()
            del trainer
        print(f"memory {name}: {row}", flush=True)


STEPS = ("equality", "scaling", "training", "memory", "profiles", "fidelity")  # in the order they run


def write_results(out: Path, results: dict[str, Any]) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1))
    lines = [f"# GPU run on {results.get('device_name', results['device'])} (torch {results['torch']}), "
             f"{results.get('seconds', '?')} s", "",
             "| model | nodes | batch | fwd ms | fwd+bwd ms | fidelity fwd | fidelity fwd+bwd |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {k} | {v['nodes']} | {v['batch']} | {v['fwd_ms']:.2f} | {v['fwd_bwd_ms']:.2f} | {v['fidelity_fwd']:.2f} | {v['fidelity_fwd_bwd']:.2f} |"
              for k, v in results["profiles"].items()]  # fmt: skip
    for pair, rows in results["stage_fidelity"].items():
        errs = [abs(r["fwd_err"]) for r in rows if r["fwd_err"] is not None]
        berrs = [abs(r["bwd_err"]) for r in rows if r["bwd_err"] is not None]
        lines.append(f"\n{pair}: median |error| per stage, forward {statistics.median(errs):.1%}, "
                     f"backward {statistics.median(berrs):.1%}" if errs and berrs else f"\n{pair}")  # fmt: skip
    if results.get("schedule_equality"):
        lines += [
            "",
            "| schedule | stages | M | split backward | loss rel. diff | student param diff | teacher param diff |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {k} | {v['stages']} | {v['micro_batches']} | {v['split_backward']} | {v['loss_max_rel_diff']:.1e} | "
            f"{v['param_max_abs_diff']:.1e} | {v['teacher_max_abs_diff']:.1e} |"
            for k, v in results["schedule_equality"].items()
        ]
    if results.get("micro_batch_scaling"):
        lines += [
            "",
            "| micro-batch | student fwd+bwd ms | profile | profile, loop launch | roofline | teacher fwd ms | profile | profile, loop launch | roofline |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {k} | {v['student_fwd_bwd_ms']:.2f} | {v['student_profile_ms']:.2f} | {v['student_loop_launch_ms']:.2f} | "
            f"{v['student_roofline_ms']:.2f} | {v['teacher_fwd_ms']:.2f} | {v['teacher_profile_ms']:.2f} | "
            f"{v['teacher_loop_launch_ms']:.2f} | {v['teacher_roofline_ms']:.2f} |"
            for k, v in results["micro_batch_scaling"].items()
        ]
        lines += ["", "| micro-batch | student ops | host us/op, whole step | in two parts | plain step: host ms | wall ms |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        def us(v: list[float] | None) -> str:
            return "waited" if v is None else " / ".join(f"{x:.1f}" for x in v)

        lines += [f"| {k} | {v.get('ops')} | {us(v.get('host_us_whole'))} | {us(v.get('host_us_parts'))} | "
                  f"{v.get('plain_host_ms', float('nan')):.1f} | {v.get('plain_wall_ms', float('nan')):.1f} |"
                  for k, v in results["micro_batch_scaling"].items()]  # fmt: skip
        if results.get("micro_batch_scaling_launch_us"):
            lines.append(f"\nhost us per operation: {results['micro_batch_scaling_launch_us']}")
    if results.get("training"):
        base = results["training"].get("fp32", {}).get("s_per_step")
        lines += ["", "| option | s / step | over fp32 | peak MiB |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['s_per_step']:.4f} | {base / v['s_per_step']:.2f}x | {v.get('peak_mib', float('nan')):.0f} |"
                  for k, v in results["training"].items()]  # fmt: skip
    if results.get("memory"):
        lines += ["", "| one stage | predicted MiB | measured MiB |", "|---|---|---|"]
        lines += [f"| {k} | {v['predicted_mib']:.0f} | {v.get('measured_mib', float('nan')):.0f} |"
                  for k, v in results["memory"].items()]  # fmt: skip
    lines += [f"\nskipped: {x}" for x in results["skipped"]]
    lines += [f"\nERROR {k}:\n```\n{v}```" for k, v in results["errors"].items()]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; no step starts after")
    parser.add_argument("--smoke", action="store_true", help="tiny models on this machine's CPU")
    parser.add_argument(
        "--steps", nargs="+", choices=STEPS, default=list(STEPS), help="which steps (default: all)"
    )
    parser.add_argument("--models", nargs="+", help="profile these models only (default: all of them)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda:0")
    results: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "profiles": {},
        "stage_fidelity": {},
        "skipped": [],
        "errors": {},
    }
    if device.type == "cuda":
        results["device_name"] = torch.cuda.get_device_name(device)
    t0 = time.perf_counter()

    def left() -> float:
        return args.budget - (time.perf_counter() - t0)

    def step(name: str, fn: Callable[[], Any]) -> Any:
        if name not in args.steps:
            return None
        if left() < 0:
            results["skipped"].append(f"{name}: out of time")
            return None
        try:
            return fn()
        except Exception:  # noqa: BLE001 - recorded in the results, the later steps go on
            results["errors"][name] = traceback.format_exc(limit=-6)
            print(results["errors"][name], flush=True)
            return None
        finally:
            results["seconds"] = round(time.perf_counter() - t0, 1)
            write_results(args.out, results)

    step("equality", lambda: schedule_equality(device, args.smoke, results))
    step("scaling", lambda: micro_batch_scaling(device, args.smoke, results))
    step("training", lambda: training_options(device, args.smoke, results))
    step("memory", lambda: memory(device, args.smoke, results))
    kept = step(
        "profiles",
        lambda: profile_all(
            args.out, device, 4 if args.smoke else args.batch, args.smoke, results, left, args.models
        ),
    )
    pairs = (
        [("resnet18", "vit_s16")]
        if args.smoke
        else [("resnet152", "vit_l16"), ("distilbert_large", "bert_large")]
    )
    step("fidelity", lambda: stage_fidelity(kept or {}, device, pairs, results, left))
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
