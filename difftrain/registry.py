"""Every training mode of the 'sd' task, written once: its name and where its code lives.

The schema's allowed `mode` values (difftrain.config), the engine's choice of task and its error
message all come from MODES. Code is named by import path, not imported, so this module (and the
config that reads it) stays free of torch; `load` imports it when a run starts.

A mode is trained either by one trainer run of its `task` (a factory: task(config, accelerator,
start)), or, when it declares a `runner`, by that function, which runs the trainer several times
itself (Difference: the copier pass, then the difference pass).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class Mode:
    name: str
    task: str  # "module:attribute" of the task factory (for a multi-run mode: the task of each run)
    runner: Optional[str] = None  # "module:attribute" of runner(config, start, train_once) -> exit code
    summary: str = ""


MODES: dict[str, Mode] = {mode.name: mode for mode in (
    Mode("Full", "difftrain.tasks.sd:SDTask", summary="the whole UNet (EveryDream2)"),
    Mode("LoRA", "difftrain.tasks.sd:SDTask", summary="LoRA adapters on a folder of captioned images"),
    Mode("iLECO", "difftrain.modes.ileco:ILECOTask", summary="a concept moved or erased, from prompts only"),
    Mode("Difference", "difftrain.modes.difference:DifferencePassTask",
         runner="difftrain.modes.difference:run_difference", summary="copier pass, then difference pass"),
    Mode("ADDifT", "difftrain.modes.addift:ADDifTTask", summary="the difference of one image pair"),
    Mode("Multi-ADDifT", "difftrain.modes.addift:ADDifTTask", summary="the difference of a folder of pairs"),
)}
MODE_NAMES: tuple[str, ...] = tuple(MODES)


def modes_of(task: str) -> tuple[str, ...]:
    """The modes whose task is `task` ("module:attribute")."""
    return tuple(name for name, mode in MODES.items() if mode.task == task)


def load(path: str) -> Any:
    """The object a "module:attribute" path names (imported now)."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


__all__ = ["MODES", "MODE_NAMES", "Mode", "load", "modes_of"]
