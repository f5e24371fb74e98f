"""The distributed runtime, started through torchrun (gloo on this CPU): the same results as the
reference trainer, pipeline x data parallel, two "nodes", resume, failures."""

from __future__ import annotations

import copy
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

import tspipe_fx
from tspipe_fx.errors import TspipeError
from tspipe_fx.runtime.reference import ReferenceTrainer

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import dist_worker as worker  # noqa: E402 - the script torchrun starts; its models and data


def _env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "LOCAL_"))
    }
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun(nproc: int, out: Path, *args: str, node: tuple[int, str, bool] | None = None) -> list[str]:
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if node is None:
        launch.append("--standalone")
    else:  # one of two torchruns on this machine, meeting at a c10d rendezvous
        nnodes, endpoint, host = node
        launch += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
                   "--rdzv-id=tspipe-test", f"--rdzv-conf=is_host={str(host).lower()}"]  # fmt: skip
    return [*launch, str(HERE / "dist_worker.py"), "--out", str(out), *args]


def run(nproc: int, out: Path, *args: str, timeout: float = 120) -> None:
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        _torchrun(nproc, out, *args), env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def run_two_nodes(
    out: Path, *args: str, nproc: int = 1, timeout: float = 120
) -> list[tuple[int, str, float]]:
    """Two torchrun invocations, as two machines would start them; (return code, output, seconds)."""
    out.mkdir(parents=True, exist_ok=True)
    endpoint = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            _torchrun(nproc, out, *args, node=(2, endpoint, host)),
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for host in (True, False)
    ]
    t0 = time.monotonic()
    results = []
    for p in procs:
        text, _ = p.communicate(timeout=timeout)
        results.append((p.returncode, text, time.monotonic() - t0))
    return results


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def results(out: Path) -> list[dict[str, Any]]:
    files = sorted(out.glob("rank-*.pt"), key=lambda f: int(f.stem.split("-")[1]))
    return [torch.load(f, weights_only=False) for f in files]


