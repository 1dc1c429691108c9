"""Checkpoint folders: complete or absent, found again by `findlast`, resumed exactly.

Layout (EveryDream2's): logs/<project><YYYYmmdd-HHMMSS>/ckpts/<prefix><project>-ep<NN>-gs<NNNNN>/
holding the task's model files, `trainer_state.pt` (optimizer, LR schedule, RNG states: tensors
and numbers only, so it loads with weights_only=True), `trainer_state.json` and `manifest.json`.

Complete or absent: a folder is built under a temporary name and renamed into place only when
every file is flushed to disk, so a kill at any moment leaves either the whole checkpoint or none.
The rename alone cannot vouch for a folder that was copied or synced by hand (a half-finished
rsync looks like any other folder), so the manifest, written last, lists every file with its size
and SHA-256: `is_checkpoint` checks the sizes (cheap, done for every folder `findlast` looks at)
and `verify_checkpoint` the hashes (done once, for the folder a run resumes from).
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

# The atomic writer lives in the bottom layer so figures, curves and data can use it too; its names
# stay importable from here.
from difftrain.atomic_files import TEMP_PREFIX, fsync_folder, write_file_atomically
from difftrain.errors import ConfigError

# trainer_state.pt holds the optimizer state under one of these keys: torch.optim's own state_dict
# (one process, data parallel), the whole state keyed by parameter name (FSDP), or the name of the
# folder of DeepSpeed's own per-process files (difftrain.sharding).
OPTIMIZER = "optimizer"
OPTIMIZER_BY_NAME = "optimizer_by_name"
OPTIMIZER_ELSEWHERE = "optimizer_in"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.pt"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class StartPoint:
    """Where the weights of a run come from: `resolve_start` decides it once, on the main process,
    and every process receives the same value (no task resolves resume_ckpt again).

    `checkpoint`: a difftrain checkpoint folder to continue (trainer state and all), or None.
    `base`: what a task loads when there is no checkpoint: the user's base model setting
    (a file, a folder, or a name to look up in the model folders); "" when the task trains from
    scratch. Both None/"" only for a from-scratch task starting fresh.
    """

    checkpoint: Optional[Path] = None
    base: str = ""

    @property
    def resumes(self) -> bool:
        return self.checkpoint is not None


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
    """Flush every file under `folder`, and the folders themselves, to disk."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for path in [*sorted(p for p in folder.rglob("*") if p.is_dir()), folder]:
        fsync_folder(path)


def save_tensors_atomically(path: Path, tensors: dict[str, Any]) -> Path:
    """torch.save a state_dict (e.g. runs/<run>/state.pth) complete or not at all."""
    import torch

    return write_file_atomically(path, lambda temp: torch.save(tensors, temp))


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """List every file under `folder` (relative POSIX path -> size, sha256) in `folder/manifest.json`."""
    files = {path.relative_to(folder).as_posix(): {"size": path.stat().st_size, "sha256": file_sha256(path)}
             for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=2), encoding="utf-8")
    return files


def read_manifest(folder: Path) -> Optional[dict[str, dict[str, Any]]]:
    """The manifest's file table, or None when it is missing or unreadable."""
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = data["files"]
        if not isinstance(files, dict) or not all(isinstance(entry, dict) and isinstance(entry.get("size"), int)
                                                  and isinstance(entry.get("sha256"), str)
                                                  for entry in files.values()):
            return None
        return files
    except (OSError, ValueError, KeyError, TypeError):
        return None


