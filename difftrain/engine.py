"""The one engine behind both front doors: pick the task for a Config and run the trainer."""

from __future__ import annotations

import os

from difftrain.config import Config
from difftrain.errors import ConfigError
from difftrain.log import say
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
    """The class that owns the model, data and loss of `config.task` / `config.mode`."""
    if config.task == "kolmogorov":
        from difftrain.tasks.kolmogorov import KolmogorovTask

        return KolmogorovTask
    if config.task == "sd" and config.mode in ("Full", "LoRA"):
        from difftrain.tasks.sd import SDTask

        return SDTask
    if config.task == "sd":
        from difftrain.modes import mode_factory

        factory = mode_factory(config.mode)
        if factory is not None:
            return factory
    raise ConfigError(f"task '{config.task}' with mode '{config.mode}' is not available; 'kolmogorov', and 'sd' "
                      "with mode Full, LoRA, ADDifT, Multi-ADDifT, Difference or iLECO are "
                      "(see configs/quickstart.json, configs/sd15_finetune.json, configs/LoRA_SD15.json).")


def run(config: Config, program: str = "difftrain") -> int:
    """Train `config` to the end; returns the exit code for the front door."""
    quiet_library_logs()
    factory = task_factory(config)
    # A mode made of several trainer runs (Difference: copier pass, then difference pass) runs them
    # itself; every other factory builds the one task a Trainer drives.
    mode_runner = getattr(factory, "run_mode", None)
    try:
        if mode_runner is not None:
            return mode_runner(config, decide_start(config, factory), program=program)
        return Trainer(config, factory, program=program).run()
    except TrainingStopped as stop:
        say(f"{program}: training stopped: {stop}")
        return TRAINING_FAILED_EXIT_CODE
