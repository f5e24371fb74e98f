"""CPU pipeline throughput (issue 5): our distributed runtime against plain training and
torch.distributed.pipelining, on one KD pair, side by side.

    python benchmarks/cpu_pipeline/run.py                 # 5 rounds, prints the table
    python benchmarks/cpu_pipeline/run.py --rounds 1 --steps 2 --batch 8    # a quick check

The pair: a ViT-S/16 teacher (6 blocks) and a ResNet-18 student at 128 x 128 images
(``TSPIPE_BENCH_IMAGE``), batch 32 in
4 micro-batches, KD loss (cross-entropy + KL). One plan is compiled first (calibrated costs,
2 stages, its stages timed whole with plain training busy on the other core, as the pipeline's
other rank keeps it: ``--no-refine-load`` times them on an idle machine) and every contender
uses its split:

- ``plain-1t`` / ``plain-2t``: one process, teacher forward then student forward, backward and
  SGD step on the whole batch, with 1 and with 2 torch threads; ``plain-1t-micro``: the same in
  the pipeline's micro-batches (gradients accumulated), one thread: its ratio to the whole-batch
  step beside it, times 2, bounds every 2-rank schedule at this M (its "ceiling");
- ``two-plain-1t``: two plain 1-thread trainings at once, one per rank (a process each, no
  message), counted together: what this machine's two busy cores give against one, the most any
  2-rank scheme can reach here whatever its split and schedule (its samples are both copies');
- ``free``: each of the 2 ranks runs its own stages' work of every batch with no message and
  nothing to wait for: the bound of every 2-rank schedule of the plan on this machine;
- ``tspipe``: ``pipe.trainer(runtime="dist", schedule="tspipe")`` on 2 gloo ranks under torchrun,
  one torch thread each; ``auto``: the plan's synthesized schedule, one loss per micro-batch;
  ``auto-inorder``: the same with each rank's list run strictly in order (no task goes first
  while the next one waits: ``DistRuntime.horizon = 0``);
- ``pippy-gpipe`` / ``pippy-1f1b``: torch.distributed.pipelining on the same 2 ranks and stage
  modules: the teacher as its own forward-only pipeline (``ScheduleGPipe.eval``) before the
  student's ``ScheduleGPipe`` or ``Schedule1F1B`` step, its outputs handed to the student's loss
  on the last rank as per-micro-batch targets, as a user of that library would write KD.

Each round runs every contender once (in turn, so machine noise spreads over all); a run times
``--blocks`` blocks of ``--steps`` steps after 2 warm-up steps. The table gives each contender's
median samples/s over the rounds, its ratio to ``plain-1t``'s median, the median of its per-round
ratios to ``plain-1t`` of the same round, and (2-rank contenders) the median of its per-block
ratios to one plain 1-thread step run just before each block in a process of its own, both
ranks parked: ratios seconds apart, which a machine whose speed drifts over
minutes moves alike. Every contender runs with glibc's malloc told to keep freed memory
(``KEPT_MALLOC``; ``--malloc default`` leaves it as it is).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]
CONTENDERS = ["plain-1t", "plain-2t", "plain-1t-micro", "two-plain-1t", "free", "tspipe", "auto", "auto-inorder", "pippy-gpipe", "pippy-1f1b", "pippy-interleaved1f1b",
              "pippy-interleavedzb", "pippy-zbv"]  # fmt: skip
NOT_SCHEDULES = {"plain-1t", "plain-2t", "plain-1t-micro", "two-plain-1t", "free"}
TARGET = 1.8  # issue 14: the 2-rank pipeline against plain 1-thread training
FAILURES: dict[str, str] = {}
BALANCED: dict[str, list[float]] = {}  # per 2-rank contender, each block's ratio with the ranks' mean time
RANK_MS: dict[str, list[list[float]]] = {}  # per 2-rank contender, each block's ms per step of each rank
# glibc's malloc, told to keep freed memory (every contender alike): by default it hands large
# blocks back to the kernel and faults fresh zeroed pages in on the next step, and a pipeline
# stage with several micro-batches in flight churns more memory than plain training.
KEPT_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
               "MALLOC_TOP_PAD_": str(256 << 20)}  # fmt: skip


IMAGE = int(os.environ.get("TSPIPE_BENCH_IMAGE", "128"))


def pair() -> tuple[nn.Module, nn.Module]:
    import timm

    torch.manual_seed(0)
    student = timm.create_model("resnet18", pretrained=False, num_classes=10)
    teacher = timm.create_model(
        "vit_small_patch16_224", pretrained=False, num_classes=10, img_size=IMAGE, depth=6
    )
    return student, teacher.eval()


def kd_loss(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(s, y) + F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="batchmean")


def data(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=g), torch.randint(0, 10, (batch,), generator=g)


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


def compiled(args: argparse.Namespace, plan: Path | None = None, stages: int = 2) -> Any:
    """The pipeline every contender shares: the saved plan's split and costs (no profiling here)."""
    import tspipe_fx
    from tspipe_fx.plan import Plan

    student, teacher = pair()
    x, _ = data(args.batch)
    return tspipe_fx.compile(student, teacher, stages, example_inputs=(x,), micro_batches=args.micro,
                             plan=Plan.load(plan or args.plan))  # fmt: skip