@contextmanager
def one_thread() -> Iterator[None]:
    """The ranks run one torch thread each (torchrun's OMP_NUM_THREADS=1): so does the reference."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def reference(mode: str, steps: int, micro: int, *, tied: bool = False, clip: float | None = None,
              short_last: bool = False, loss: str = "batch", noisy: bool = False,
              precision: str = "fp32") -> tuple[list[float], ReferenceTrainer]:  # fmt: skip
    student, teacher = worker.models(mode, tied, noisy)
    loss_fn = worker.kd_loss if mode == "kd" else worker.byol_loss
    ref = ReferenceTrainer(copy.deepcopy(student), copy.deepcopy(teacher), loss_fn, optimizer=worker.sgd, mode=mode,
                           micro_batches=micro, views=1 if mode == "kd" else 2, momentum=0.9, clip_grad_norm=clip,
                           loss=loss, micro_major=loss != "batch", precision=precision)  # fmt: skip
    losses = []
    with one_thread():
        for step in range(steps):
            a, b = worker.batch(step, mode, worker.rows_of(step, steps, short_last))
            losses.append(ref.step(a, target=b) if mode == "kd" else ref.step(a, b))
    return losses, ref


def assert_matches(got: dict[str, Any], want: list[float], ref: ReferenceTrainer, *, rtol: float = 1e-5,
                   atol: float = 1e-6, buffers: bool = True) -> None:  # fmt: skip
    assert [b for b, _ in got["losses"]] == list(range(len(want)))  # tagged, in order
    assert [x for _, x in got["losses"]] == pytest.approx(want, rel=rtol, abs=atol)
    for which, module in (("student", ref.student), ("teacher", ref.teacher)):
        names = module.state_dict() if buffers else dict(module.named_parameters())
        for name, value in names.items():
            where = f"{which} {name}"
            torch.testing.assert_close(got[which][name], value.detach(), rtol=rtol, atol=atol,
                                       msg=lambda m, where=where: f"{where}: {m}")  # fmt: skip


def assert_replicas_equal(all_results: list[dict[str, Any]]) -> None:
    first = all_results[0]
    for other in all_results[1:]:
        assert other["losses"] == first["losses"]  # the loss reaches every rank
        for which in ("student", "teacher"):
            for name, value in first[which].items():
                assert torch.equal(other[which][name], value), name


@pytest.mark.parametrize(
    ("ranks", "mode", "extra"),
    [
        (2, "kd", ["--short-last"]),
        (2, "momentum", []),
        (4, "kd", []),
        (4, "momentum", ["--clip", "0.5"]),
    ],
    ids=["2-kd-short-last", "2-momentum", "4-kd", "4-momentum-clip"],
)
def test_equals_the_reference(tmp_path: Path, ranks: int, mode: str, extra: list[str]) -> None:
    run(ranks, tmp_path, "--stages", str(ranks), "--mode", mode, "--steps", "6", *extra)
    got = results(tmp_path)
    assert len(got) == ranks
    assert_replicas_equal(got)
    clip = float(extra[extra.index("--clip") + 1]) if "--clip" in extra else None
    want, ref = reference(mode, 6, ranks, clip=clip, short_last="--short-last" in extra)
    assert_matches(got[0], want, ref)


@pytest.mark.parametrize(("ranks", "mode"), [(2, "momentum"), (3, "kd")])
def test_auto_with_a_loss_per_micro_batch_equals_the_reference(tmp_path: Path, ranks: int, mode: str) -> None:
    """The synthesized schedule (here with its backward split in two) across ranks."""
    run(ranks, tmp_path, "--stages", str(ranks), "--mode", mode, "--steps", "5", "--schedule", "auto",
        "--loss", "micro")  # fmt: skip
    got = results(tmp_path)
    assert_replicas_equal(got)
    assert got[0]["split_backward"] == (mode == "kd")  # what the synthesizer chose for these costs
    want, ref = reference(mode, 5, ranks, loss="micro")
    assert_matches(got[0], want, ref, rtol=1e-4, atol=1e-5)  # per-micro-batch terms: fp32 rounding


def test_a_late_neighbour_is_waited_for_with_later_work_that_may_go_first(tmp_path: Path) -> None:
    """The first rank sleeps before each teacher forward: the last rank, waiting for the next
    batch's teacher activation, runs its weight-gradient halves meanwhile (schedule.lookahead),
    and the result is the reference's all the same. (The momentum toy's synthesized lists leave
    nothing that may go first: no split backward there.)"""
    mode = "kd"
    run(2, tmp_path, "--stages", "2", "--mode", mode, "--steps", "4", "--schedule", "auto", "--loss", "micro",
        "--slow", "0:tf:0.2")  # fmt: skip
    got = results(tmp_path)
    assert_replicas_equal(got)
    assert got[0]["early"] == 0 and got[1]["early"] > 0  # the last rank went ahead
    want, ref = reference(mode, 4, 2, loss="micro")
    assert_matches(got[0], want, ref, rtol=1e-4, atol=1e-5)  # per-micro-batch terms: fp32 rounding


@pytest.mark.slow  # the default run keeps under 15 minutes; CI runs these too
@pytest.mark.parametrize(("ranks", "mode", "recompute"), [(2, "momentum", "never"), (3, "kd", "always")])
def test_dropout_and_drop_path_across_ranks_equal_the_reference(tmp_path: Path, ranks: int, mode: str,
                                                                recompute: str) -> None:  # fmt: skip
    """Each draw is seeded by its identity, not by the rank that makes it (nor by a replay)."""
    run(ranks, tmp_path, "--stages", str(ranks), "--mode", mode, "--steps", "4", "--noisy", "--recompute", recompute)
    got = results(tmp_path)
    want, ref = reference(mode, 4, ranks, noisy=True)
    assert_matches(got[0], want, ref)


@pytest.mark.slow  # the default run keeps under 15 minutes; CI runs these too
@pytest.mark.parametrize(("ranks", "mode", "precision"), [(2, "momentum", "bf16"), (3, "kd", "fp16")])
def test_mixed_precision_across_ranks(tmp_path: Path, ranks: int, mode: str, precision: str) -> None:
    """bf16 or fp16 activations cross the ranks; fp16's loss scale decides for every rank."""
    run(ranks, tmp_path, "--stages", str(ranks), "--mode", mode, "--steps", "4", "--precision", precision)
    got = results(tmp_path)
    want, ref = reference(mode, 4, ranks, precision=precision)
    tol = 2e-2 if precision == "bf16" else 2e-3  # a few roundings of the compute dtype
    assert_matches(got[0], want, ref, rtol=tol, atol=tol)


