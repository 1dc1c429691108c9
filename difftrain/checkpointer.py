"""Saving and resuming a running training: what goes into a checkpoint, and when a timed one is due.

The folder format (complete or absent, manifest, findlast) is difftrain.checkpoint's; this module
fills it from the live training objects, with every process taking part: under sharding, the
optimizer state and the whole model are collectives, and each process's random streams are kept
so that a resumed multi-process run draws exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from difftrain.checkpoint import Progress, checkpoint_name, load_trainer_tensors, read_progress, save_checkpoint
from difftrain.errors import ConfigError
from difftrain.exports import export_beside_checkpoint
from difftrain.log import say
from difftrain.processes import decide_on_main
from difftrain.sharding import place_staged_files

# EveryDream2: with no save interval at all, save every 20 minutes.
DEFAULT_MINUTES_WITHOUT_INTERVAL = 20.0
# Settings whose change since the checkpoint makes the data order after resume differ.
DATA_ORDER_SETTINGS = ("batch_size", "gradient_accumulation_steps", "data_root", "seed")


@dataclass(frozen=True)
class Training:
    """The objects a checkpoint holds the state of (model and optimizer as accelerate prepared them)."""

    model: nn.Module
    optimizer: Any
    scheduler: Any
    generator: torch.Generator
    ema: Optional[Any] = None  # difftrain.ema.WeightAverage, on the main process of a run with EMA


class Checkpointer:
    """Checkpoints of one run: `save` (every process calls it), `resume`, and the time-based interval.

    `last_checkpoint`: the newest complete checkpoint of the run (the resumed one before any save),
    named when the run has to stop on a NaN.
    """

    def __init__(self, config: Any, accelerator: Any, states: Any, task: Any, training: Training,
                 resumed: Optional[Path]) -> None:
        self.config, self.accelerator, self.states, self.task = config, accelerator, states, task
        self.model, self.optimizer = training.model, training.optimizer
        self.scheduler, self.generator, self.ema = training.scheduler, training.generator, training.ema
        self.ckpts_dir: Optional[Path] = None  # set by `write_into`; stays None where nothing is written
        self.main_log_folder: Optional[Path] = None
        self.outputs: Optional[Any] = None  # difftrain.tracking.RunOutputs, set by `write_into`
        self.last_checkpoint: Optional[Path] = resumed
        no_interval = not (config.save_every_n_epochs or config.ckpt_every_n_steps)
        self.minutes = config.ckpt_every_n_minutes or (DEFAULT_MINUTES_WITHOUT_INTERVAL if no_interval else 0.0)
        self.last_save = time.monotonic()

    def write_into(self, outputs: Any) -> None:
        """Checkpoints go to <log folder>/ckpts (the main process's; None on the others), and each
        one redraws the run's curves (`outputs`: difftrain.tracking.RunOutputs)."""
        self.outputs = outputs
        self.ckpts_dir = outputs.log_folder / "ckpts" if outputs.log_folder else None
        self.main_log_folder = outputs.main_log_folder
        self.last_save = time.monotonic()  # the interval counts from the start of training

    def due_by_clock(self) -> bool:
        """This process's clock says a timed checkpoint is due (the processes then agree on it)."""
        return bool(self.minutes) and time.monotonic() - self.last_save >= self.minutes * 60

    def due_at_step(self, global_step: int) -> bool:
        every = self.config.ckpt_every_n_steps
        return bool(every) and global_step % every == 0

    def due_at_epoch(self, epoch: int) -> bool:
        every = self.config.save_every_n_epochs
        return bool(every) and epoch % every == 0 and epoch >= self.config.save_ckpts_from_n_epochs

    def save(self, progress: Progress, prefix: str = "") -> Optional[Path]:
        """Write a checkpoint of the run at `progress`; its folder on the main process, else None."""
        from accelerate.utils import gather_object

        accelerator, states, model = self.accelerator, self.states, self.model
        accelerator.wait_for_everyone()
        self.last_save = time.monotonic()
        streams = gather_object([(self.generator.get_state(), torch.get_rng_state())])
        progress.extra["world_size"] = accelerator.num_processes
        saved = None
        name = checkpoint_name(self.config.project_name, progress, prefix)
        optimizer_state = states.optimizer_state(model, self.optimizer)  # collective under FSDP
        # DeepSpeed's files, one part per process, wait beside the checkpoint until it takes them in.
        staged = states.stage_files(model, Path(self.main_log_folder) / "ckpts" / f".tmp-{name}-parts")
        with states.whole_model(model) as whole:
            if accelerator.is_main_process and self.ckpts_dir is not None:
                def write_model(folder: Path) -> None:
                    self.task.write_model(whole, folder)
                    place_staged_files(staged, folder)
                    if self.ema is not None:
                        self.ema.save(folder)

                state = {**optimizer_state, **self._loop_state(streams)}
                saved = self.last_checkpoint = save_checkpoint(self.ckpts_dir, name, progress, state, write_model,
                                                               self.config.model_dump(mode="json"))
                if staged is not None:
                    shutil.rmtree(staged, ignore_errors=True)  # a checkpoint of that name existed
                export_beside_checkpoint(self.config, saved, self.ema, self.task.write_model)
        # Nobody moves on before the checkpoint is complete: after an interrupt a process that
        # exits first makes torchrun stop the others, the main one in the middle of writing.
        accelerator.wait_for_everyone()
        # After the barrier: the checkpoint is whole whatever drawing does. A run's last checkpoint
        # (last-, interrupted-) leaves the drawing to RunOutputs.close, which follows it.
        if saved is not None and self.outputs is not None and not prefix:
            self.outputs.draw_curves()
        return saved

    def _loop_state(self, streams: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
        state = {"scheduler": self.scheduler.state_dict(),
                 "generator": self.generator.get_state(), "cpu_rng": torch.get_rng_state(),
                 "generator_per_rank": [stream[0] for stream in streams],
                 "cpu_rng_per_rank": [stream[1] for stream in streams]}
        if self.accelerator.scaler is not None:
            state["scaler"] = self.accelerator.scaler.state_dict()
        return state

    # ---- resume ---------------------------------------------------------------------------------
    def resume(self, folder: Path) -> Progress:
        """Put the run back where checkpoint `folder` left it: weights, optimizer, schedule, random
        streams; returns its progress. Every process calls it."""
        progress = read_progress(folder)
        self._check_compatible(folder, progress)
        state = load_trainer_tensors(folder)
        self.states.load(self.model, self.optimizer, folder, state, lambda module: self._read_model(module, folder),
                         lambda decide: decide_on_main(self.accelerator, decide))
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load(folder)
        self._restore_random_streams(state, progress)
        if "scaler" in state and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        if self.accelerator.is_main_process:
            say(f"resumed from '{folder}' at epoch {progress.epoch}, step {progress.global_step}.")
        return progress

    def _check_compatible(self, folder: Path, progress: Progress) -> None:
        config = self.config
        if progress.task and progress.task != config.task:
            raise ConfigError(f"checkpoint '{folder}' was made by a '{progress.task}' run; this config "
                              f"trains '{config.task}'. Pick a checkpoint of this task.")
        if progress.project_name and progress.project_name != config.project_name:
            say(f"note: resuming a checkpoint of project '{progress.project_name}' in project "
                f"'{config.project_name}'.")
        saved_config = folder / "config.json"
        if saved_config.is_file():
            before = json.loads(saved_config.read_text(encoding="utf-8"))
            for key in DATA_ORDER_SETTINGS:
                if key in before and before[key] != getattr(config, key):
                    say(f"warning: {key} changed from {before[key]!r} to {getattr(config, key)!r} "
                        "since the checkpoint; the data order after resume cannot match the "
                        "original run exactly.")

    def _read_model(self, module: nn.Module, folder: Path) -> None:
        try:
            self.task.load_model(module, folder)
        except RuntimeError as error:  # load_state_dict: missing/unexpected keys, shape mismatches
            detail = " ".join(str(error).split())
            detail = detail if len(detail) <= 300 else detail[:300] + " ..."
            raise ConfigError(
                f"checkpoint '{folder}' does not fit the network this config builds ({detail}). Resume "
                f"with the settings it was trained with (its config.json, e.g. "
                f"'python train.py --config {folder / 'config.json'} --resume_ckpt {folder}'), or start a "
                "new run without resume_ckpt.") from None

    def _restore_random_streams(self, state: dict[str, Any], progress: Progress) -> None:
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        per_rank = state.get("generator_per_rank")
        if per_rank is not None and len(per_rank) == world:
            self.generator.set_state(per_rank[rank])
            torch.set_rng_state(state["cpu_rng_per_rank"][rank])
        else:
            self.generator.set_state(state["generator"])
            torch.set_rng_state(state["cpu_rng"])
        saved_world = progress.extra.get("world_size", 1)
        if saved_world != world and self.accelerator.is_main_process:
            say(f"warning: the checkpoint was saved by {saved_world} process(es), this run has "
                f"{world}; each process's share of the data and its noise differ, so the run "
                "cannot continue exactly as the original would have.")


__all__ = ["Checkpointer", "DEFAULT_MINUTES_WITHOUT_INTERVAL", "Training"]
