"""Compiled stages: the same losses and weights as eager stages; a missing toolchain is named
before anything runs; stages that draw random numbers stay eager."""

from __future__ import annotations

import copy
import shutil
from typing import Any

import pytest
import torch
from toys import Net, Noisy, kd_loss, sgd
from toys import run_batches as _run

import tspipe_fx
from tspipe_fx.errors import TspipeError
from tspipe_fx.runtime.compiled import checked_compile


def _train(schedule: str, model: type = Net, **options: Any) -> tuple[list[float], dict[str, torch.Tensor], Any]:
    torch.manual_seed(0)
    student, teacher = model(), model().eval()
    pipe = tspipe_fx.compile(copy.deepcopy(student), teacher, 2, example_inputs=(torch.randn(8, 8),),
                             cost_model="uniform")  # fmt: skip
    trainer = pipe.trainer(kd_loss, optimizer=sgd, schedule=schedule, **options)
    g = torch.Generator().manual_seed(4)
    data = [(torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(3)]
    losses = _run(trainer, [(x, {"target": y}) for x, y in data])
    trained = model()
    trainer.sync_to_modules(student=trained)
    return losses, dict(trained.state_dict()), trainer


@pytest.mark.slow
@pytest.mark.parametrize(("schedule", "options"),
                         [("tspipe", {}), ("auto", {"recompute": "except_last"}), ("tspipe", {"precision": "bf16"})])  # fmt: skip
def test_compiled_stages_train_as_eager_stages_do(schedule: str, options: dict[str, Any]) -> None:
    """Also under a split backward (a compiled stage's is whole), with recompute, and in bf16 (one
    worker thread tracing under autocast while another leaves it once deadlocked on autocast's
    process-wide cast cache)."""
    want, weights, _ = _train(schedule, **options)
    got, trained, trainer = _train(schedule, compile_stages=True, **options)
    assert all(getattr(d.student, "_compiled_call_impl", None) is not None for d in trainer.runtime.devices)
    tol = 2e-2 if options.get("precision") == "bf16" else 1e-5  # fused kernels round differently
    assert got == pytest.approx(want, rel=tol, abs=tol / 10)
    for name, value in weights.items():
        torch.testing.assert_close(trained[name], value, rtol=tol * 10, atol=tol, msg=name)


@pytest.mark.slow
def test_stages_that_draw_stay_eager_and_say_so() -> None:
    want, _, _ = _train("tspipe", Noisy)
    # The toy's drop-path draws in eval mode too; the eval teacher's F.dropout does not.
    with pytest.warns(UserWarning, match="student stage 0, teacher stage 0, student stage 1 draw random numbers"):
        got, _, trainer = _train("tspipe", Noisy, compile_stages=True)
    assert got == want  # eager, drawn by identity: the same masks
    compiled = [getattr(m, "_compiled_call_impl", None) is not None for d in trainer.runtime.devices
                for m in (d.student, d.teacher)]  # fmt: skip
    assert compiled == [False, False, False, True]


def test_a_missing_compiler_is_named_before_anything_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    pipe = tspipe_fx.compile(Net(), Net().eval(), 2, example_inputs=(torch.randn(8, 8),), cost_model="uniform")
    with pytest.raises(TspipeError, match=r"compiling CPU stages needs a C\+\+ compiler .*\(compile_stages=False\)"):
        pipe.trainer(kd_loss, optimizer=sgd, compile_stages=True)


def test_compile_stages_takes_a_mode_or_a_flag() -> None:
    assert checked_compile(True) == "default" and checked_compile(False) is None
    assert checked_compile("max-autotune") == "max-autotune"
    with pytest.raises(TspipeError, match=r"compile_stages must be True, False or a torch.compile mode .* got 'fast'"):
        checked_compile("fast")


def test_the_compile_gate_runs_new_keys_alone_and_known_keys_side_by_side() -> None:
    """A call that may compile (a new key: stage, direction, shapes) runs while no other call
    does, since torch.compile's tracer patches nn.Module.__call__ for the whole process (on an
    H200, torch 2.11: "FX to symbolically trace a dynamo-optimized function" from the other
    device's thread); calls of known keys overlap; a failed call's key stays new."""
    import threading
    import time

    from tspipe_fx.runtime.compiled import CompileGate, shapes

    gate = CompileGate(enabled=True)
    with gate.call("a"):
        pass
    both_in = threading.Barrier(2, timeout=5)

    def known() -> None:
        with gate.call("a"):
            both_in.wait()  # breaks (BrokenBarrierError) unless both are inside at once

    threads = [threading.Thread(target=known) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not both_in.broken

    def order(first_new: str) -> list[str]:
        """A known call inside; then a call of ``first_new``; then another known call: the log."""
        log: list[str] = []
        inside, release = threading.Event(), threading.Event()

        def call(key: str, hold: bool = False) -> None:
            with gate.call(key):
                log.append(f"{key} in")
                if hold:
                    inside.set()
                    release.wait(5)
                time.sleep(0.02)
                log.append(f"{key} out")

        threads = [threading.Thread(target=call, args=("a", True))]
        threads[0].start()
        inside.wait(5)
        for key in (first_new, "a"):  # the known call arriving while a new one waits goes after it
            threads.append(threading.Thread(target=call, args=(key,)))
            threads[-1].start()
            time.sleep(0.1)
        assert log == ["a in"]
        release.set()
        for th in threads:
            th.join(5)
        return log

    assert order("b") == ["a in", "a out", "b in", "b out", "a in", "a out"]
    with pytest.raises(ValueError), gate.call("c"):
        raise ValueError("a compile that failed")
    assert order("c") == ["a in", "a out", "c in", "c out", "a in", "a out"]  # still new: alone
    assert shapes([torch.zeros(2, 3), 1.0, torch.ones(4, dtype=torch.int64)]) == (
        ((2, 3), torch.float32),
        ((4,), torch.int64),
    )
    off = CompileGate(enabled=False)
    with off.call("x"), off.call("x"):  # nested: nothing waits
        pass
