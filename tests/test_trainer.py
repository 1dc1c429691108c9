"""The training loop end to end on a tiny Kolmogorov task: outputs, exact resume, stops."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from difftrain.checkpoint import find_last, read_progress
from difftrain.config import validate_config_dict
from difftrain.engine import run

REPO = Path(__file__).resolve().parents[1]
TINY_SIMULATION = {"size": 16, "coarsen": 1, "trajectories": 10, "steps": 8, "keep": 6}


@pytest.fixture(scope="session")
def tiny_field_data(tmp_path_factory):
    from difftrain.data.kolmogorov import KolmogorovParams, ensure_dataset

    folder = tmp_path_factory.mktemp("kolmogorov")
    ensure_dataset(folder, KolmogorovParams(**TINY_SIMULATION), seed=0)
    return folder


def tiny_config(tmp_path: Path, data: Path, **changes):
    settings = {
        "task": "kolmogorov", "project_name": "tiny", "data_root": str(data),
        "simulation": TINY_SIMULATION, "window": 2, "embedding": 8, "hidden_channels": [4, 8],
        "hidden_blocks": [1, 1], "max_epochs": 3, "batch_size": 4, "lr": 1e-3,
        "lr_scheduler": "linear", "sample_steps": 0, "sample_inference_steps": 4,
        "tracker": "none", "logdir": str(tmp_path / "logs"), "runs_dir": str(tmp_path / "runs"),
        "ckpt_every_n_minutes": 0, "seed": 7,
    }
    settings.update(changes)
    return validate_config_dict(settings)


def only_run_folder(tmp_path: Path) -> Path:
    (folder,) = (tmp_path / "runs").iterdir()
    return folder


def test_a_run_writes_its_run_folder_and_log_folder(tmp_path, tiny_field_data):
    assert run(tiny_config(tmp_path, tiny_field_data, save_every_n_epochs=1)) == 0
    folder = only_run_folder(tmp_path)
    name, run_id = folder.name.rsplit("_", 1)
    assert len(run_id) == 8 and name.count("-") == 2 and name.endswith("-1")
    config = json.loads((folder / "config.json").read_text())
    assert config["task"] == "kolmogorov" and config["seed"] == 7
    state = torch.load(folder / "state.pth", weights_only=True)
    assert any(key.startswith("stem.") for key in state)
    events = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_train", "lr", "epoch"} <= set(events[0])
    assert sum("loss_valid" in event for event in events) == 3  # one per epoch
    assert list((folder / "samples").glob("*.png"))
    (log_folder,) = (tmp_path / "logs").iterdir()
    names = sorted(path.name for path in (log_folder / "ckpts").iterdir())
    # 8 training trajectories x 5 windows of 2 states = 40 items: 10 steps per epoch of 4.
    assert names == ["last-tiny-ep03-gs00030", "tiny-ep01-gs00010", "tiny-ep02-gs00020", "tiny-ep03-gs00030"]
    assert (log_folder / "settings.json").is_file()


def test_validations_per_epoch_spreads_loss_valid_over_the_epoch(tmp_path, tiny_field_data):
    # 10 optimizer steps per epoch in three parts: after steps 4 and 7, and at the epoch's end.
    assert run(tiny_config(tmp_path, tiny_field_data, max_epochs=2, validations_per_epoch=3)) == 0
    events = [json.loads(line) for line in (only_run_folder(tmp_path) / "metrics.jsonl").read_text().splitlines()]
    assert [event["step"] for event in events if "loss_valid" in event] == [4, 7, 10, 14, 17, 20]


def test_the_saved_config_reproduces_the_run_bitwise(tmp_path, tiny_field_data):
    assert run(tiny_config(tmp_path / "a", tiny_field_data)) == 0
    first = only_run_folder(tmp_path / "a")
    replay = validate_config_dict({**json.loads((first / "config.json").read_text()),
                                   "runs_dir": str(tmp_path / "b" / "runs"),
                                   "logdir": str(tmp_path / "b" / "logs")})
    assert run(replay) == 0
    second = only_run_folder(tmp_path / "b")
    a = torch.load(first / "state.pth", weights_only=True)
    b = torch.load(second / "state.pth", weights_only=True)
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_resume_mid_epoch_gives_bitwise_identical_weights(tmp_path, tiny_field_data):
    full = tiny_config(tmp_path / "full", tiny_field_data, ckpt_every_n_steps=3)
    assert run(full) == 0
    ckpts = next((tmp_path / "full" / "logs").iterdir()) / "ckpts"
    middle = ckpts / "tiny-ep00-gs00003"  # 10 batches per epoch: step 3 is inside epoch 0
    assert read_progress(middle).batch_in_epoch == 3
    resumed = tiny_config(tmp_path / "resumed", tiny_field_data, resume_ckpt=str(middle))
    assert run(resumed) == 0
    a = torch.load(only_run_folder(tmp_path / "full") / "state.pth", weights_only=True)
    b = torch.load(only_run_folder(tmp_path / "resumed") / "state.pth", weights_only=True)
    assert all(torch.equal(a[key], b[key]) for key in a)
    found, skipped = find_last(tmp_path / "full" / "logs", "tiny")
    assert found is not None and found.name.startswith("last-") and not skipped


def test_findlast_skips_incomplete_checkpoints(tmp_path, tiny_field_data):
    assert run(tiny_config(tmp_path, tiny_field_data, ckpt_every_n_steps=5)) == 0
    ckpts = next((tmp_path / "logs").iterdir()) / "ckpts"
    half_written = ckpts / "tiny-ep09-gs99999"
    half_written.mkdir()
    (half_written / "model.safetensors").write_bytes(b"partial")
    found, skipped = find_last(tmp_path / "logs", "tiny")
    assert found is not None and found != half_written and half_written in skipped


def test_nan_loss_stops_with_a_message_and_keeps_the_last_checkpoint(tmp_path, tiny_field_data, monkeypatch, capsys):
    from difftrain.tasks.kolmogorov import KolmogorovTask

    original = KolmogorovTask.loss
    calls = {"n": 0}

    def loss_that_breaks(self, model, batch, generator):
        calls["n"] += 1
        value = original(self, model, batch, generator)
        return value * float("nan") if calls["n"] == 8 else value

    monkeypatch.setattr(KolmogorovTask, "loss", loss_that_breaks)
    assert run(tiny_config(tmp_path, tiny_field_data, ckpt_every_n_steps=5)) == 1
    assert "loss became nan" in capsys.readouterr().err
    found, _ = find_last(tmp_path / "logs", "tiny")
    assert found is not None and found.name == "tiny-ep00-gs00005"


def test_ctrl_c_saves_an_interrupted_checkpoint_and_exits_130(tmp_path, tiny_field_data):
    config = tiny_config(tmp_path, tiny_field_data, max_epochs=100000).model_dump(mode="json")
    path = tmp_path / "long.json"
    path.write_text(json.dumps(config))
    process = subprocess.Popen([sys.executable, "train.py", str(path)], cwd=REPO,
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "runs").glob("*/metrics.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    found, _ = find_last(tmp_path / "logs", "tiny")
    assert found is not None and found.name.startswith("interrupted-tiny-")
    assert "--resume_ckpt" in stderr and "Traceback" not in stderr


def test_reflow_runs_every_stage_and_resumes_inside_a_reflow_iteration_exactly(tmp_path, tiny_field_data):
    settings = dict(rectified_flow=True, reflow_steps=2, reflow_gen_batches=3, max_epochs=2,
                    reflow_sample_steps=4, ckpt_every_n_steps=7)
    assert run(tiny_config(tmp_path / "full", tiny_field_data, **settings)) == 0
    log_folder = next((tmp_path / "full" / "logs").iterdir())
    pairs = sorted(path.name for path in (log_folder / "reflow").iterdir())
    assert pairs == ["reflow_stage_01", "reflow_stage_02"]
    events = [json.loads(line) for line in (only_run_folder(tmp_path / "full") / "metrics.jsonl").open()]
    measured = [event for event in events if "straightness" in event]
    assert [event["reflow_stage"] for event in measured] == [0, 1, 2]
    assert all(event["straightness"] >= 0 and event["one_vs_n_step_distance"] >= 0 for event in measured)
    # 20 steps of stage 0, then 3 per reflow epoch: step 21 is inside reflow iteration 1.
    inside = log_folder / "ckpts" / "tiny-ep02-gs00021"
    progress = read_progress(inside)
    assert (progress.stage, progress.batch_in_epoch) == (1, 1)
    shard = next((log_folder / "reflow" / "reflow_stage_01").glob("pairs-*.safetensors"))
    before = shard.stat().st_mtime_ns
    resumed = tiny_config(tmp_path / "resumed", tiny_field_data, resume_ckpt=str(inside), **settings)
    assert run(resumed) == 0
    assert shard.stat().st_mtime_ns == before  # the resumed run trained on the stored pairs
    a = torch.load(only_run_folder(tmp_path / "full") / "state.pth", weights_only=True)
    b = torch.load(only_run_folder(tmp_path / "resumed") / "state.pth", weights_only=True)
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_reflow_without_rectified_flow_is_refused(tmp_path, tiny_field_data):
    from difftrain.errors import ConfigError

    with pytest.raises(ConfigError, match="reflow_steps needs rectified_flow"):
        run(tiny_config(tmp_path, tiny_field_data, reflow_steps=1))


def test_wandb_offline_run_records_the_metrics(tmp_path, tiny_field_data):
    assert run(tiny_config(tmp_path, tiny_field_data, tracker="wandb", max_epochs=1)) == 0
    folder = only_run_folder(tmp_path)
    run_id = folder.name.rsplit("_", 1)[1]
    (offline,) = (folder / "wandb").glob(f"offline-run-*-{run_id}")
    assert list(offline.glob("*.wandb")) and (folder / "state.pth").is_file()


def test_the_loop_uses_only_the_parts_a_task_declares(tmp_path, tiny_field_data):
    """A task without samples or validation trains to the end (the loop never asks it for either);
    an exports part is asked at every step, handed the whole model where it says so, and
    finished once after the last checkpoint."""
    from difftrain.tasks.base import StartPoint, TaskDefaults, TaskParts
    from difftrain.tasks.kolmogorov import KolmogorovTask
    from difftrain.trainer import Trainer

    calls = []

    class EveryThirdStep:
        def exports_at(self, global_step):
            calls.append(("asked", global_step))
            return global_step % 3 == 0

        def after_step(self, model, global_step, log_folder):
            calls.append(("export", global_step, log_folder.is_dir()))

        def finish(self, model, log_folder, run_dir):
            calls.append(("finish", sorted(p.name for p in (log_folder / "ckpts").iterdir())[0]))

    class Bare(KolmogorovTask):
        defaults = TaskDefaults(from_scratch=True)

        def __init__(self, config, accelerator, start: StartPoint):
            super().__init__(config, accelerator, start)
            self.parts = TaskParts(exports=EveryThirdStep())

        def samples(self, model):
            raise AssertionError("samples of a task that has no samples part")

        def validation_loss(self, model):
            raise AssertionError("validation of a task that has no validation part")

    config = tiny_config(tmp_path, tiny_field_data, max_epochs=1, sample_steps=2)
    assert Trainer(config, Bare).run() == 0
    assert [call[1] for call in calls if call[0] == "asked"] == list(range(1, 11))
    assert [call[1:] for call in calls if call[0] == "export"] == [(3, True), (6, True), (9, True)]
    assert calls[-1] == ("finish", "last-tiny-ep01-gs00010")
    folder = only_run_folder(tmp_path)
    assert not (folder / "samples").exists()
    assert not any("loss_valid" in line for line in (folder / "metrics.jsonl").read_text().splitlines())


@pytest.mark.parametrize("steps, parts, expected", [(10, 3, {4, 7}), (100, 2, {50}), (2, 5, {1}), (10, 1, set())])
def test_mid_epoch_validation_points_split_the_epoch_evenly(steps, parts, expected):
    from difftrain.validation_points import mid_epoch_points

    assert mid_epoch_points(steps, parts) == expected


def test_validate_before_training_measures_the_starting_model_at_step_0(tmp_path, tiny_field_data):
    def validation_steps(folder: Path) -> list[int]:
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return [record["step"] for record in records if "loss_valid" in record]

    assert run(tiny_config(tmp_path / "plain", tiny_field_data, max_epochs=2)) == 0
    plain = validation_steps(only_run_folder(tmp_path / "plain"))
    assert run(tiny_config(tmp_path / "first", tiny_field_data, max_epochs=2, validate_before_training=True)) == 0
    first = validation_steps(only_run_folder(tmp_path / "first"))
    assert 0 not in plain and first == [0, *plain]


def test_sample_before_training_draws_the_starting_model_at_step_0(tmp_path, tiny_field_data):
    assert run(tiny_config(tmp_path, tiny_field_data, max_epochs=1, sample_before_training=True,
                           num_samples=1)) == 0
    names = sorted(path.name for path in (only_run_folder(tmp_path) / "samples").glob("samples-gs*.png"))
    assert names[0] == "samples-gs00000.png" and len(names) == 2  # step 0, then the end of the run


def test_samples_are_drawn_once_when_sample_steps_lands_on_the_last_step(tmp_path, tiny_field_data):
    """sample_steps=5 over 10 steps draws at steps 5 and 10; the end of the run draws no second set at 10."""
    from difftrain.tasks.kolmogorov import KolmogorovTask
    from difftrain.trainer import Trainer

    drawn_at = []

    class Counting(KolmogorovTask):
        def samples(self, model):
            drawn_at.append(trainer.progress.global_step)
            return super().samples(model)

    trainer = Trainer(tiny_config(tmp_path, tiny_field_data, max_epochs=1, sample_steps=5, num_samples=1), Counting)
    assert trainer.run() == 0
    assert drawn_at == [5, 10]
    names = sorted(path.name for path in (only_run_folder(tmp_path) / "samples").glob("samples-gs*.png"))
    assert names == ["samples-gs00005.png", "samples-gs00010.png"]


def test_loss_valid_is_measured_once_when_stage_0_ends_at_a_mid_epoch_point(tmp_path, tiny_field_data):
    """max_steps=5 ends reflow's stage 0 at the mid-epoch point of validations_per_epoch=2 (step 5 of 10),
    where the epoch also ends: one loss_valid at step 5, then one per reflow epoch."""
    assert run(tiny_config(tmp_path, tiny_field_data, rectified_flow=True, reflow_steps=1, reflow_gen_batches=2,
                           max_steps=5, max_epochs=1, validations_per_epoch=2, reflow_sample_steps=2)) == 0
    events = [json.loads(line) for line in (only_run_folder(tmp_path) / "metrics.jsonl").read_text().splitlines()]
    assert [event["step"] for event in events if "loss_valid" in event] == [5, 6, 7]