def test_tied_weights_and_clipping_across_ranks(tmp_path: Path) -> None:
    """A weight read by both stages: gradients summed at its owner, the new value sent back."""
    run(2, tmp_path, "--tied", "--clip", "0.3", "--steps", "5")
    got = results(tmp_path)
    assert_replicas_equal(got)
    want, ref = reference("kd", 5, 2, tied=True, clip=0.3)
    assert_matches(got[0], want, ref)


@pytest.mark.parametrize("mode", ["kd", "momentum"])
def test_two_pipelines_of_two_stages(tmp_path: Path, mode: str) -> None:
    """Pipeline x data parallel on 4 ranks: each pipeline trains on half of each batch, the
    gradients are averaged, so the result is the reference's on the whole batch (to fp32
    rounding: a mean of two halves' means). BatchNorm statistics follow pipeline 0's, as DDP's
    broadcast_buffers; the replicas stay bit-identical, the EMA teachers with them."""
    run(4, tmp_path, "--stages", "2", "--mode", mode, "--steps", "6")
    got = results(tmp_path)
    assert_replicas_equal(got)
    want, ref = reference(mode, 6, 4)
    assert_matches(got[0], want, ref, rtol=1e-4, atol=1e-5, buffers=False)


@pytest.mark.parametrize(("ranks", "loss"), [(2, "micro"), (4, "batch")], ids=["one-pipeline", "two-pipelines"])
def test_two_stages_per_rank_equal_the_reference(tmp_path: Path, ranks: int, loss: str) -> None:
    """Virtual stages across ranks: BYOL's toy in 4 stages on 2 devices, rank ``r`` running
    stages ``r`` and ``r + 2`` in its device's synthesized list (the channel from stage 1 back
    to rank 0's stage 2 included); with two pipelines, each stage's gradients are averaged with
    its replica's."""
    run(ranks, tmp_path, "--stages", "2", "--stages-per-device", "2", "--mode", "momentum", "--steps", "5",
        "--schedule", "auto", "--loss", loss)  # fmt: skip
    got = results(tmp_path)
    assert [g["stages_per_device"] for g in got] == [2] * ranks
    assert_replicas_equal(got)
    pipelines = ranks // 2  # (the reference's micro-batches are the pipelines' together)
    want, ref = reference("momentum", 5, got[0]["micro_batches"] * pipelines, loss=loss)
    assert_matches(got[0], want, ref, rtol=1e-4, atol=1e-5, buffers=ranks == 2)


def test_ranks_follow_rank_0s_plan(tmp_path: Path) -> None:
    """Rank 1 compiles another partition (as measured costs can make it): rank 0's is used."""
    run(2, tmp_path, "--other-plan", "--steps", "4")
    got = results(tmp_path)
    assert got[1]["compiled_cuts"] != got[0]["compiled_cuts"]
    assert got[1]["cuts"] == got[0]["cuts"] == got[0]["compiled_cuts"]
    want, ref = reference("kd", 4, 2)
    assert_matches(got[1], want, ref)


def test_two_nodes(tmp_path: Path) -> None:
    """Two torchrun invocations on this machine, two ranks each, a c10d rendezvous: 4 stages."""
    for rc, text, _ in run_two_nodes(
        tmp_path, "--stages", "4", "--mode", "momentum", "--steps", "5", nproc=2
    ):
        assert rc == 0, text[-6000:]
    got = results(tmp_path)
    assert len(got) == 4
    assert_replicas_equal(got)
    want, ref = reference("momentum", 5, 4)
    assert_matches(got[0], want, ref)