def cut_values(ios: Any, x: torch.Tensor) -> list[tuple[Any, ...]]:
    """Each stage's inputs (stage 0's: ``x``) and the last stage's outputs, from one micro-batch run
    through copies of the stages (the stages' BatchNorm statistics stay as they are)."""
    values: list[tuple[Any, ...]] = [(x,)]
    with torch.no_grad():
        for io in ios:
            values.append(tuple(copy.deepcopy(io.module)(*values[-1])))
    return values


# --- the contenders (each a worker process) ----------------------------------------------------


def plain_step(args: argparse.Namespace, micro: int = 1) -> Any:
    """One step of plain training in this process: teacher forward, then the student's forward
    and backward, on the whole batch or (``micro`` > 1) micro-batch by micro-batch, gradients
    accumulated; then the SGD step."""
    student, teacher = pair()
    opt = sgd(student.parameters())
    x, y = data(args.batch)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for xs, ys in zip(x.chunk(micro), y.chunk(micro), strict=True):
            with torch.no_grad():
                t = teacher(xs)
            (kd_loss(student(xs), t, ys) / micro).backward()
        opt.step()

    return step


def plain(args: argparse.Namespace) -> Timing:
    """``plain-1t`` / ``plain-2t``; ``plain-1t-micro`` (the same work in the pipeline's
    micro-batches, one thread) times a whole-batch step beside each block: what a micro-batch of
    this size costs before any pipelining, the ceiling of every schedule at this M."""
    torch.set_num_threads(args.threads)
    if not args.split:
        return timed(plain_step(args), args)
    return timed(plain_step(args, args.micro), args, plain_1t=seconds_of(plain_step(args)))


def target_state(auto: float, how: str = "") -> str:
    """Issue 14's target against ``auto``'s figure (times plain 1 thread, measured ``how``)."""
    said = f"{auto:.2f}x" + (f" {how}" if how else "")
    return f"issue 14's target, {TARGET}x plain 1 thread: auto {said}, {'met' if auto >= TARGET else 'not met'}"


def two_plain(args: argparse.Namespace) -> Timing:
    """``two-plain-1t``: plain 1-thread training on each of the 2 ranks at once, nothing shared but
    the barriers around each block."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    timing = timed(plain_step(args), args)
    dist.destroy_process_group()
    return timing


def tspipe(args: argparse.Namespace, schedule: str = "tspipe", lookahead: bool = True) -> Timing:
    """Ours: ``tspipe`` (one loss per batch), or ``auto`` (synthesized, one loss per micro-batch);
    without ``lookahead`` each rank runs its list strictly in order."""
    from tspipe_fx.runtime.dist.runtime import DistRuntime

    if not lookahead:
        DistRuntime.horizon = 0
    step, trainer = pipeline_step(args, schedule)
    timing = timed(step, args)
    trainer.finish()
    return timing


def pipeline_step(args: argparse.Namespace, schedule: str) -> tuple[Any, Any]:
    """A step of our dist runtime's trainer (``auto``: one loss per micro-batch), and the trainer."""
    pipe = compiled(args)
    loss = "micro" if schedule == "auto" else "batch"
    trainer = pipe.trainer(kd_loss, optimizer=sgd, runtime="dist", schedule=schedule, loss=loss)
    x, y = data(args.batch)
    return (lambda: trainer.step(x, target=y)), trainer