def why_incomplete(folder: Path, check_hashes: bool = False) -> Optional[str]:
    """None for a complete checkpoint folder, else the reason it is not one (for messages)."""
    if folder.name.startswith(TEMP_PREFIX):
        return "a temporary folder left by a save that was interrupted (safe to delete unless a run is saving now)"
    files = read_manifest(folder)
    if files is None:
        return f"no readable {MANIFEST} (the save did not finish, or the folder was copied in part)"
    for required in (STATE_JSON, STATE_TENSORS):
        if required not in files:
            return f"{MANIFEST} does not list {required}"
    for name, entry in files.items():
        path = folder / name
        if ".." in Path(name).parts or not path.is_file():
            return f"'{name}' is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"'{name}' has {size} bytes, the manifest says {entry['size']} (truncated or changed)"
        if check_hashes and file_sha256(path) != entry["sha256"]:
            return f"'{name}' does not match its SHA-256 in {MANIFEST} (corrupted or changed)"
    return None


def is_checkpoint(folder: Path) -> bool:
    """True when `folder` holds a complete checkpoint (every file of its manifest, at its size)."""
    return folder.is_dir() and why_incomplete(folder) is None


def verify_checkpoint(folder: Path) -> None:
    """Raise ConfigError unless every file of `folder` matches its manifest, hashes included."""
    if (folder / MANIFEST).is_file() and _hashes_match(folder):
        return
    reason = why_incomplete(folder, check_hashes=True) or "it changed while being checked"
    if reason is not None:
        raise ConfigError(f"checkpoint '{folder}' is incomplete or damaged: {reason}. Resume from "
                          "another checkpoint, or use 'findlast' to pick the newest complete one.")


def _newest_complete_sibling(ckpts_dir: Path) -> Optional[Path]:
    candidates = [folder for folder in ckpts_dir.iterdir() if is_checkpoint(folder)] if ckpts_dir.is_dir() else []
    return max(candidates, key=lambda folder: (read_progress(folder).global_step, folder.stat().st_mtime),
               default=None)


