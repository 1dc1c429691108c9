"""Checkpoint folders: complete or absent, found again by `findlast`, resumed exactly.

Layout (EveryDream2's): logs/<project><YYYYmmdd-HHMMSS>/ckpts/<prefix><project>-ep<NN>-gs<NNNNN>/
holding the task's model files, `trainer_state.pt` (optimizer, LR schedule, RNG states: tensors
and numbers only, so it loads with weights_only=True) and `trainer_state.json`. A folder is built
under a temporary name and renamed into place only when every file is flushed, so a kill at any
moment leaves either the whole checkpoint or none; `trainer_state.json` is written last and is
what marks a folder complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from difftrain.errors import ConfigError

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.pt"
TEMP_PREFIX = ".tmp-"


@dataclass
class Progress:
    """Where a run is: enough to continue it exactly."""

    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    global_step: int = 0  # optimizer steps taken
    stage: int = 0  # 0: initial training; k >= 1: reflow iteration k
    epoch_in_stage: int = 0
    seed: int = 0
    project_name: str = ""
    task: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoint_name(project: str, progress: Progress, prefix: str = "") -> str:
    return f"{prefix}{project}-ep{progress.epoch:02d}-gs{progress.global_step:05d}"


def fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def save_checkpoint(ckpts_dir: Path, name: str, progress: Progress, tensors: dict[str, Any],
                    write_model: Callable[[Path], None], config: dict[str, Any]) -> Path:
    """Write a complete checkpoint folder atomically and return its path.

    `write_model(folder)` writes the task's model files into the (temporary) folder.
    An existing checkpoint of the same name is kept, never overwritten.
    """
    ckpts_dir.mkdir(parents=True, exist_ok=True)
    final = ckpts_dir / name
    if final.exists():
        return final
    temp = ckpts_dir / f"{TEMP_PREFIX}{name}-{os.getpid()}"
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir()
    try:
        write_model(temp)
        torch.save(tensors, temp / STATE_TENSORS)
        (temp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
        (temp / STATE_JSON).write_text(json.dumps(asdict(progress), indent=2), encoding="utf-8")
        fsync_tree(temp)
        os.replace(temp, final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return final


def is_checkpoint(folder: Path) -> bool:
    return (folder / STATE_JSON).is_file() and (folder / STATE_TENSORS).is_file() \
        and not folder.name.startswith(TEMP_PREFIX)


def read_progress(folder: Path) -> Progress:
    try:
        data = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
        return Progress(**data)
    except (OSError, json.JSONDecodeError, TypeError) as error:
        raise ConfigError(f"checkpoint '{folder}' has an unreadable {STATE_JSON} ({error}); "
                          "pick another checkpoint.") from None


def load_trainer_tensors(folder: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    # weights_only: a checkpoint folder may come from anywhere; it must never run code.
    return torch.load(folder / STATE_TENSORS, map_location=map_location, weights_only=True)


def find_last(logdir: Path, project: str) -> tuple[Optional[Path], list[Path]]:
    """The complete checkpoint with the most optimizer steps under logdir/<project>*/ckpts/.

    Returns (checkpoint or None, incomplete folders that were skipped).
    """
    best: Optional[tuple[int, float, Path]] = None
    skipped: list[Path] = []
    for ckpts in sorted(logdir.glob(f"{project}*/ckpts")):
        for folder in sorted(ckpts.iterdir()):
            if not folder.is_dir():
                continue
            if not is_checkpoint(folder):
                skipped.append(folder)
                continue
            progress = read_progress(folder)
            if progress.project_name and progress.project_name != project:
                continue
            key = (progress.global_step, folder.stat().st_mtime, folder)
            if best is None or key[:2] > best[:2]:
                best = key
    return (best[2] if best else None), skipped


def resolve_resume(resume_ckpt: str, logdir: Path, project: str, log: Callable[[str], None]) -> Optional[Path]:
    """The checkpoint folder `resume_ckpt` names, or None when it names a base model instead."""
    if resume_ckpt == "findlast":
        found, skipped = find_last(logdir, project)
        for folder in skipped:
            log(f"findlast: skipped incomplete checkpoint '{folder}' (no {STATE_JSON}).")
        if found is None:
            raise ConfigError(f"resume_ckpt 'findlast': no complete checkpoint of project "
                              f"'{project}' under '{logdir}'. Train once first, or name a model.")
        return found
    candidate = Path(resume_ckpt.replace("\\", os.sep) if os.sep == "/" else resume_ckpt)
    if candidate.is_dir() and (candidate / STATE_JSON).exists():
        if not is_checkpoint(candidate):
            raise ConfigError(f"checkpoint '{candidate}' is incomplete (interrupted while saving); "
                              "resume from an earlier one or use 'findlast'.")
        return candidate
    return None


def new_log_folder(logdir: Path, project: str) -> Path:
    """logs/<project><YYYYmmdd-HHMMSS>/; a second run in the same second gets a suffix."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        logdir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot create the log folder '{logdir}': {error.strerror}. "
                          "Set logdir to a writable folder.") from None
    for attempt in range(1000):
        folder = logdir / (f"{project}{stamp}" + (f"-{attempt}" if attempt else ""))
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise ConfigError(f"could not create a new log folder under '{logdir}'.")
