"""Checkpoints of a trainer: one file per stage, written atomically, loaded with ``weights_only``.

A checkpoint only ever touches its own files, so it can go into a folder that holds other
things (``results/``, ``.``). Each save is a new *generation* ``G``::

    stage-0.gG.pt ... stage-{N-1}.gG.pt   student and teacher stage weights, optimizer, LR scheduler
    rng-0.gG.pt ... rng-{R-1}.gG.pt       each process's RNG states (one process: rng-0.gG.pt)
    trainer.gG.pt                         batch counter, EMA momentum, fp16 loss scale
    tspipe-checkpoint.json                the manifest: generation, stages, the plan's cuts

The manifest is written last, atomically: it is the commit point. A crash before it leaves the
previous generation whole (its files are removed only after the new manifest is in place), so
a folder always holds one whole checkpoint or none. Checkpoints written before generations (a
``COMPLETE`` file, or ``DIR.old`` after a crash) still load.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from tspipe_fx.errors import TspipeError
from tspipe_fx.files import write_atomic, write_text_atomic

__all__ = ["MANIFEST", "load_checkpoint", "save_checkpoint", "save_consolidated"]

MANIFEST = "tspipe-checkpoint.json"
_OURS = re.compile(r"(stage-\d+|rng-\d+|trainer)\.g(\d+)\.pt")  # the files a checkpoint owns
_STAGE_KEYS = ("student", "teacher", "optimizers", "schedulers", "teacher_prev")


def _atomic_save(obj: Any, path: Path) -> None:
    write_atomic(path, lambda f: torch.save(obj, f))


def _where(trainer: Any) -> tuple[int, bool]:
    """This process's global rank, and whether it writes stage files (pipeline 0 does)."""
    layout = getattr(trainer.runtime, "layout", None)
    return (0, True) if layout is None else (layout.rank, layout.pipeline == 0)


def _rng_state() -> dict[str, torch.Tensor]:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return rng


def _manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's checkpoint manifest, or None where there is none."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        int(data["generation"]), int(data["stages"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TspipeError(
            f"{path} is not a tspipe_fx checkpoint manifest ({type(e).__name__}: {e})"
        ) from None
    return dict(data)


def _cuts(trainer: Any) -> dict[str, list[str]]:
    return {"student": list(trainer.plan.student.cuts), "teacher": list(trainer.plan.teacher.cuts)}


def _graphs(trainer: Any) -> dict[str, str]:
    return {"student": trainer.plan.student.graph_hash, "teacher": trainer.plan.teacher.graph_hash}


def _load(path: Path) -> Any:
    """One checkpoint file; a missing or damaged one is named."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged file; all mean the same
        raise TspipeError(
            f"cannot read checkpoint file {path}: {type(e).__name__}: {e}; hint: the file is missing or "
            "damaged (a copy cut short?): load an earlier checkpoint"
        ) from None


def save_checkpoint(trainer: Any, directory: str | os.PathLike[str]) -> Path:
    """Write ``trainer``'s full state into ``directory`` (call ``finish()`` first: nothing may be
    in flight). Files that are not the checkpoint's own stay as they are.

    Under the distributed runtime every rank calls it with the same directory (on a file system
    they share): pipeline 0's ranks write their stage files, every rank its RNG state, rank 0
    the rest; the barriers between keep the checkpoint whole.
    """
    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise TspipeError(
            f"cannot save a checkpoint into {folder}: it is a file, not a folder; hint: a folder name "
            "(created if missing; anything else in it is left alone)"
        )
    state = trainer.state_dict()
    rank, writes = _where(trainer)
    before = _manifest(folder)  # every rank reads it before anyone writes a new one
    generation = before["generation"] + 1 if before is not None else 1
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
    trainer.runtime.barrier()
    if writes:
        for i, j in enumerate(state["stages"]):
            _atomic_save({k: state[k][i] for k in _STAGE_KEYS}, folder / f"stage-{j}.g{generation}.pt")
    _atomic_save(_rng_state(), folder / f"rng-{rank}.g{generation}.pt")
    trainer.runtime.barrier()
    if rank == 0:
        _atomic_save({k: state[k] for k in ("momentum", "next_index", "loss_scale")},
                     folder / f"trainer.g{generation}.pt")  # fmt: skip
        manifest = {
            "format": 2,
            "generation": generation,
            "stages": trainer.runtime.n_stages,
            "cuts": _cuts(trainer),
            "graphs": _graphs(trainer),
        }
        write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=1))  # the commit point
        for path in folder.iterdir():  # earlier generations, ours alone
            found = _OURS.fullmatch(path.name)
            if found and int(found.group(2)) != generation:
                path.unlink(missing_ok=True)
    trainer.runtime.barrier()
    return folder


def load_checkpoint(trainer: Any, directory: str | os.PathLike[str]) -> None:
    """Restore a checkpoint written by :func:`save_checkpoint` into a trainer of the same plan
    (under the distributed runtime: on every rank, with any number of pipelines)."""
    if trainer.pending is not None:
        raise TspipeError(
            f"batch {trainer.pending.index} is still in flight: a checkpoint loads into a trainer with "
            "nothing in flight; hint: call finish() first, or load into a new trainer"
        )
    folder = Path(directory)
    manifest = _manifest(folder)
    if manifest is not None:
        suffix = f".g{manifest['generation']}"
        if manifest.get("graphs", _graphs(trainer)) != _graphs(trainer):
            raise TspipeError(
                f"the checkpoint at {folder} was saved for other models (graphs {manifest['graphs']}), this "
                f"trainer's are {_graphs(trainer)}; hint: load it into a trainer of the models that saved it"
            )
        if manifest.get("cuts", _cuts(trainer)) != _cuts(trainer):
            raise TspipeError(
                f"the checkpoint at {folder} was saved from a plan cut at {manifest['cuts']}, this trainer's "
                f"plan is cut at {_cuts(trainer)}; hint: compile with plan=Plan.load(...) of the run that "
                "saved it"
            )
    else:
        suffix, folder = "", _legacy(folder)
        manifest = {"stages": _load(folder / "trainer.pt")["stages"]}
    if manifest["stages"] != trainer.runtime.n_stages:
        raise TspipeError(
            f"the checkpoint has {manifest['stages']} stages, the trainer {trainer.runtime.n_stages}"
        )
    meta = _load(folder / f"trainer{suffix}.pt")
    held = [d.index for d in trainer.runtime.devices]
    stages = [_load(folder / f"stage-{j}{suffix}.pt") for j in held]
    trainer.load_state_dict(
        {
            **{k: [s[k] for s in stages] for k in _STAGE_KEYS},
            "momentum": meta["momentum"],
            "next_index": meta["next_index"],
            "loss_scale": meta.get("loss_scale"),
        }
    )
    rank, _ = _where(trainer)
    rng_file = folder / f"rng-{rank}{suffix}.pt"
    if rng_file.exists():  # a rank the saving run did not have starts afresh
        rng = _load(rng_file)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(rng["cuda"]))


def _legacy(folder: Path) -> Path:
    """A checkpoint from before generations: ``COMPLETE`` in the folder, or in ``DIR.old``."""
    if (folder / "COMPLETE").exists():
        return folder
    old = folder.with_name(folder.name + ".old")
    if (old / "COMPLETE").exists():
        return old  # a save crashed after moving the previous checkpoint aside
    raise TspipeError(
        f"no complete checkpoint at {folder} (no {MANIFEST}); hint: the folder save_checkpoint wrote"
    )


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
