"""The ``tspipe-fx`` commands: plan, profile, simulate, demo (arguments: :mod:`.parser`).

Exit status: 0 done, 1 the request could not be carried out (the message says why and what to
change), 2 the command line itself is wrong (usage).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tspipe_fx.cli.parser import build_parser

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from tspipe_fx.errors import TspipeError

    commands = {"plan": _plan, "profile": _profile, "simulate": _simulate, "demo": _demo}
    try:
        commands[args.command](args)
    except TspipeError as e:
        print(f"tspipe-fx {args.command}: error: {e}", file=sys.stderr)
        return 1
    except (OSError, ImportError) as e:
        print(f"tspipe-fx {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


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
    _check_outputs(args)
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
    if args.memory_gib is not None:
        if not args.memory_gib > 0:
            raise TspipeError(f"--memory-gib must be a number of GiB > 0, got {args.memory_gib}")
        options["memory_limit"] = int(args.memory_gib * 2**30)
    if args.profiles is not None:
        options["profile"] = tuple(_load_profile(p) for p in args.profiles)
    else:
        options["cost_model"] = args.cost_model
    pipe = tspipe_fx.compile(
        student.module, teacher_module, args.gpus, example_inputs=student.args, example_kwargs=student.kwargs or None,
        mode=args.mode, batch_size=args.batch, micro_batches=args.micro_batches, schedule=args.schedule,
        loss=args.loss, teacher_parts=args.teacher_parts, precision=args.precision, recompute=args.recompute,
        stages_per_device=int(args.stages_per_device) if args.stages_per_device != "auto" else "auto",
        **options,
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


def _check_outputs(args: argparse.Namespace) -> None:
    """Every file the plan goes to can be written, before the planning (which may take minutes)."""
    from tspipe_fx.errors import TspipeError
    from tspipe_fx.report.draw import check_graph_output, check_plot_output

    for flag, path in (("--json", args.json), ("--png", args.png), ("--graph", args.graph)):
        if path is None:
            continue
        folder = path.parent
        if not folder.is_dir():
            raise TspipeError(f"{flag} {path}: the folder {folder} does not exist; hint: mkdir -p {folder}")
        if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise TspipeError(f"{flag} {path}: cannot write there (permissions); hint: another path")
    if args.png is not None:
        check_plot_output()
    if args.graph is not None:
        check_graph_output(args.graph)


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
    if args.loss is not None:
        plan = dataclasses.replace(plan, loss=args.loss)
    link = LINKS[args.link] if args.link else None
    names = [s for s in args.schedules if plan.stages_per_device == 1 or s == "auto"]
    if names != list(args.schedules):  # the fixed schedules run one stage per device
        left = [s for s in args.schedules if s not in names]
        print(
            f"(the plan holds {plan.stages_per_device} stages per device: only auto runs them; left out {left})"
        )
        if not names:
            raise TspipeError("no schedule left to simulate; hint: --schedules auto")
    timelines = {
        name: simulate_plan(plan, name, views=args.views, n_batches=args.batches, link=link) for name in names
    }
    span = max(tl.makespan for tl in timelines.values())
    for name, tl in timelines.items():
        print(f"{name}: {tl.period:.3f} ms per batch")
        print(render_timeline(tl, scale=span / args.width))
        print()
    base = timelines[names[0]].period
    rows = []
    for name, tl in timelines.items():
        costs = plan.stage_costs(link, scale=plan.micro_batches if name == "sequential" else 1)
        limit = costs.work_ms(tl.schedule.micro_batches, tl.schedule.views) / plan.n_devices
        rows.append([name, tl.period, f"{tl.period / base:.2f}x", limit / tl.period if tl.period else 1.0,
                     100 * tl.bubble_fraction, plan.batch_size / tl.period * 1e3])  # fmt: skip
    print(tabulate(rows, headers=["schedule", "ms per batch", f"vs {names[0]}", "efficiency", "idle %",
                                  "samples/s"], floatfmt=".3f"))  # fmt: skip
    print("\n(efficiency: the work of a batch over devices x period; 1.0: no device idle)")
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