def save_checkpoint(ckpts_dir: Path, name: str, progress: Progress, tensors: dict[str, Any],
                    write_model: Callable[[Path], None], config: dict[str, Any]) -> Path:
    """Write a complete checkpoint folder atomically and return its path.

    `write_model(folder)` writes the task's model files into the (temporary) folder.
    An existing checkpoint of the same name is kept, never overwritten. A failed write (a full
    disk) leaves no trace and raises ConfigError naming the newest checkpoint that is still intact.
    """
    import torch

    final = ckpts_dir / name
    if final.exists():
        return final
    temp = ckpts_dir / f"{TEMP_PREFIX}{name}-{os.getpid()}"
    try:
        ckpts_dir.mkdir(parents=True, exist_ok=True)
        if temp.exists():
            shutil.rmtree(temp)
        temp.mkdir()
        write_model(temp)
        torch.save(tensors, temp / STATE_TENSORS)
        (temp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
        (temp / STATE_JSON).write_text(json.dumps(asdict(progress), indent=2), encoding="utf-8")
        fsync_tree(temp)
        # Last, after everything it vouches for is on disk.
        write_manifest(temp)
        fsync_tree(temp)
        os.replace(temp, final)
        fsync_folder(ckpts_dir)
    except OSError as error:
        shutil.rmtree(temp, ignore_errors=True)
        previous = _newest_complete_sibling(ckpts_dir)
        kept = f"the newest complete checkpoint '{previous}' is intact" if previous else \
            "no earlier checkpoint of this run exists"
        hint = "free some disk space or set logdir to another disk" if error.errno in (errno.ENOSPC, errno.EDQUOT) \
            else "check that logdir is writable"
        raise ConfigError(f"could not write checkpoint '{final}': {error.strerror or error}; {kept}. "
                          f"{hint.capitalize()}, then continue with --resume_ckpt findlast.") from None
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return final


def read_progress(folder: Path) -> Progress:
    try:
        data = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
        return Progress(**data)
    except (OSError, ValueError, TypeError) as error:
        raise ConfigError(f"checkpoint '{folder}' has an unreadable {STATE_JSON} ({error}); "
                          "pick another checkpoint.") from None


def load_trainer_tensors(folder: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """trainer_state.pt of a checkpoint; anything but tensors and plain data is refused."""
    import pickle

    import torch

    # weights_only: a checkpoint folder may come from anywhere; it must never run code.
    try:
        state = torch.load(folder / STATE_TENSORS, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"checkpoint '{folder}': {STATE_TENSORS} was refused or cannot be read "
                          f"({first_line}); only tensors and plain data are loaded, never code. "
                          "Resume from a checkpoint this program wrote.") from None
    if not isinstance(state, dict) or not {"scheduler", "generator", "cpu_rng"} <= set(state) or \
            not {OPTIMIZER, OPTIMIZER_BY_NAME, OPTIMIZER_ELSEWHERE} & set(state):
        raise ConfigError(f"checkpoint '{folder}': {STATE_TENSORS} lacks the optimizer, schedule or RNG "
                          "state; it was not written by this program.")
    return state


def find_last(logdir: Path, project: str, *, verify: bool = False) -> tuple[Optional[Path], list[Path]]:
    """The complete checkpoint with the most optimizer steps under logdir/<project>*/ckpts/.

    Returns (checkpoint or None, incomplete folders that were skipped; `why_incomplete` says why).
    With `verify`, the winner's hashes are checked too, and a damaged one is skipped in favour of
    the next newest.
    """
    candidates: list[tuple[int, float, Path]] = []
    skipped: list[Path] = []
    for ckpts in sorted(logdir.glob(f"{glob.escape(project)}*/ckpts")):
        for folder in sorted(ckpts.iterdir()):
            if not folder.is_dir() or _is_model_beside_checkpoints(folder):
                continue
            if not is_checkpoint(folder):
                skipped.append(folder)
                continue
            try:
                progress = read_progress(folder)
            except ConfigError:
                skipped.append(folder)
                continue
            if progress.project_name and progress.project_name != project:
                continue
            candidates.append((progress.global_step, folder.stat().st_mtime, folder))
    for _, _, folder in sorted(candidates, key=lambda entry: entry[:2], reverse=True):
        if not verify or _hashes_match(folder):
            return folder, skipped
        skipped.append(folder)
    return None, skipped


def _is_model_beside_checkpoints(folder: Path) -> bool:
    """A model folder, not a checkpoint: EveryDream2's saves (a diffusers folder) and the EMA exports
    (`<checkpoint>_ema`) live in ckpts/ too; a half-written checkpoint still counts as one."""
    return not looks_like_checkpoint(folder) and (folder.name.endswith("_ema") or
                                                  (folder / "model_index.json").is_file())


def find_last_everydream2(logdir: Path, project: str, ema: bool = False) -> Optional[Path]:
    """The newest model EveryDream2 saved for `project`: a diffusers folder (model_index.json)
    under logdir/<project>-<timestamp>/ckpts/, or None. With `ema`, the newest `<name>_ema` copy
    instead (EveryDream2's and ours: the EMA exports beside our checkpoints).

    EveryDream2 keeps no trainer state, so a run continues from such a folder as from weights.
    Like EveryDream2's own findlast, the newest by time wins; an `errored-` save (written after a
    crash) is passed over here, where EveryDream2 would stop.
    """
    found: list[tuple[float, Path]] = []
    for ckpts in sorted(logdir.glob(f"{glob.escape(project)}*/ckpts")):
        for folder in sorted(ckpts.iterdir()):
            index = folder / "model_index.json"
            if (not index.is_file() or looks_like_checkpoint(folder) or folder.name.endswith("_ema") != ema
                    or folder.name.startswith("errored-")):
                continue
            found.append((index.stat().st_mtime, folder))
    return max(found, key=lambda entry: entry[0])[1] if found else None


_VERIFIED: dict[tuple[str, int], bool] = {}


def _hashes_match(folder: Path) -> bool:
    # A run resolves its start once, but one process may run several (Difference's two passes,
    # tests): hash gigabytes only once per folder version.
    key = (str(folder.resolve()), (folder / MANIFEST).stat().st_mtime_ns)
    if key not in _VERIFIED:
        _VERIFIED[key] = why_incomplete(folder, check_hashes=True) is None
    return _VERIFIED[key]


FINAL_PREFIX = "last-"  # the checkpoint folder written when a run completes


def looks_like_checkpoint(folder: Path) -> bool:
    """A folder meant as a checkpoint (complete or not), as opposed to a base model folder."""
    return folder.is_dir() and (folder.name.startswith(TEMP_PREFIX) or any(
        (folder / name).exists() for name in (STATE_JSON, STATE_TENSORS, MANIFEST)))


def resolve_resume(resume_ckpt: str, logdir: Path, project: str, log: Callable[[str], None]) -> Optional[Path]:
    """The checkpoint folder `resume_ckpt` names, or None when it names a base model instead.

    'findlast' picks the newest complete checkpoint of `project` and logs every folder it skipped
    and why; a named folder must be complete (hashes checked) or it is a ConfigError.
    """
    if resume_ckpt == "findlast":
        found, skipped = find_last(logdir, project, verify=True)
        for folder in skipped:
            reason = why_incomplete(folder, check_hashes=True) or "unreadable trainer_state.json"
            log(f"findlast: skipped incomplete checkpoint '{folder}': {reason}.")
        if found is None:
            raise ConfigError(f"resume_ckpt 'findlast': no complete checkpoint of project "
                              f"'{project}' under '{logdir}'. Train once first (without --resume_ckpt "
                              "findlast), or name a checkpoint folder or a model.")
        return found
    candidate = Path(resume_ckpt.replace("\\", os.sep) if os.sep == "/" else resume_ckpt)
    if looks_like_checkpoint(candidate):
        verify_checkpoint(candidate)
        return candidate
    return None


def resolve_start(config: Any, from_scratch: bool, log: Callable[[str], None]) -> StartPoint:
    """Where a run's weights come from: the checkpoint `config.resume_ckpt` names (or 'findlast'
    finds), else the base model it names. Called once, on the main process (difftrain.trainer).

    `from_scratch`: the task builds its network from nothing, so resume_ckpt left at its default
    (or empty) means a fresh start, and anything else must be a checkpoint.
    """
    from difftrain.config import Config

    name = config.resume_ckpt
    if from_scratch and name in ("", Config.model_fields["resume_ckpt"].default):
        return StartPoint()
    if name == "findlast" and not from_scratch:
        theirs = _everydream2_if_newer(Path(config.logdir), config.project_name)
        if theirs is not None:
            log(f"findlast: '{theirs}' is the newest save, made by EveryDream2, which keeps no trainer "
                "state; this run starts from its weights.")
            return StartPoint(base=str(theirs))
    found = resolve_resume(name, Path(config.logdir), config.project_name, log)
    if found is not None and found.name.startswith(FINAL_PREFIX) and (found / "unet").is_dir():
        # A finished full fine-tune has nothing left to continue: like EveryDream2's resume_ckpt
        # (and chain.bat's findlast), a new run starts from its weights, a complete diffusers folder.
        log(f"note: '{found}' is the final checkpoint of a finished run; starting a new run from its "
            "weights (name one of its earlier checkpoints to continue that run instead).")
        return StartPoint(base=str(found))
    if found is not None:
        return StartPoint(checkpoint=found)
    if from_scratch:
        raise ConfigError(f"resume_ckpt '{name}' is not a checkpoint folder (it has no "
                          "trainer_state.json). Point it at logs/<run>/ckpts/<folder> or use 'findlast'.")
    return StartPoint(base=name)


def _everydream2_if_newer(logdir: Path, project: str) -> Optional[Path]:
    """EveryDream2's newest save of `project` when no checkpoint of ours is newer, else None."""
    theirs = find_last_everydream2(logdir, project)
    if theirs is None:
        return None
    ours, _ = find_last(logdir, project)
    if ours is not None and (ours / STATE_JSON).stat().st_mtime >= (theirs / "model_index.json").stat().st_mtime:
        return None
    return theirs


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