def resumed_equals_straight(out: Path, ranks: int, common: list[str], save_at: int, rank: int = 0) -> dict[str, Any]:
    """A run straight, and the same run saved after ``save_at`` steps and resumed by a new
    torchrun: the same losses and weights, bit for bit. The first part's results."""
    run(ranks, out / "straight", *common)
    run(ranks, out / "first", *common, "--save-at", str(save_at))
    run(ranks, out / "second", *common, "--resume", str(out / "first" / "ckpt"))
    straight, first, second = (results(out / k)[rank] for k in ("straight", "first", "second"))
    assert straight["losses"] == first["losses"] + second["losses"]
    for which in ("student", "teacher"):
        for name, value in straight[which].items():
            assert torch.equal(second[which][name], value), name
    return first


def test_resume_in_a_new_process_group_is_bit_identical(tmp_path: Path) -> None:
    """6 steps straight equal 3 steps, a checkpoint, a new torchrun that resumes, 3 steps
    (momentum with a one-step-late teacher, clipping, two pipelines)."""
    common = ["--stages", "2", "--mode", "momentum", "--clip", "0.5", "--steps", "6"]
    first = resumed_equals_straight(tmp_path, 4, common, 3)
    ckpt = tmp_path / "first" / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "rng-0.g1.pt", "rng-1.g1.pt", "rng-2.g1.pt", "rng-3.g1.pt", "stage-0.g1.pt", "stage-1.g1.pt",
        "trainer.g1.pt", "tspipe-checkpoint.json",
    ]  # fmt: skip
    consolidated = torch.load(tmp_path / "first" / "consolidated.pt", weights_only=True)
    for which in ("student", "teacher"):
        for name, value in first[which].items():
            assert torch.equal(consolidated[which][name], value), name


@pytest.mark.slow  # three torchruns; the default run keeps under 15 minutes
def test_resume_of_two_stages_per_rank_is_bit_identical(tmp_path: Path) -> None:
    """Virtual stages resume as one stage per rank does: each rank writes both its stages' files."""
    common = ["--stages", "2", "--stages-per-device", "2", "--mode", "momentum", "--schedule", "auto", "--steps", "5"]
    resumed_equals_straight(tmp_path, 2, common, 2, rank=1)
    stages = sorted(p.name for p in (tmp_path / "first" / "ckpt").iterdir() if p.name.startswith("stage-"))
    assert stages == [f"stage-{j}.g1.pt" for j in range(4)]


