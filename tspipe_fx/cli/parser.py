"""The ``tspipe-fx`` command line's arguments: plan, profile, simulate, demo."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["SCHEDULES", "build_parser"]

MODEL_HELP = (
    "timm:NAME, torchvision:NAME, hf:CONFIGCLASS[:MODELCLASS] (with --hf-config key=value) or "
    "module.path:callable"
)
SCHEDULES = ("auto", "tspipe", "gpipe", "1f1b", "sequential")
LOSSES = (
    "batch",
    "micro",
    "micro_full_teacher",
)  # tspipe_fx.schedule.task.LOSSES (no import: the parser loads fast)
DESCRIPTION = """Plan, profile and simulate teacher-student pipelines.

    tspipe-fx plan timm:resnet152 timm:vit_large_patch16_224 --gpus 8 --batch 256 \\
        --cost-model roofline --device-spec h100 --json plan.json
    tspipe-fx profile timm:resnet50 --batch 8 --out resnet50.json
    tspipe-fx simulate plan.json --png schedules.png
    tspipe-fx demo

Exit status: 0 done, 1 the request could not be carried out (the message says why and what to
change), 2 the command line itself is wrong (usage)."""


def build_parser() -> argparse.ArgumentParser:
    """The ``tspipe-fx`` parser: one subcommand each, the command's name in ``command``."""
    parser = argparse.ArgumentParser(
        prog="tspipe-fx", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("plan", help="partition a student and a teacher, print the report",
                       description="Capture, cost and partition a teacher-student pair; print the partition report.")  # fmt: skip
    p.add_argument("student", help=MODEL_HELP)
    p.add_argument(
        "teacher", nargs="?", help=f"{MODEL_HELP}; in momentum mode default: a copy of the student"
    )
    p.add_argument("--gpus", type=int, default=2, help="pipeline stages (default 2)")
    p.add_argument("--batch", type=int, default=32, help="training batch the plan is for (default 32)")
    p.add_argument(
        "--micro-batches", type=int, default=None, help="micro-batches per batch (default: --gpus)"
    )
    p.add_argument("--mode", choices=["kd", "momentum"], default="kd")
    p.add_argument("--schedule", choices=[s for s in SCHEDULES if s != "sequential"], default="auto",
                   help="the schedule the plan is for and trains with (default auto: synthesized for the costs)")  # fmt: skip
    p.add_argument("--loss", choices=list(LOSSES), default="batch",
                   help="what one loss call covers: the batch, a micro-batch, or a micro-batch against the "
                   "whole batch's teacher outputs (default batch)")  # fmt: skip
    p.add_argument("--teacher-parts", type=int, default=1,
                   help="with --schedule auto: teacher micro-batches per student micro-batch (default 1)")  # fmt: skip
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="the compute dtype: activations and stage boundaries priced in it (default fp32)")  # fmt: skip
    p.add_argument("--recompute", choices=["never", "always", "except_last", "auto"], default="never",
                   help="activation recompute; auto: per device, the least that fits its memory (default never)")  # fmt: skip
    p.add_argument("--stages-per-device", choices=["1", "2", "auto"], default="1",
                   help="momentum with --schedule auto: virtual stages, two per device (auto: where they simulate "
                   "faster; the local runtime runs them)")  # fmt: skip
    p.add_argument("--memory-gib", type=float, default=None, metavar="GIB",
                   help="memory per device in GiB (default: the device specs'; unlimited on CPU)")  # fmt: skip
    p.add_argument("--cost-model", default="measured",
                   choices=["measured", "calibrated", "roofline", "params", "uniform"],
                   help="measured/calibrated profile here on the CPU; roofline models --device-spec (default measured)")  # fmt: skip
    p.add_argument("--device-spec", nargs="+", default=None, metavar="SPEC",
                   help="the devices planned for (h100, a100, v100, cpu): one for all, or one per stage")  # fmt: skip
    p.add_argument("--link", default=None, help="the link between the devices (nvlink4, pcie4, ...)")
    p.add_argument("--profiles", nargs=2, metavar=("STUDENT", "TEACHER"), default=None,
                   help="cost with these profiles (JSON files, or shipped names like h100/resnet152_b32)")  # fmt: skip
    _model_flags(p)
    p.add_argument("--example-batch", type=int, default=2,
                   help="samples to capture and profile with (costs scale to --batch; default 2)")  # fmt: skip
    p.add_argument("--json", type=Path, default=None, help="write the plan here")
    p.add_argument("--png", type=Path, default=None, help="draw each device's costs here (needs matplotlib)")
    p.add_argument("--graph", type=Path, default=None,
                   help="draw both graphs coloured by stage: .dot text, or .png/.svg (needs pydot and graphviz)")  # fmt: skip

    p = sub.add_parser("profile", help="measure every node of a model, write a profile JSON",
                       description="Capture a model and measure each graph node's forward and backward time.")  # fmt: skip
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--batch", type=int, default=8, help="samples per measured batch (default 8)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per node (median kept)")
    p.add_argument("--by", choices=["module", "node"], default="module", help="rows of the printed table")
    p.add_argument("--top", type=int, default=None, help="the most expensive rows only")
    p.add_argument("--out", type=Path, required=True, help="the profile JSON to write")
    p.add_argument("--eval", action="store_true", help="profile in eval mode (a KD teacher)")
    _model_flags(p)

    p = sub.add_parser("simulate", help="simulate the schedules on a plan's costs",
                       description="Timelines and periods of the schedules on a saved plan's per-stage costs.")  # fmt: skip
    p.add_argument("plan", type=Path, help="a plan JSON (tspipe-fx plan --json)")
    p.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=list(SCHEDULES))
    p.add_argument("--loss", choices=list(LOSSES), default=None,
                   help="the loss granularity simulated (default: the plan's)")  # fmt: skip
    p.add_argument("--views", type=int, choices=[1, 2], default=None,
                   help="inputs per sample (default: the plan's)")  # fmt: skip
    p.add_argument("--batches", type=int, default=6, help="batches simulated (default 6)")
    p.add_argument(
        "--link", default=None, help="transfers over this link (nvlink4, pcie4, ...); default free"
    )
    p.add_argument("--width", type=int, default=100, help="characters per timeline")
    p.add_argument("--png", type=Path, default=None, help="draw the timelines here (needs matplotlib)")

    p = sub.add_parser("demo", help="distill a digits classifier through a 2-stage pipeline",
                       description="The make demo run: real data (scikit-learn's digits), a teacher, a student "
                       "trained alone and one distilled through the pipeline.", add_help=False)  # fmt: skip
    p.add_argument("demo_args", nargs=argparse.REMAINDER, help="the demo's own flags (tspipe-fx demo --help)")
    return parser


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf-config", action="append", default=[], metavar="KEY=VALUE",
                   help="a Hugging Face config field (student.KEY or teacher.KEY for one model); repeatable")  # fmt: skip
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a keyword for timm/torchvision/callable constructors (student./teacher. prefix); repeatable")  # fmt: skip
    p.add_argument("--image-size", type=int, default=None, help="image side of the example batch")
    p.add_argument(
        "--seq-len", type=int, default=128, help="tokens per sequence for text models (default 128)"
    )
