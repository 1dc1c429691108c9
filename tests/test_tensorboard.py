"""With wandb off (EveryDream2's default), metrics also go to TensorBoard event files in the log
folder under EveryDream2's tags; metrics.jsonl in the run folder stays as it is."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from PIL import Image

from difftrain.tracking import Tracker


def read_events(folder: Path) -> list:
    """Every Event record of the event files in `folder` (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            record = data[offset + 12:offset + 12 + length]
            offset += 12 + length + 4
            event = Event()
            event.ParseFromString(record)
            events.append(event)
    return events


def make_tracker(tmp_path: Path, use_wandb: bool) -> Tracker:
    run_dir, log_folder = tmp_path / "run", tmp_path / "logs" / "proj-20260101-000000"
    run_dir.mkdir()
    log_folder.mkdir(parents=True)
    return Tracker(run_dir, run_name="r", run_id="x", project="proj", config={"lr": 0.5},
                   use_wandb=use_wandb, wandb_mode="disabled", log_folder=log_folder)


def test_metrics_go_to_event_files_under_everydream2s_tags(tmp_path):
    tracker = make_tracker(tmp_path, use_wandb=False)
    tracker.log({"epoch": 0, "loss_train": 0.25, "lr": 1e-4}, step=1)
    tracker.log({"epoch": 1, "loss_valid": 0.5, "straightness": 0.125}, step=2)
    tracker.log({}, step=2, images={"samples": [Image.new("RGB", (8, 4), (255, 0, 0))]})
    tracker.close()

    events = read_events(tmp_path / "logs" / "proj-20260101-000000")
    scalars = {(value.tag, event.step): value.simple_value
               for event in events for value in event.summary.value if value.HasField("simple_value")}
    # float32 in the file, as in EveryDream2's
    assert scalars == pytest.approx({("loss/log_step", 1): 0.25, ("hyperparameter/lr unet", 1): 1e-4,
                                     ("loss/val", 2): 0.5, ("difftrain/straightness", 2): 0.125})
    images = [(value.tag, value.image.width, value.image.height)
              for event in events for value in event.summary.value if value.HasField("image")]
    assert images == [("sample_000", 8, 4)]
    # metrics.jsonl is unchanged by it.
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"step": 1, "epoch": 0, "loss_train": 0.25, "lr": 1e-4}


def test_no_event_files_without_a_log_folder(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracker = Tracker(run_dir, run_name="r", run_id="x", project="p", config={}, use_wandb=False,
                      wandb_mode="disabled")
    tracker.log({"loss_train": 1.0}, step=1)
    tracker.close()
    assert not list(tmp_path.rglob("events.out.tfevents.*"))