@pytest.mark.parametrize("how", ["raise", "loss"])
def test_a_failing_rank_ends_every_rank(tmp_path: Path, how: str) -> None:
    """Rank 1 raises (in the user's loop at step 2, or inside the runtime's first loss task):
    rank 0 ends too, with a message that names rank 1 and its error."""
    out = tmp_path
    out.mkdir(exist_ok=True)
    t0 = time.monotonic()
    done = subprocess.run(_torchrun(2, out, "--fail", f"1:2:{how}", "--steps", "6"), env=_env(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    elapsed = time.monotonic() - t0
    text = done.stdout + done.stderr
    assert done.returncode != 0
    assert elapsed < 60
    error = "ValueError: boom at step 2" if how == "raise" else "ValueError: boom in the loss"
    # The failed rank waits (a few seconds at most) until its peers have read its notice, so
    # torchrun's own teardown does not cut their message short.
    assert (
        f"tspipe_fx: rank 0 stops: rank 1 (stage 1) failed: {'task loss0: ' if how == 'loss' else ''}{error}"
        in text
    ), text[-4000:]
    assert not list(out.glob("rank-*.pt"))
    assert _root_cause(text) == (
        1,
        f"rank 1 (stage 1) failed: {'task loss0: ' if how == 'loss' else ''}{error}",
    )


def _root_cause(text: str) -> tuple[int, str]:
    """The rank and the first line of the message in torchrun's "Root Cause" box."""
    box = text[text.index("Root Cause (first observed failure):") :]
    rank = re.search(r"rank\s*: (\d+) \(local_rank", box)
    message = re.search(r"(?:traceback|error_file)\s*:.*\n(?:\s*traceback\s*:\s*)?(.*)", box)
    assert rank and message, box[:2000]
    return int(rank.group(1)), message.group(1).strip()


def test_a_stopped_rank_is_named_and_killed(tmp_path: Path) -> None:
    """Issue 13.10: a SIGSTOPped rank took 52 s to clear (a 20 s heartbeat, then torchrun's 30 s
    grace for a process that cannot take its SIGTERM), and torchrun blamed a healthy rank."""
    t0 = time.monotonic()
    done = subprocess.run(_torchrun(2, tmp_path, "--fail", "1:2:stop", "--steps", "6"), env=_env(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    elapsed = time.monotonic() - t0
    text = done.stdout + done.stderr
    assert done.returncode != 0
    assert elapsed < 40, (elapsed, text[-3000:])  # start-up included; the stop clears in ~10 s
    rank, message = _root_cause(text)
    assert rank == 1 and message.startswith("rank 1 (stage 1) stopped answering for 10 s"), text[-3000:]


def test_a_killed_rank_ends_the_other_node(tmp_path: Path) -> None:
    """Rank 1 (the second "machine") is SIGKILLed mid-run: rank 0, whose torchrun knows nothing
    of it, ends with an error naming rank 1 instead of hanging."""
    (rc0, text0, t0), (rc1, _, t1) = run_two_nodes(tmp_path, "--fail", "1:2:kill", "--steps", "6")
    assert rc0 != 0 and rc1 != 0
    assert max(t0, t1) < 60
    assert "lost rank 1 (stage 1)" in text0 or "rank 1 (stage 1) stopped answering" in text0, text0[-4000:]
    # The survivor's torchrun names rank 0 (its only rank), with the lost rank as the reason.
    rank, message = _root_cause(text0)
    assert rank == 0 and re.match(
        r"rank 0 stops: rank 1 \(stage 1\) (was lost|stopped answering)", message
    ), message


def test_a_world_that_is_no_multiple_of_the_stages(tmp_path: Path) -> None:
    done = subprocess.run(_torchrun(3, tmp_path, "--stages", "2"), env=_env(), capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode != 0
    assert "the world has 3 ranks, not a multiple of the pipeline's 2 devices" in done.stdout + done.stderr


def test_dist_without_a_process_group_says_how_to_start() -> None:
    student, teacher = worker.models("kd", False)
    pipe = tspipe_fx.compile(student, teacher, 2, example_inputs=(torch.randn(4, 8),), cost_model="uniform")
    env = {
        k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k in os.environ
    }
    try:
        with pytest.raises(TspipeError, match="torchrun --nproc-per-node"):
            pipe.trainer(worker.kd_loss, optimizer=worker.sgd, runtime="dist")
    finally:
        os.environ.update(env)


def test_an_unknown_runtime_is_named() -> None:
    student, teacher = worker.models("kd", False)
    pipe = tspipe_fx.compile(student, teacher, 2, example_inputs=(torch.randn(4, 8),), cost_model="uniform")
    with pytest.raises(TspipeError, match=r"runtime must be 'local'.*or 'dist'.*got 'mpi'"):
        pipe.trainer(worker.kd_loss, optimizer=worker.sgd, runtime="mpi")


@pytest.mark.slow
def test_cpu_pipeline_benchmark_runs(tmp_path: Path) -> None:
    """The benchmark's thirteen contenders on tiny sizes (its figures are benchmarks/README.md's),
    on the uniform cost model's plan: one split every time. With freshly measured plans the
    tspipe contender failed 2 times in about 20 such runs, behind torchrun's ChildFailedError,
    not reproduced since (an open bug; TSPIPE_BENCH_LOGS=DIR keeps a failing contender's log)."""
    env = {**_env(), "TSPIPE_BENCH_IMAGE": "32"}
    done = subprocess.run(
        [sys.executable, str(HERE.parent / "benchmarks" / "cpu_pipeline" / "run.py"), "--rounds", "1", "--steps", "1",
         "--blocks", "2", "--batch", "8", "--micro", "2", "--cost-model", "uniform", "--json", str(tmp_path / "figures.json"), "--save-plan", str(tmp_path / "plan.json")],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| tspipe |" in done.stdout
    import json

    written = json.loads((tmp_path / "figures.json").read_text())
    figures, beside = written["samples_per_s"], written["beside"]
    assert set(figures) == {"plain-1t", "plain-2t", "plain-1t-micro", "two-plain-1t", "free", "tspipe", "auto", "auto-inorder",
                            "pippy-gpipe", "pippy-1f1b", "pippy-interleaved1f1b", "pippy-interleavedzb",
                            "pippy-zbv"}  # fmt: skip
    assert all(figures[name][0] > 0 for name in figures), done.stdout[-3000:]
    assert figures["tspipe"][0] > 0, done.stdout[-3000:]  # a contender that failed says why in the table
    # Every 2-rank contender's block has its plain 1-thread step beside it, and the micro-batched
    # plain step the whole batch's (the schedules' ceiling); the other plain ones have none.
    assert all(len(beside[name]) == 2 and min(beside[name]) > 0 for name in figures if not name.startswith("plain"))
    assert len(beside["plain-1t-micro"]) == 2 and beside["plain-1t"] == beside["plain-2t"] == []
    assert "ceiling of a 2-rank pipeline at 2 micro-batches:" in done.stdout
    assert "| beside (median of blocks, min–max) |" in done.stdout
    assert "rounds of stage timing, 1 thread, the other core busy)" in done.stdout  # refined as it runs
    # The plan's bound on this machine (free ranks): per block, the slower rank's figure and the
    # ranks' mean, which is never the slower; every schedule's share of the bound is printed.
    slower, even = beside["free"], written["balanced"]["free"]
    assert len(even) == 2 and all(e >= s * (1 - 1e-9) for s, e in zip(slower, even, strict=True))
    assert "bound of this plan on this machine (free, its ranks with nothing to wait for):" in done.stdout
    assert len(written["rank_ms"]["free"]) == 2 and all(len(r) == 2 and min(r) > 0 for r in written["rank_ms"]["free"])
    assert re.search(r"its ranks' ms per step \(median of blocks\): rank 0 \d+, rank 1 \d+", done.stdout)
    assert re.search(r"  auto: \d+\.\d\d of the bound", done.stdout), done.stdout[-3000:]
    assert re.search(r"  auto-inorder: \d+\.\d\d of the bound", done.stdout)  # the same, in order
    # The machine's own limit: two plain 1-thread trainings at once, both copies' samples counted
    # (each block's figure the two copies' against the one plain step beside it).
    assert "this machine's two busy cores (two-plain-1t, two plain 1-thread trainings at once):" in done.stdout
    assert re.search(r"  auto: \d+\.\d\d of the two cores", done.stdout)
    assert re.search(r"issue 14's target, 1\.8x plain 1 thread: auto \d+\.\d\dx beside, (not )?met; it needs "
                     r"\d+\.\d\d of this machine's two cores", done.stdout)  # fmt: skip
    # free and auto in the same two processes, block after block, on the plan saved above.
    done = subprocess.run(
        [sys.executable, str(HERE.parent / "benchmarks" / "cpu_pipeline" / "side_by_side.py"), "--plan",
         str(tmp_path / "plan.json"), "--rounds", "2", "--steps", "1", "--batch", "8"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("free", "auto"):
        for rank in (0, 1):
            assert re.search(rf"\| {name} \| {rank} \| \d+ \| \d+ \| \d+ \|", done.stdout), done.stdout
        assert re.search(rf"{name}: both ranks' CPU \d+\.\d+x one plain step's time", done.stdout)
    assert re.search(r"auto: \d\.\d+ of free, same round", done.stdout)
    assert re.search(r"issue 14's target, 1\.8x plain 1 thread: auto \d+\.\d\dx, (not )?met", done.stdout)
