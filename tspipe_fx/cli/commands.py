"""The ``tspipe-fx`` command line: plan, profile, simulate, demo.

    tspipe-fx plan timm:resnet152 timm:vit_large_patch16_224 --gpus 8 --batch 256 \\
        --cost-model roofline --device-spec h100 --json plan.json
    tspipe-fx profile timm:resnet50 --batch 8 --out resnet50.json
    tspipe-fx simulate plan.json --png schedules.png
    tspipe-fx demo

Exit status: 0 done, 1 the request could not be carried out (the message says why and what to
change), 2 the command line itself is wrong (usage).
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

MODEL_HELP = (
    "timm:NAME, torchvision:NAME, hf:CONFIGCLASS[:MODELCLASS] (with --hf-config key=value) or "
    "module.path:callable"
)
SCHEDULES = ("tspipe", "gpipe", "1f1b", "sequential")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from tspipe_fx.errors import TspipeError

    try:
        args.run(args)
    except TspipeError as e:
        print(f"tspipe-fx {args.command}: error: {e}", file=sys.stderr)
        return 1
    except (OSError, ImportError) as e:
        print(f"tspipe-fx {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tspipe-fx", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
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
    p.set_defaults(run=_plan)

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
    p.set_defaults(run=_profile)

    p = sub.add_parser("simulate", help="simulate the schedules on a plan's costs",
                       description="Timelines and periods of the schedules on a saved plan's per-stage costs.")  # fmt: skip
    p.add_argument("plan", type=Path, help="a plan JSON (tspipe-fx plan --json)")
    p.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=list(SCHEDULES))
    p.add_argument("--views", type=int, choices=[1, 2], default=None,
                   help="inputs per sample (default: the plan's)")  # fmt: skip
    p.add_argument("--batches", type=int, default=6, help="batches simulated (default 6)")
    p.add_argument(
        "--link", default=None, help="transfers over this link (nvlink4, pcie4, ...); default free"
    )
    p.add_argument("--width", type=int, default=100, help="characters per timeline")
    p.add_argument("--png", type=Path, default=None, help="draw the timelines here (needs matplotlib)")
    p.set_defaults(run=_simulate)

    p = sub.add_parser("demo", help="distill a digits classifier through a 2-stage pipeline",
                       description="The make demo run: real data (scikit-learn's digits), a teacher, a student "
                       "trained alone and one distilled through the pipeline.", add_help=False)  # fmt: skip
    p.add_argument("demo_args", nargs=argparse.REMAINDER, help="the demo's own flags (tspipe-fx demo --help)")
    p.set_defaults(run=_demo)
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


# --- commands -----------------------------------------------------------------------------------


def _build(spec: str, role: str, args: argparse.Namespace, batch: int) -> Any:
    from tspipe_fx.cli.models import build_model

    flag = "--hf-config" if spec.startswith("hf:") else "--model-arg"
    parsed = _options(args)[flag]
    options = {**parsed[""], **parsed.get(role, {})}
    return build_model(spec, batch=batch, options=options, image_size=args.image_size, seq_len=args.seq_len)


def _options(args: argparse.Namespace) -> dict[str, dict[str, dict[str, Any]]]:
    from tspipe_fx.cli.models import parse_options

    return {
        "--hf-config": parse_options(args.hf_config, flag="--hf-config"),
        "--model-arg": parse_options(args.model_arg, flag="--model-arg"),
    }


def _check_options(args: argparse.Namespace, specs: dict[str, str | None]) -> None:
    """Every option must reach a model: ``--hf-config`` an ``hf:`` one, ``--model-arg`` another,
    a ``student.``/``teacher.`` prefix that model (an option no model reads would plan another)."""
    from tspipe_fx.errors import TspipeError

    kinds = {
        role: ("--hf-config" if spec.startswith("hf:") else "--model-arg")
        for role, spec in specs.items()
        if spec
    }
    for flag, parsed in _options(args).items():
        other = "--model-arg" if flag == "--hf-config" else "--hf-config"
        if parsed[""] and flag not in kinds.values():
            raise TspipeError(
                f"{flag} {sorted(parsed[''])}: no model here takes it ({flag} is for "
                f"{'hf: models' if flag == '--hf-config' else 'timm, torchvision and callable models'}); hint: {other}"
            )
        for role in ("student", "teacher"):
            if parsed[role] and kinds.get(role) != flag:
                what = (
                    f"the {role} ({specs[role]}) does not take {flag}"
                    if specs.get(role)
                    else f"there is no {role} here"
                )
                raise TspipeError(
                    f"{flag} {role}.{sorted(parsed[role])}: {what}; hint: {other}, or no prefix"
                )


def _check_positive(**values: int | None) -> None:
    from tspipe_fx.errors import TspipeError

    for name, value in values.items():
        if value is not None and value < 1:
            raise TspipeError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _plan(args: argparse.Namespace) -> None:
    import tspipe_fx
    from tspipe_fx.cost.devices import device_spec
    from tspipe_fx.errors import TspipeError

    _check_positive(
        gpus=args.gpus, batch=args.batch, micro_batches=args.micro_batches, example_batch=args.example_batch
    )
    if args.teacher is None and args.mode != "momentum":
        raise TspipeError(
            "a KD plan needs a teacher; hint: tspipe-fx plan STUDENT TEACHER, or --mode momentum"
        )
    _check_options(args, {"student": args.student, "teacher": args.teacher})
    student = _build(args.student, "student", args, args.example_batch)
    if args.teacher is None:
        teacher_module = copy.deepcopy(student.module)
    else:
        teacher = _build(args.teacher, "teacher", args, args.example_batch)
        teacher_module = teacher.module
        if _describe(teacher) != _describe(student):
            raise TspipeError(
                f"the student ({args.student}) and the teacher ({args.teacher}) take different inputs: "
                f"{_describe(student)} and {_describe(teacher)}; hint: models of one modality, and --image-size "
                "to give both the same images"
            )
    if args.mode == "kd":
        teacher_module.eval()
    options: dict[str, Any] = {}
    if args.device_spec is not None:
        specs = args.device_spec * args.gpus if len(args.device_spec) == 1 else args.device_spec
        resolved = [device_spec(s) for s in specs]
        options["device_specs"] = [s.with_link(args.link) for s in resolved] if args.link else resolved
    elif args.link:
        options["device_specs"] = [device_spec("cpu").with_link(args.link)] * args.gpus
    if args.profiles is not None:
        options["profile"] = tuple(_load_profile(p) for p in args.profiles)
    else:
        options["cost_model"] = args.cost_model
    pipe = tspipe_fx.compile(
        student.module, teacher_module, args.gpus, example_inputs=student.args, example_kwargs=student.kwargs or None,
        mode=args.mode, batch_size=args.batch, micro_batches=args.micro_batches, **options,
    )  # fmt: skip
    print(pipe.report())
    if args.json is not None:
        pipe.plan.save(args.json)
        print(f"\nplan written to {args.json}")
    if args.png is not None:
        from tspipe_fx.report.draw import save_stage_bars

        save_stage_bars(pipe.plan, args.png)
        print(f"stage costs drawn in {args.png}")
    if args.graph is not None:
        from tspipe_fx.report.draw import save_graph

        save_graph(pipe, args.graph)
        print(f"graphs drawn in {args.graph}")


def _describe(model: Any) -> str:
    """The tensors a model takes (both models of a pair are called with the student's batch)."""
    shapes = [tuple(a.shape) for a in model.args if hasattr(a, "shape")]
    named = {k: tuple(v.shape) for k, v in sorted(model.kwargs.items()) if hasattr(v, "shape")}
    return f"{shapes}{' ' + str(named) if named else ''}"


def _load_profile(name: str) -> Any:
    from tspipe_fx.cost import profiles
    from tspipe_fx.cost.profile import Profile

    return Profile.load(name) if Path(name).is_file() else profiles.load(name)


def _profile(args: argparse.Namespace) -> None:
    import tspipe_fx
    from tspipe_fx.report.profile import render_profile, render_summary

    _check_positive(batch=args.batch, repeats=args.repeats)
    _check_options(args, {"": args.model})
    model = _build(args.model, "", args, args.batch)
    if args.eval:
        model.module.eval()
    prof = tspipe_fx.profile(model.module, model.args, example_kwargs=model.kwargs or None, device=args.device,
                             repeats=args.repeats, progress=True)  # fmt: skip
    print(render_profile(prof, by=args.by, top=args.top))
    print(f"\n{render_summary(prof)}")
    prof.save(args.out)
    print(f"\nprofile written to {args.out}")


def _simulate(args: argparse.Namespace) -> None:
    from tabulate import tabulate

    from tspipe_fx.cost.devices import LINKS
    from tspipe_fx.errors import TspipeError
    from tspipe_fx.plan import Plan, simulate_plan
    from tspipe_fx.report.timeline import render_timeline

    _check_positive(batches=args.batches, width=args.width)
    if args.link is not None and args.link not in LINKS:
        raise TspipeError(f"unknown link {args.link!r}; known: {sorted(LINKS)}")
    plan = Plan.load(args.plan)
    link = LINKS[args.link] if args.link else None
    timelines = {
        name: simulate_plan(plan, name, views=args.views, n_batches=args.batches, link=link)
        for name in args.schedules
    }
    span = max(tl.makespan for tl in timelines.values())
    for name, tl in timelines.items():
        print(f"{name}: {tl.period:.3f} ms per batch")
        print(render_timeline(tl, scale=span / args.width))
        print()
    base = timelines[args.schedules[0]].period
    rows = [
        [
            name,
            tl.period,
            f"{tl.period / base:.2f}x",
            100 * tl.bubble_fraction,
            plan.batch_size / tl.period * 1e3,
        ]
        for name, tl in timelines.items()
    ]
    print(tabulate(rows, headers=["schedule", "ms per batch", f"vs {args.schedules[0]}", "idle %", "samples/s"],
                   floatfmt=".3f"))  # fmt: skip
    print("\n(digits: student forward micro-batch, letters: teacher forward, capitals: student backward, "
          ".: idle; sequential: one micro-batch, the plan's costs times its micro-batches)")  # fmt: skip
    if args.png is not None:
        from tspipe_fx.report.timeline import save_png

        save_png(list(timelines.values()), str(args.png))
        print(f"timelines drawn in {args.png}")


def _demo(args: argparse.Namespace) -> None:
    from tspipe_fx.cli import demo

    demo.main(list(args.demo_args))


if __name__ == "__main__":
    raise SystemExit(main())