MULTI = {"pippy-interleaved1f1b": "ScheduleInterleaved1F1B", "pippy-interleavedzb": "ScheduleInterleavedZeroBubble",
         "pippy-zbv": "ScheduleZBVZeroBubble"}  # fmt: skip


def pippy_multi(args: argparse.Namespace, kind: str) -> Timing:
    """Two stages per rank (4 stages, cut by our partitioner for 4 devices): interleaved
    (rank r holds stages r and r+2) or, for ZBV, V-shaped (rank 0 holds 0 and 3). The teacher runs
    its own forward-only pass through the same schedule first, as with the single-stage ones."""
    import torch.distributed as dist
    import torch.distributed.pipelining as pipelining
    from torch.distributed.pipelining import PipelineStage

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    pipe = compiled(args, plan=args.plan4, stages=4)
    mine = [rank, 3 - rank] if kind == "pippy-zbv" else [rank, rank + 2]
    x, y = data(args.batch)
    micro_x = x[: args.batch // args.micro]

    class Stage(nn.Module):
        """As ``pippy``'s: tensors only between stages, the cuts' non-tensor values put back."""

        def __init__(self, gm: nn.Module, given: dict[int, Any], dropped: set[int], last: bool):
            super().__init__()
            self.gm, self.given, self.dropped, self.last = gm, given, dropped, last

        def forward(self, *xs: torch.Tensor) -> Any:
            it = iter(x.clone() for x in xs)
            n = len(xs) + len(self.given)
            xs = tuple(self.given[i] if i in self.given else next(it) for i in range(n))
            out = tuple(o.contiguous() if isinstance(o, torch.Tensor) else o for o in self.gm(*xs))
            out = tuple(o for i, o in enumerate(out) if i not in self.dropped)
            return out[0] if self.last or len(out) == 1 else out

    def stages(ios: Any, frozen: bool, mine: list[int]) -> list[PipelineStage]:
        given = [{i: v for i, v in enumerate(vs) if not isinstance(v, torch.Tensor)} for vs in cut_values(ios, micro_x)]
        out = []
        for j in mine:  # (the caller's stage indices)
            mod = Stage(ios[j].module, given[j] if j else {}, set(given[j + 1]) if j < 3 else set(), j == 3)
            out.append(PipelineStage(mod.requires_grad_(not frozen), j, 4, torch.device("cpu")))
        return out

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return kd_loss(out, target[:, :-1], target[:, -1].long())

    cls = getattr(pipelining, MULTI[kind])
    # The teacher's forward-only pass: interleaved placement (ZBV runs no forward-only pass; its
    # student's last stage is on rank 0, so the teacher's outputs travel there from rank 1).
    s_stages, t_stages = stages(pipe.student_io, False, mine), stages(pipe.teacher_io, True, [rank, rank + 2])
    schedule = cls(s_stages, args.micro, loss_fn=loss_fn)
    teacher = pipelining.ScheduleInterleaved1F1B(t_stages, args.micro)
    opt = sgd([p for st in s_stages for p in st.submod.parameters()])
    holds_last = 3 in mine

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        t = teacher.eval(x) if rank == 0 else teacher.eval()
        if kind == "pippy-zbv":
            if rank == 1:
                dist.send(t.contiguous(), 0)
            else:
                t = torch.empty(args.batch, 10)
                dist.recv(t, 1)
        if holds_last:
            packed = torch.cat([t, y[:, None].float()], dim=1)
            if rank == 0:  # (with targets split by hand, the inputs go split too)
                schedule.step(
                    arg_mbs=[(c,) for c in x.chunk(args.micro)], target_mbs=list(packed.chunk(args.micro))
                )
            else:
                schedule.step(target_mbs=list(packed.chunk(args.micro)))
        elif rank == 0:
            schedule.step(x)
        else:
            schedule.step()
        opt.step()

    timing = timed(step, args)
    dist.destroy_process_group()
    return timing


def pippy(args: argparse.Namespace, kind: str) -> Timing:
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    pipe = compiled(args)

    class Stage(nn.Module):
        """Our stage module as that library wants it: tensors only between stages, a lone tensor
        bare, every tensor contiguous (its gloo sends refuse others), received inputs cloned (a
        cut before an in-place ReLU would write to its input leaf, which autograd refuses).

        Non-tensor values a cut passes (the ViT's patch grid, a ``torch.Size``) cannot travel
        through it: stage 0 drops them, and stage 1 puts back the constants both ranks computed
        once from one micro-batch (they do not depend on the data), as a user would.
        """

        def __init__(self, gm: nn.Module, last: bool, constants: dict[int, Any]):
            super().__init__()
            self.gm, self.last, self.constants = gm, last, constants

        def forward(self, *xs: torch.Tensor) -> Any:
            if self.last:
                it = iter(x.clone() for x in xs)
                n = len(xs) + len(self.constants)
                xs = tuple(self.constants[i] if i in self.constants else next(it) for i in range(n))
            out = tuple(o.contiguous() if isinstance(o, torch.Tensor) else o for o in self.gm(*xs))
            out = tuple(o for i, o in enumerate(out) if self.last or i not in self.constants)
            return out[0] if self.last or len(out) == 1 else out

    def constants(ios: Any, x: torch.Tensor) -> dict[int, Any]:  # the cut's non-tensor values
        return {i: o for i, o in enumerate(cut_values(ios[:1], x)[1]) if not isinstance(o, torch.Tensor)}

    last = rank == 1
    x, y = data(args.batch)
    micro_x = x[: args.batch // args.micro]
    s_const = constants(pipe.student_io, micro_x)
    t_const = constants(pipe.teacher_io, micro_x)
    s_mod = Stage(pipe.student_io[rank].module, last, s_const)
    t_mod = Stage(pipe.teacher_io[rank].module, last, t_const).requires_grad_(False)  # a frozen teacher
    s_stage = PipelineStage(s_mod, rank, 2, torch.device("cpu"))
    t_stage = PipelineStage(t_mod, rank, 2, torch.device("cpu"))

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # The library takes one tensor per micro-batch as the target: teacher logits | label.
        return kd_loss(out, target[:, :-1], target[:, -1].long())

    schedule = (ScheduleGPipe if kind == "gpipe" else Schedule1F1B)(s_stage, args.micro, loss_fn=loss_fn)
    teacher = ScheduleGPipe(t_stage, args.micro)
    opt = sgd(s_mod.parameters())

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        if rank == 0:
            teacher.eval(x)
            schedule.step(x)
        else:
            t = teacher.eval()
            packed = torch.cat([t, y[:, None].float()], dim=1)
            schedule.step(target_mbs=list(packed.chunk(args.micro)))
        opt.step()

    timing = timed(step, args)
    dist.destroy_process_group()
    return timing


def free(args: argparse.Namespace) -> Timing:
    """``free``: each rank runs its own stages' work of a batch, the plan's split, with no message
    and nothing to wait for (inputs of the right shapes made once on the rank): per micro-batch its
    teacher stage's forward and its student stage's forward and whole backward (the loss on the
    last rank), then its SGD step. The slower rank's block time bounds every 2-rank schedule of this
    plan on this machine, whatever its order: what is left above a schedule is the schedule's (its
    waits, messages and split backward), below it the machine's (two busy cores against one)."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    timing = timed(free_step(args), args)
    dist.destroy_process_group()
    return timing


def free_step(args: argparse.Namespace) -> Any:
    """``free``'s step on this rank (the process group up)."""
    import torch.distributed as dist

    rank = dist.get_rank()
    pipe = compiled(args)
    x, y = data(args.batch)
    xs, ys = x.chunk(args.micro), y.chunk(args.micro)

    s_mod, t_mod = pipe.student_io[rank].module, pipe.teacher_io[rank].module.requires_grad_(False)
    s_in, t_in = (cut_values(ios[:rank], xs[0])[rank] for ios in (pipe.student_io, pipe.teacher_io))
    last = rank == dist.get_world_size() - 1
    opt = sgd(s_mod.parameters())

    def leaf(v: Any) -> Any:  # a received input: a leaf, cloned for the stage (which may write it)
        return v.detach().requires_grad_(v.is_floating_point()).clone() if isinstance(v, torch.Tensor) else v

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for m in range(args.micro):
            with torch.no_grad():
                t = tuple(t_mod(*t_in))
            given = (xs[m],) if rank == 0 else tuple(map(leaf, s_in))
            out = tuple(s_mod(*given))
            if last:
                (kd_loss(out[0], t[0], ys[m]) / args.micro).backward()
            else:
                outs = [o for o in out if isinstance(o, torch.Tensor) and o.requires_grad]
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        opt.step()

    return step


Timing = dict[str, list[Any]]  # per block: seconds, plain seconds, each rank's seconds


def timed(step: Any, args: argparse.Namespace, plain_1t: Any = None) -> Timing:
    """Seconds of each block of ``--steps`` steps (``--blocks`` of them, after 2 warm-up steps).

    In a 2-rank worker each block runs from a barrier to a barrier, and one step of plain 1-thread
    training runs just before it in a process of its own (:func:`served`; rank 0 waits for it,
    the peer parked at a barrier, neither using the CPU): each block has a plain figure from
    seconds before it, which a machine whose speed drifts over minutes moves alike (``"plain"``,
    seconds per step), and each rank's own time to its last step (``"ranks"``, per block: their
    mean is, for ``free``, what a perfect balance of its work would take). ``plain_1t``: that
    step's seconds, given.
    """
    import torch.distributed as dist

    beside = dist.is_initialized() and dist.get_world_size() > 1
    if beside and dist.get_rank() == 0:
        plain_1t = served(args)
    sync = dist.barrier if beside else (lambda: None)
    for _ in range(2):
        step()
    out: Timing = {"blocks": [], "plain": [], "ranks": []}
    for _ in range(args.blocks):
        sync()
        if plain_1t is not None:
            out["plain"].append(plain_1t())
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        own = time.perf_counter() - t0  # this rank's steps, before it waits for the others
        sync()
        out["blocks"].append(time.perf_counter() - t0)
        if beside:
            each: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(each, own)
            out["ranks"].append(each)
    return out


def seconds_of(step: Any) -> Any:
    def run() -> float:
        t0 = time.perf_counter()
        step()
        return time.perf_counter() - t0

    return run


def served(args: argparse.Namespace) -> Any:
    """Plain 1-thread training's step in a process of its own, started here (``--worker
    plain-server``): a call runs one step there and returns its seconds. Not in the pipeline's
    own process: there, after pipeline steps, the same plain step ran 8-15% slower (2.35-2.50 s
    before the pipeline's first step, 2.53-2.83 s between its blocks, on a fresh heap and on one
    the stages' micro-batches had churned)."""
    cmd = [sys.executable, str(HERE), "--worker", "plain-server", "--batch", str(args.batch)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError(f"the plain 1-thread server did not start (exit code {proc.wait()})")
    atexit.register(proc.stdin.close)  # the server ends with its input

    def run() -> float:
        proc.stdin.write("go\n")
        proc.stdin.flush()
        return float(proc.stdout.readline())

    return run


def plain_server(args: argparse.Namespace) -> None:
    """A step of plain 1-thread training per line read; its seconds written back (after one
    warm-up step, "ready")."""
    torch.set_num_threads(1)
    step = seconds_of(plain_step(args))
    step()
    print("ready", flush=True)
    for _ in sys.stdin:
        print(step(), flush=True)


def worker_env(args: argparse.Namespace) -> dict[str, str]:
    """A worker process's environment: one thread, this tree importable, the malloc asked for."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return {**env, **KEPT_MALLOC} if args.malloc == "kept" else env


def plain_load(args: argparse.Namespace) -> None:
    """Plain 1-thread training, step after step until killed ("ready" after the first step)."""
    torch.set_num_threads(1)
    step = plain_step(args)
    step()
    print("ready", flush=True)
    while True:
        step()


@contextlib.contextmanager
def loaded(args: argparse.Namespace) -> Any:
    """The other core busy while the body runs: plain 1-thread training of the pair in a process
    of its own (``--worker plain-load``), as the pipeline's other rank will keep it busy. Stages
    timed on an idle machine ran 8-20% faster than beside a working rank, unevenly (the later
    stages, with the larger weights, slowed more), so a plan refined there was balanced for a
    machine the pipeline never sees."""
    cmd = [sys.executable, str(HERE), "--worker", "plain-load", "--batch", str(args.batch)]
    proc = subprocess.Popen(cmd, env=worker_env(args), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the plain 1-thread load did not start (exit code {proc.wait()})")
        yield
    finally:
        proc.kill()
        proc.wait()


# --- the launcher -------------------------------------------------------------------------------


def launch(name: str, args: argparse.Namespace, out: Path) -> tuple[float, list[float]]:
    """One contender in fresh processes: its samples/s, and each block's ratio to the plain
    1-thread step run beside it (none for the plain contenders)."""
    common = ["--plan", str(args.plan), "--plan4", str(args.plan4), "--batch", str(args.batch), "--micro",
              str(args.micro), "--steps", str(args.steps), "--blocks", str(args.blocks),
              "--result", str(out)]  # fmt: skip
    env = worker_env(args)
    if name.startswith("plain"):
        threads = name.split("-")[1][0]
        cmd = [sys.executable, str(HERE), "--worker", "plain", "--threads", threads, *common]
        cmd += ["--split"] if name.endswith("micro") else []
        env["OMP_NUM_THREADS"] = threads
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(HERE), "--worker", name, *common]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        text = done.stdout + done.stderr
        if os.environ.get("TSPIPE_BENCH_LOGS"):
            (Path(os.environ["TSPIPE_BENCH_LOGS"]) / f"{name}-{time.time():.0f}.log").write_text(text)
        lines = text.splitlines()
        ours = [ln for ln in lines if "tspipe_fx" in ln and ("stops:" in ln or "RuntimeFailure" in ln)]
        # The first rank to fail names the error; its peers only lose their connection to it.
        raised = [ln for ln in lines if re.search(r"\]: [\w.]+(Error|Exception)\b", ln)]
        raised = [ln for ln in raised if "Connection closed by peer" not in ln] or raised
        errors = ours or raised or [ln for ln in lines if "Error" in ln]
        FAILURES[name] = errors[0].split("]: ")[-1][:200] if errors else done.stderr[-300:]
        return float("nan"), []
    timing = json.loads(out.read_text())
    copies = 2 if name == "two-plain-1t" else 1  # (each of its ranks trains on the whole batch)
    samples_per_s = copies * args.blocks * args.steps * args.batch / sum(timing["blocks"])
    beside = [copies * p * args.steps / b for p, b in zip(timing["plain"], timing["blocks"], strict=False)]
    even = [copies * p * args.steps / statistics.mean(r) for p, r in zip(timing["plain"], timing["ranks"], strict=False)]
    BALANCED.setdefault(name, []).extend(even)
    RANK_MS.setdefault(name, []).extend([t * 1e3 / args.steps for t in each] for each in timing["ranks"])
    return samples_per_s, beside


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=3, help="timed blocks per run")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--micro", type=lambda v: v if v == "auto" else int(v), default=4,
                        help="micro-batches, or 'auto': compile chooses them (on the costs measured at each, with refine)")  # fmt: skip
    parser.add_argument("--worker", choices=["plain", "plain-server", "plain-load", *CONTENDERS[3:]])
    parser.add_argument("--plan4", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--malloc", choices=["kept", "default"], default="kept",
                        help="glibc malloc keeps freed memory (KEPT_MALLOC) in every contender, or not")  # fmt: skip
    parser.add_argument("--split", action="store_true", help="(plain worker) micro-batch by micro-batch")
    parser.add_argument("--plan", type=Path)
    parser.add_argument("--result", type=Path)
    parser.add_argument("--json", type=Path, help="write the figures here too")
    parser.add_argument("--cost-model", default="calibrated", help="how the shared plan is costed")
    parser.add_argument("--refine", type=int, default=3, help="rounds of stage timing for the shared plan")
    parser.add_argument("--save-plan", type=Path, help="keep the shared plan (rerun it with --plan)")
    parser.add_argument("--refine-load", action=argparse.BooleanOptionalAction, default=True,
                        help="refine the shared plan with plain training busy on the other core, as the pipeline runs")  # fmt: skip
    parser.add_argument("--only", nargs="+", choices=CONTENDERS, help="run these contenders only")
    args = parser.parse_args()
    if args.worker is None and args.malloc == "kept" and any(os.environ.get(k) != v for k, v in KEPT_MALLOC.items()):
        # The launcher times the shared plan's stages (refine): with the malloc its ranks run with.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **KEPT_MALLOC})
    if args.worker is not None:
        if args.worker == "plain-server":
            return plain_server(args)
        if args.worker == "plain-load":
            return plain_load(args)
        if args.worker == "plain":
            timing = plain(args)
        elif args.worker == "free":
            timing = free(args)
        elif args.worker == "two-plain-1t":
            timing = two_plain(args)
        elif args.worker in ("tspipe", "auto"):
            timing = tspipe(args, args.worker)
        elif args.worker == "auto-inorder":
            timing = tspipe(args, "auto", lookahead=False)
        elif args.worker in MULTI:
            timing = pippy_multi(args, args.worker)
        else:
            timing = pippy(args, args.worker.split("-")[1])
        if int(os.environ.get("RANK", "0")) == 0:
            args.result.write_text(json.dumps(timing))
        return

    import tspipe_fx

    torch.set_num_threads(1)
    student, teacher = pair()
    x, _ = data(args.batch)
    t0 = time.perf_counter()
    # Profiled at the micro-batch size the stages will run at (auto: at 4), planned for the whole batch.
    chosen = None if args.micro == "auto" else args.micro
    micro_x = x[: args.batch // (chosen or 4)]
    if args.plan is not None:  # a saved plan (--save-plan of an earlier run): the same split again
        from tspipe_fx.plan import Plan

        saved = Plan.load(args.plan)
        pipe = tspipe_fx.compile(student, teacher, 2, example_inputs=(micro_x,), batch_size=args.batch,
                                 micro_batches=chosen or saved.micro_batches, plan=saved)  # fmt: skip
    else:
        with loaded(args) if args.refine_load and args.refine else contextlib.nullcontext():
            t0 = time.perf_counter()
            pipe = tspipe_fx.compile(student, teacher, 2, example_inputs=(micro_x,), batch_size=args.batch,
                                     micro_batches=chosen, cost_model=args.cost_model, refine=args.refine,
                                     loss="micro")  # fmt: skip  (planned as auto trains: a loss per micro-batch)
        print(f"compiled in {time.perf_counter() - t0:.1f} s ({args.cost_model} costs, {args.refine} rounds of "
              f"stage timing, 1 thread{', the other core busy' if args.refine_load and args.refine else ''})\n")  # fmt: skip
    args.micro = pipe.plan.micro_batches
    if args.save_plan is not None:
        pipe.plan.save(args.save_plan)
    print(pipe.report())
    # The interleaved and zero-bubble peers hold two stages per rank: the same pair cut for 4.
    four = tspipe_fx.compile(student, teacher, 4, example_inputs=(micro_x,), batch_size=args.batch,
                             micro_batches=args.micro, cost_model="uniform")  # fmt: skip
    from tspipe_fx.plan import simulate_plan

    simulated = {
        name: args.batch / simulate_plan(dataclasses.replace(pipe.plan, loss=loss), name).period * 1e3
        for name, loss in (("tspipe", "batch"), ("auto", "micro"))
    }
    simulated["auto-inorder"] = simulated["auto"]
    with tempfile.TemporaryDirectory() as tmp:
        args.plan, args.plan4 = Path(tmp) / "plan.json", Path(tmp) / "plan4.json"
        pipe.plan.save(args.plan)
        four.plan.save(args.plan4)
        FAILURES.clear()
        figures: dict[str, list[float]] = {name: [] for name in args.only or CONTENDERS}
        beside: dict[str, list[float]] = {name: [] for name in figures}
        for r in range(args.rounds):
            for name in figures:
                samples_per_s, ratios = launch(name, args, Path(tmp) / f"{name}.txt")
                figures[name].append(samples_per_s)
                beside[name] += ratios
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in figures.items()), flush=True)
    base = statistics.median(figures["plain-1t"]) if "plain-1t" in figures else float("nan")
    print(f"\n{args.rounds} rounds x {args.blocks} blocks x {args.steps} steps, batch {args.batch} in {args.micro} "
          f"micro-batches, malloc {args.malloc}, torch {torch.__version__}, {os.cpu_count()} CPUs\n")  # fmt: skip
    print("| contender | samples/s (median) | min | max | vs plain 1 thread | same round (median, min–max) "
          "| beside (median of blocks, min–max) | measured / simulated |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    plain_1t = figures.get("plain-1t", [])
    for name, values in figures.items():
        if name in FAILURES:
            print(f"| {name} | failed: {FAILURES[name]} | | | | | | |")
            continue
        med = statistics.median(values)
        sim = f"{med / simulated[name]:.2f}" if name in simulated else ""
        # Each round's figure over plain training's in the same round: a machine whose speed drifts
        # over minutes moves both alike.
        paired = [v / p for v, p in zip(values, plain_1t, strict=False) if p > 0]
        same = f"{statistics.median(paired):.2f}x ({min(paired):.2f}–{max(paired):.2f})" if paired else ""
        # Each block's figure over the plain 1-thread step run just before it, in a process of its own.
        near = beside[name]
        by = f"{statistics.median(near):.2f}x ({min(near):.2f}–{max(near):.2f})" if near else ""
        print(f"| {name} | {med:.1f} | {min(values):.1f} | {max(values):.1f} | {med / base:.2f}x | {same} | {by} "
              f"| {sim} |")  # fmt: skip
    if beside.get("plain-1t-micro"):
        share = statistics.median(beside["plain-1t-micro"])
        print(f"\nceiling of a 2-rank pipeline at {args.micro} micro-batches: {2 * share:.2f}x plain 1 thread "
              f"(2 x the micro-batched step's speed beside the whole batch's, {share:.3f})")  # fmt: skip
    # The 2-rank schedules (not the plain steps, the machine's two plain copies or the plan's free ranks).
    schedules = [name for name in figures if beside.get(name) and name not in FAILURES and name not in NOT_SCHEDULES]
    if beside.get("free") and BALANCED.get("free"):
        bound, even = statistics.median(beside["free"]), statistics.median(BALANCED["free"])
        print(f"\nbound of this plan on this machine (free, its ranks with nothing to wait for): {bound:.2f}x plain "
              f"1 thread beside, the slower rank; {even:.2f}x with their work evenly spread")  # fmt: skip
        ranks = [statistics.median(r) for r in zip(*RANK_MS["free"], strict=True)]
        print("  its ranks' ms per step (median of blocks): " + ", ".join(f"rank {i} {t:.0f}" for i, t in enumerate(ranks)))
        for name in schedules:
            print(f"  {name}: {statistics.median(beside[name]) / bound:.2f} of the bound")
    machine = statistics.median(beside["two-plain-1t"]) if beside.get("two-plain-1t") else None
    if machine is not None:
        print(f"\nthis machine's two busy cores (two-plain-1t, two plain 1-thread trainings at once): {machine:.2f}x "
              "plain 1 thread beside, the most any 2-rank scheme reaches here")  # fmt: skip
        for name in schedules:
            print(f"  {name}: {statistics.median(beside[name]) / machine:.2f} of the two cores")
    if beside.get("auto") and "auto" not in FAILURES:
        print("\n" + target_state(statistics.median(beside["auto"]), "beside")
              + (f"; it needs {TARGET / machine:.2f} of this machine's two cores" if machine else ""))  # fmt: skip
    if args.json:
        written = {"samples_per_s": figures, "beside": beside, "balanced": BALANCED, "rank_ms": RANK_MS}
        args.json.write_text(json.dumps(written, indent=1))


if __name__ == "__main__":
    main()
