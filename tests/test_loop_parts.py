"""Parts the loop wires in for every task: EveryDream2's EMA (updated after optimizer steps, in
every checkpoint, resumed bit for bit, exported beside the weights, sampled as ema_sample_* say),
a schedule-free optimizer's averaged weights for everything but checkpoints, and reduce_on_plateau
stepping on the agreed training loss."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from difftrain.ema import EMA_FILE
from difftrain.engine import run
from difftrain.errors import ConfigError
from difftrain.tasks.kolmogorov import MODEL_FILE
from tests.test_trainer import only_run_folder, tiny_config, tiny_field_data  # noqa: F401 (fixture)

EMA = dict(ema_decay_rate=0.8, ema_update_interval=2)


def ckpts(root):
    (log_folder,) = (root / "logs").iterdir()
    return log_folder / "ckpts"


def test_ema_is_checkpointed_exported_and_resumed_bit_for_bit(tmp_path, tiny_field_data):
    assert run(tiny_config(tmp_path / "full", tiny_field_data, ckpt_every_n_steps=3, max_epochs=2, **EMA)) == 0
    folders = sorted(path.name for path in ckpts(tmp_path / "full").iterdir())
    (last,) = [name for name in folders if name.startswith("last-") and not name.endswith("_ema")]
    assert f"{last}_ema" in folders and "tiny-ep00-gs00003_ema" in folders
    average = load_file(str(ckpts(tmp_path / "full") / last / EMA_FILE))
    exported = load_file(str(ckpts(tmp_path / "full") / f"{last}_ema" / MODEL_FILE))
    trained = load_file(str(ckpts(tmp_path / "full") / last / MODEL_FILE))
    # The export holds the average wherever the network trains, the checkpoint the trained weights.
    assert all(torch.equal(exported[name], tensor) for name, tensor in average.items())
    assert any(not torch.equal(trained[name], tensor) for name, tensor in average.items())

    middle = ckpts(tmp_path / "full") / "tiny-ep00-gs00003"
    assert run(tiny_config(tmp_path / "resumed", tiny_field_data, resume_ckpt=str(middle), max_epochs=2,
                           **EMA)) == 0
    resumed = load_file(str(ckpts(tmp_path / "resumed") / last / EMA_FILE))
    assert resumed.keys() == average.keys()
    assert all(torch.equal(resumed[name], tensor) for name, tensor in average.items())


def test_ema_samples_as_ema_sample_flags_say(tmp_path, tiny_field_data):
    assert run(tiny_config(tmp_path, tiny_field_data, max_epochs=1, sample_steps=2, ema_sample_ema_model=True,
                           ema_sample_nonema_model=True, **EMA)) == 0
    names = sorted(path.name for path in (only_run_folder(tmp_path) / "samples").iterdir())
    assert "samples-gs00002.png" in names and "samples_ema-gs00002.png" in names
    assert "spectrum-gs00002.png" in names and "spectrum_ema-gs00002.png" in names


def test_a_schedule_free_run_exports_its_averaged_weights_and_checkpoints_its_training_weights(
        tmp_path, tiny_field_data):
    from difftrain.checkpoint import load_trainer_tensors
    from difftrain.optim import make_optimizer
    from difftrain.tasks.kolmogorov import build_score_network

    config = tiny_config(tmp_path, tiny_field_data, optimizer="AdamWScheduleFree", lr=0.05, max_epochs=1)
    assert run(config) == 0
    (last,) = [path for path in ckpts(tmp_path).iterdir() if path.name.startswith("last-")]
    final = torch.load(only_run_folder(tmp_path) / "state.pth", weights_only=True)
    # Rebuild the optimizer from the last checkpoint (training weights + its state) and ask it
    # for its average: that is what the run's final weights must be.
    network = build_score_network(config)
    network.load_state_dict(load_file(str(last / MODEL_FILE)))
    optimizer = make_optimizer(config, [{"params": list(network.parameters())}])
    optimizer.load_state_dict(load_trainer_tensors(last)["optimizer"])
    assert any(not torch.equal(final[name], value) for name, value in network.state_dict().items())
    optimizer.eval()
    for name, value in network.state_dict().items():
        torch.testing.assert_close(final[name], value, rtol=0, atol=1e-6)


def test_reduce_on_plateau_steps_on_the_training_loss(tmp_path, tiny_field_data):
    settings = "patience=0;factor=0.5;threshold=0.5"
    assert run(tiny_config(tmp_path, tiny_field_data, lr=1e-3, lr_scheduler="reduce_on_plateau",
                           lr_scheduler_settings=settings, max_epochs=2)) == 0
    records = [json.loads(line) for line in (only_run_folder(tmp_path) / "metrics.jsonl").read_text().splitlines()]
    steps = [record for record in records if "loss_train" in record]
    # Replay torch's ReduceLROnPlateau on the logged losses: the same learning rates, step by step.
    parameter = torch.nn.Parameter(torch.zeros(1))
    replay = torch.optim.lr_scheduler.ReduceLROnPlateau(torch.optim.SGD([parameter], lr=1e-3), patience=0,
                                                       factor=0.5, threshold=0.5)
    expected = []
    for record in steps:
        replay.step(record["loss_train"])
        expected.append(replay.get_last_lr()[0])
    assert [record["lr"] for record in steps] == expected
    assert expected[-1] < 1e-3  # the plateau was reached: the rate did drop


def test_reflow_with_the_seeds_defaults_warns_once_naming_the_flags(tmp_path, tiny_field_data, capsys):
    assert run(tiny_config(tmp_path, tiny_field_data, max_epochs=1, rectified_flow=True, reflow_steps=2,
                           reflow_sample_steps=2)) == 0
    err = capsys.readouterr().err
    assert err.count("each reflow iteration trains 1 optimizer step(s)") == 1
    assert "--reflow_gen_batches" in err and "--reflow_train_epochs" in err


def test_reflow_effort_warning_only_below_the_measured_effort():
    from difftrain.reflow import FEW_REFLOW_STEPS, reflow_effort_warning

    assert reflow_effort_warning(0, 1, 1, 1, 16) is None  # no reflow, nothing to say
    assert reflow_effort_warning(2, 16, 3, 48, 16) is None  # the quickstart's
    assert reflow_effort_warning(2, 4, 1, FEW_REFLOW_STEPS, 16) is None
    text = reflow_effort_warning(2, 2, 1, 2, 16)
    assert "2 optimizer step(s) on 32 generated pairs" in text


def test_ema_resume_model_starts_the_average_from_an_exported_ema_folder(tmp_path, tiny_field_data):
    assert run(tiny_config(tmp_path / "first", tiny_field_data, max_epochs=1, **EMA)) == 0
    (exported,) = [path for path in ckpts(tmp_path / "first").iterdir() if path.name.endswith("_ema")]
    # No update happens in the second run (interval beyond its length): its average stays the one it started from.
    assert run(tiny_config(tmp_path / "second", tiny_field_data, max_epochs=1, ema_decay_rate=0.8,
                           ema_update_interval=10_000, ema_resume_model=str(exported))) == 0
    (last,) = [path for path in ckpts(tmp_path / "second").iterdir() if path.name.startswith("last-")
               and not path.name.endswith("_ema")]
    started = load_file(str(exported / MODEL_FILE))
    average = load_file(str(last / EMA_FILE))
    assert average.keys() == started.keys()  # so the check below cannot pass on an empty average
    assert all(torch.equal(average[name], started[name]) for name in average)
    trained = load_file(str(last / MODEL_FILE))
    assert any(not torch.equal(average[name], trained[name]) for name in average)


def test_ema_resume_model_findlast_without_an_ema_folder_says_so(tmp_path, tiny_field_data):
    with pytest.raises(ConfigError, match="ema_resume_model 'findlast'"):
        run(tiny_config(tmp_path, tiny_field_data, max_epochs=1, ema_resume_model="findlast", **EMA))
