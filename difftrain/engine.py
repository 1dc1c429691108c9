"""The one engine behind both front doors: pick the task for a Config and run the trainer."""

from __future__ import annotations

import functools
import os
from typing import Any

from difftrain.config import Config
from difftrain.errors import ConfigError
from difftrain.log import say
from difftrain.registry import MODE_NAMES, MODES, load
from difftrain.trainer import Trainer, TrainingStopped, decide_start

TRAINING_FAILED_EXIT_CODE = 1

# What the libraries print by default (transformers' notes about optional backends, the progress bar
# of every save_pretrained) buries our own progress bar and messages. Errors still show, and a user
# who wants the chatter back sets these variables before starting.
QUIET_LIBRARY_ENVIRONMENT = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def quiet_library_logs() -> None:
    """Apply QUIET_LIBRARY_ENVIRONMENT where the user has not chosen; read when the libraries load."""
    for name, value in QUIET_LIBRARY_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


def task_factory(config: Config):
    """The factory of the task that owns the model, data and loss of `config.task` / `config.mode`
    (for a multi-run mode, the task of each of its runs; see mode_runner)."""
    if config.task == "kolmogorov":
        from difftrain.tasks.kolmogorov import KolmogorovTask

        return KolmogorovTask
    mode = MODES.get(config.mode) if config.task == "sd" else None
    if mode is None:
        raise ConfigError(f"task '{config.task}' with mode '{config.mode}' is not available; 'kolmogorov', and 'sd' "
                          f"with mode {', '.join(MODE_NAMES[:-1])} or {MODE_NAMES[-1]} are "
                          "(see configs/quickstart.json, configs/sd15_finetune.json, configs/LoRA_SD15.json).")
    return load(mode.task)


def mode_runner(config: Config):
    """runner(config, start, train_once) of a mode that runs the trainer several times itself (the
    registry declares it), else None."""
    mode = MODES.get(config.mode) if config.task == "sd" else None
    return load(mode.runner) if mode is not None and mode.runner else None


def train_once(config: Config, factory, start, program: str = "difftrain") -> tuple[int, Any]:
    """One trainer run of `factory`'s task from `start`: (exit code, the task it trained). Multi-run
    modes get this instead of importing the trainer (they sit below it)."""
    trainer = Trainer(config, factory, program=program, start=start)
    return trainer.run(), trainer.task


def run(config: Config, program: str = "difftrain") -> int:
    """Train `config` to the end; returns the exit code for the front door."""
    quiet_library_logs()
    factory = task_factory(config)
    runner = mode_runner(config)
    try:
        if runner is not None:
            return runner(config, decide_start(config, factory), functools.partial(train_once, program=program))
        return Trainer(config, factory, program=program).run()
    except TrainingStopped as stop:
        say(f"{program}: training stopped: {stop}")
        return TRAINING_FAILED_EXIT_CODE
