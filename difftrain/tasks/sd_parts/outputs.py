"""What a LoRA run leaves for the user (the Exports part): the LoRA file at the end and every
save_per_steps steps, its settings JSON, a CSV log, and per-step mode fields in metrics.jsonl."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable, Optional

from torch import nn

from difftrain.checkpoint import write_file_atomically
from difftrain.config import Config
from difftrain.errors import ConfigError
from difftrain.log import say
from difftrain.tasks.sd_parts.trainable import DTYPES, LoraTrainable

CSV_FIRST_COLUMNS = ("step", "epoch", "loss_train", "lr")


def _read_events(metrics_path: Path) -> list[dict[str, Any]]:
    if not metrics_path.is_file():
        return []
    return [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]


def add_step_fields(metrics_path: Path, fields_of_step: Callable[[int], dict[str, Any]]) -> None:
    """Add `fields_of_step(step)` to every training-step event of a finished run's metrics.jsonl.

    The loop logs epoch, loss_train and lr; a mode's own per-step facts (ADDifT's direction and
    multiplier, Difference's pass) are known to the mode, which writes them in once the run is
    over. Fields the loop already logged are left as they are. The file is replaced atomically.
    """
    events = _read_events(metrics_path)
    changed = False
    for event in events:
        if "loss_train" not in event:
            continue
        for key, value in fields_of_step(int(event["step"])).items():
            if key not in event:
                event[key] = value
                changed = True
    if not changed:
        return
    text = "".join(json.dumps(event) + "\n" for event in events)
    write_file_atomically(metrics_path, lambda temp: temp.write_text(text, encoding="utf-8"))


def write_metrics_csv(metrics_path: Path, csv_path: Path) -> Path:
    """TrainTrain's logging_save_csv: one row per training step (step, epoch, loss_train, lr, and
    any mode fields), read from the run's metrics.jsonl."""
    rows = [event for event in _read_events(metrics_path) if "loss_train" in event]
    extra = sorted({key for row in rows for key in row} - set(CSV_FIRST_COLUMNS))
    columns = [*CSV_FIRST_COLUMNS, *extra]
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return csv_path


def no_step_fields(global_step: int) -> dict[str, Any]:
    return {}


def output_folder(config: Config) -> Optional[Path]:
    """Where the finished LoRA goes: lora_dir, else <models_dir>/lora; None means the run's log folder."""
    folder = config.lora_dir or (str(Path(config.models_dir) / "lora") if config.models_dir else "")
    return Path(folder) if folder else None


def output_stem(config: Config, log_folder: Optional[Path] = None) -> str:
    """save_lora_name; empty: the run name, else the log folder's name (unique per run, so
    repeated runs of one preset, e.g. a learning-rate sweep, never collide)."""
    return config.save_lora_name or config.run_name or (log_folder.name if log_folder else config.project_name)


class LoraExports:
    """The user-facing LoRA files of a run (see the module docstring).

    `step_fields(global_step)`: a mode's own facts about each logged step (ADDifT's direction,
    Difference's pass), written into metrics.jsonl when the run is over.
    """

    def __init__(self, config: Config, trainable: LoraTrainable, resuming: bool,
                 step_fields: Callable[[int], dict[str, Any]] = no_step_fields):
        self.config, self.trainable, self.step_fields = config, trainable, step_fields
        self.folder = output_folder(config)
        if self.folder is not None and (config.save_lora_name or config.run_name):
            path = self.folder / f"{self.output_stem()}.safetensors"
            # A resumed run may meet its own earlier output; the write then picks a free name instead.
            if path.exists() and not config.save_overwrite and not resuming:
                raise ConfigError(f"LoRA file {path} already exists; set save_overwrite true to replace it, or "
                                  "choose another save_lora_name.")

    def output_stem(self, log_folder: Optional[Path] = None) -> str:
        return output_stem(self.config, log_folder)

    def write_lora_file(self, model: nn.Module, stem: str, log_folder: Optional[Path]) -> Path:
        """Export the trained LoRA as <lora dir>/<stem>.safetensors in save_precision.

        The folder is lora_dir, else <models_dir>/lora, else the run's log folder. An existing file
        is replaced only with save_overwrite; otherwise ours goes beside it as <stem>_1 (and so on).
        """
        config = self.config
        folder = self.folder or log_folder or Path(config.logdir)
        path = folder / f"{stem}.safetensors"
        if path.exists() and not config.save_overwrite:
            base, number = path.stem, 1
            while path.exists():
                path = path.with_name(f"{base}_{number}.safetensors")
                number += 1
            say(f"note: {folder / (stem + '.safetensors')} already exists; writing {path} instead "
                "(save_overwrite is off).")
        return self.trainable.save(model, path, path.stem, dtype=DTYPES[config.save_precision],
                                   overwrite=config.save_overwrite, strength=config.network_strength)

    def exports_at(self, global_step: int) -> bool:
        """TrainTrain's save_per_steps: every N steps, not at the last (finish writes that one)."""
        every = self.config.save_per_steps
        return bool(every and not global_step % every and not global_step >= self.config.max_steps > 0)

    def after_step(self, model: nn.Module, global_step: int, log_folder: Optional[Path]) -> None:
        """<name>_<N>steps.safetensors at the steps exports_at names."""
        path = self.write_lora_file(model, f"{self.output_stem(log_folder)}_{global_step}steps", log_folder)
        say(f"LoRA at step {global_step}: {path}")

    def add_step_fields(self, run_dir: Optional[Path]) -> None:
        if run_dir is not None:
            add_step_fields(run_dir / "metrics.jsonl", self.step_fields)

    def finish(self, model: nn.Module, log_folder: Optional[Path], run_dir: Optional[Path]) -> None:
        """After a completed run: the user-facing LoRA, its settings JSON, the CSV log."""
        self.add_step_fields(run_dir)
        path = self.write_lora_file(model, self.output_stem(log_folder), log_folder)
        config = self.config
        if config.save_as_json:  # in TrainTrain's keys, so TrainTrain loads it back as a preset
            from difftrain.vocab.traintrain_export import traintrain_settings

            path.with_suffix(".json").write_text(json.dumps(traintrain_settings(config), indent=4), encoding="utf-8")
        if config.logging_save_csv and run_dir is not None:
            write_metrics_csv(run_dir / "metrics.jsonl", path.with_suffix(".csv"))
        say(f"LoRA: {path}")


__all__ = ["LoraExports", "add_step_fields", "no_step_fields", "output_folder", "output_stem", "write_metrics_csv"]
