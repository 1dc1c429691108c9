"""What TrainTrain modes leave beside their LoRA: per-step mode fields in metrics.jsonl, a CSV log."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Callable

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
    staging = metrics_path.with_name(f".{metrics_path.name}.{os.getpid()}")
    staging.write_text("".join(json.dumps(event) + "\n" for event in events), encoding="utf-8")
    os.replace(staging, metrics_path)


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
