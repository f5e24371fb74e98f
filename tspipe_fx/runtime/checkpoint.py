"""Checkpoints of a trainer: one file per stage, written atomically, loaded with ``weights_only``.

Layout of a checkpoint directory::

    stage-0.pt ... stage-{N-1}.pt   student and teacher stage weights, optimizer, LR scheduler
    rng-0.pt ... rng-{R-1}.pt       each process's RNG states (one process: rng-0.pt)
    trainer.pt                      batch counter, EMA momentum
    COMPLETE                        written last

A save goes to ``DIR.tmp`` first and is renamed into place; the previous checkpoint survives as
``DIR.old`` until the new one is complete, so a crash leaves one whole checkpoint, never half
of one. :func:`load_checkpoint` reads ``DIR`` (or ``DIR.old`` after such a crash).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from tspipe_fx.errors import TspipeError
from tspipe_fx.files import write_atomic

__all__ = ["load_checkpoint", "save_checkpoint", "save_consolidated"]


def _atomic_save(obj: Any, path: Path) -> None:
    write_atomic(path, lambda f: torch.save(obj, f))


_STAGE_KEYS = ("student", "teacher", "optimizers", "schedulers", "teacher_prev")


def _where(trainer: Any) -> tuple[int, bool]:
    """This process's global rank, and whether it writes stage files (pipeline 0 does)."""
    layout = getattr(trainer.runtime, "layout", None)
    return (0, True) if layout is None else (layout.rank, layout.pipeline == 0)


def _rng_state() -> dict[str, torch.Tensor]:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return rng


def save_checkpoint(trainer: Any, directory: str | os.PathLike[str]) -> Path:
    """Write ``trainer``'s full state (call ``finish()`` first: nothing may be in flight).

    Under the distributed runtime every rank calls it with the same directory (on a file system
    they share): pipeline 0's ranks write their stage files, every rank its RNG state, rank 0
    the rest; the barriers between keep the directory whole or absent.
    """
    state = trainer.state_dict()
    rank, writes = _where(trainer)
    final = Path(directory)
    staging = final.with_name(final.name + ".tmp")
    old = final.with_name(final.name + ".old")
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    trainer.runtime.barrier()
    if writes:
        for i, j in enumerate(state["stages"]):
            _atomic_save({k: state[k][i] for k in _STAGE_KEYS}, staging / f"stage-{j}.pt")
    _atomic_save(_rng_state(), staging / f"rng-{rank}.pt")
    trainer.runtime.barrier()
    if rank == 0:
        _atomic_save({"momentum": state["momentum"], "next_index": state["next_index"],
                      "stages": trainer.runtime.n_stages}, staging / "trainer.pt")  # fmt: skip
        (staging / "COMPLETE").write_text("ok\n")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    trainer.runtime.barrier()
    return final


def load_checkpoint(trainer: Any, directory: str | os.PathLike[str]) -> None:
    """Restore a checkpoint written by :func:`save_checkpoint` into a trainer of the same plan
    (under the distributed runtime: on every rank, with any number of pipelines)."""
    path = Path(directory)
    if not (path / "COMPLETE").exists():
        old = path.with_name(path.name + ".old")
        if (old / "COMPLETE").exists():
            path = old  # a save crashed after moving the previous checkpoint aside
        else:
            raise TspipeError(f"no complete checkpoint at {path}; hint: the directory save_checkpoint wrote")
    meta = torch.load(path / "trainer.pt", weights_only=True)
    if meta["stages"] != trainer.runtime.n_stages:
        raise TspipeError(
            f"the checkpoint has {meta['stages']} stages, the trainer {trainer.runtime.n_stages}"
        )
    held = [d.index for d in trainer.runtime.devices]
    stages = [torch.load(path / f"stage-{j}.pt", weights_only=True) for j in held]
    trainer.load_state_dict(
        {
            **{k: [s[k] for s in stages] for k in _STAGE_KEYS},
            "momentum": meta["momentum"],
            "next_index": meta["next_index"],
        }
    )
    rank, _ = _where(trainer)
    if (path / f"rng-{rank}.pt").exists():  # a rank the saving run did not have starts afresh
        rng = torch.load(path / f"rng-{rank}.pt", weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(rng["cuda"]))


def save_consolidated(trainer: Any, path: str | os.PathLike[str]) -> None:
    """The user's original student and teacher state_dicts, for use outside tspipe_fx
    (under the distributed runtime every rank calls it; rank 0 writes)."""
    trainer.sync_to_modules()
    student, teacher = trainer.student.home, trainer.teacher.home
    if student is None or teacher is None:
        raise TspipeError(
            "save_consolidated needs the original modules: compile the nn.Modules, not captured ones"
        )
    if _where(trainer)[0] == 0:
        _atomic_save({"student": student.state_dict(), "teacher": teacher.state_dict()}, Path(path))
    trainer.runtime.barrier()
