"""EveryDream2 features beyond the vocabulary itself: text-encoder freezing, training the text encoder
alone, the rated dataset, the single files without save_ckpt_dir, settings re-read every epoch.
Each is checked on the tiny Stable Diffusion stand-in or on the data layer directly."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from difftrain.config import Config
from difftrain.errors import ConfigError
from tests.test_everydream2 import _images, translated

CPU = SimpleNamespace(device=torch.device("cpu"), is_main_process=True, num_processes=1)


def _optimizer_json(folder: Path, freezing: dict) -> Path:
    path = folder / "optimizer.json"
    path.write_text(json.dumps({"base": {"optimizer": "adamw", "lr": 1e-6}, "text_encoder_freezing": freezing}))
    return path


def _trained_parts(encoder: torch.nn.Module) -> set[str]:
    """'embeddings', 'final_layer_norm' and 'layer<i>' for the parts whose every weight trains."""
    parts: dict[str, list[bool]] = {}
    for name, parameter in encoder.named_parameters():
        if ".layers." in name:
            part = "layer" + name.split(".layers.")[1].split(".")[0]
        else:
            part = next((p for p in ("embeddings", "final_layer_norm") if p in name), name)
        parts.setdefault(part, []).append(parameter.requires_grad)
    return {part for part, flags in parts.items() if all(flags)} | \
        {f"partly {part}" for part, flags in parts.items() if any(flags) and not all(flags)}


def _clip(layers: int = 4):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                        num_hidden_layers=layers, vocab_size=1000, bos_token_id=0, eos_token_id=1))


# ---- a) text_encoder_freezing ----------------------------------------------------------------------

ALL = {"embeddings", "layer0", "layer1", "layer2", "layer3", "final_layer_norm"}


@pytest.mark.parametrize("freezing, trained", [
    ({}, ALL),
    ({"unfreeze_last_n_layers": None}, ALL),
    ({"unfreeze_last_n_layers": 2}, {"layer2", "layer3", "final_layer_norm"}),
    ({"unfreeze_last_n_layers": 9}, ALL),
    ({"freeze_front_n_layers": 1}, {"layer1", "layer2", "layer3", "final_layer_norm"}),
    ({"freeze_front_n_layers": -1}, {"layer3", "final_layer_norm"}),
    ({"freeze_front_n_layers": 0}, ALL),
    # EveryDream2 reads the keys by presence: unfreeze_last_n_layers (even null) wins over freeze_front
    ({"freeze_front_n_layers": 3, "unfreeze_last_n_layers": None}, ALL),
    ({"freeze_front_n_layers": 3, "unfreeze_last_n_layers": 2}, {"layer2", "layer3", "final_layer_norm"}),
    ({"unfreeze_last_n_layers": 1, "freeze_embeddings": False}, {"embeddings", "layer3", "final_layer_norm"}),
    ({"unfreeze_last_n_layers": 1, "freeze_embeddings": None}, {"embeddings", "layer3", "final_layer_norm"}),
    ({"freeze_embeddings": True}, ALL - {"embeddings"}),
    ({"freeze_final_layer_norm": True}, ALL - {"final_layer_norm"}),
    ({"freeze_final_layer_norm": None, "unfreeze_last_n_layers": 3}, {"layer1", "layer2", "layer3",
                                                                        "final_layer_norm"}),
])
def test_text_encoder_freezing_trains_what_everydream2_trains(freezing, trained, tmp_path):
    from difftrain.tasks.sd_parts.trainable import freeze_text_encoder_parts

    config = translated("--optimizer_config", str(_optimizer_json(tmp_path, freezing)))
    encoder = _clip()
    freeze_text_encoder_parts(encoder, config)
    assert _trained_parts(encoder) == trained


def test_freezing_every_layer_from_the_front_is_an_error_naming_the_setting():
    from difftrain.tasks.sd_parts.trainable import freeze_text_encoder_parts

    with pytest.raises(ConfigError, match="text_encoder_freeze_front_n_layers 4 leaves none"):
        freeze_text_encoder_parts(_clip(), Config(text_encoder_freeze_front_n_layers=4))


def test_freezing_reaches_the_optimizer_of_a_full_run_on_the_tiny_stand_in(tiny_sd15, tmp_path):
    from difftrain.tasks.base import StartPoint
    from difftrain.tasks.sd import SDTask

    data = _images(tmp_path / "data", count=2)
    optimizer = _optimizer_json(tmp_path, {"freeze_front_n_layers": 1, "freeze_final_layer_norm": True})
    config = translated("--resume_ckpt", str(tiny_sd15), "--data_root", str(data), "--resolution", "64",
                        "--optimizer_config", str(optimizer), "--disable_textenc_training", "false")
    task = SDTask(config, CPU, StartPoint(base=str(tiny_sd15)))
    (encoder,) = task.model.text_encoders
    assert _trained_parts(encoder) == {"layer1"}  # the stand-in's encoder has two layers
    optimized = {id(p) for group in task.parameter_groups() for p in group["params"]}
    assert all((id(p) in optimized) == p.requires_grad for p in encoder.parameters())
    assert all(id(p) in optimized for p in task.model.unet.parameters())


# ---- b) disable_unet_training ---------------------------------------------------------------------

def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (file,) = folder.glob("*.safetensors")
    return load_file(str(file))


@pytest.mark.usefixtures("one_thread")
def test_disable_unet_training_trains_the_text_encoder_alone(tiny_sd15, tmp_path, monkeypatch):
    from difftrain.cli import main

    monkeypatch.chdir(tmp_path)
    data = _images(tmp_path / "data", count=2)
    assert main(["--resume_ckpt", str(tiny_sd15), "--data_root", str(data), "--resolution", "64",
                 "--max_epochs", "1", "--batch_size", "2", "--lr", "1e-3", "--sample_steps", "0",
                 "--tracker", "none", "--disable_unet_training", "true", "--disable_textenc_training", "false"]) == 0
    (final,) = (tmp_path / "logs").glob("*/ckpts/last-*")
    for module, changes in (("unet", False), ("text_encoder", True)):
        before, after = _weights(tiny_sd15 / module), _weights(final / module)
        changed = [name for name in before if not torch.equal(before[name], after[name].to(before[name].dtype))]
        assert bool(changed) == changes, module
    used = json.loads(next((tmp_path / "runs").glob("*/config.json")).read_text())
    assert used["train_unet"] is False


def test_disabling_both_the_unet_and_the_text_encoder_is_a_clear_error(tiny_sd15, tmp_path, capsys):
    from difftrain.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["--resume_ckpt", str(tiny_sd15), "--data_root", str(_images(tmp_path / "data", count=1)),
              "--disable_unet_training", "true", "--disable_textenc_training", "true"])
    assert exited.value.code == 2
    assert "nothing else trains" in capsys.readouterr().err


def test_a_frozen_unet_leaves_the_text_encoder_its_own_schedule():
    from difftrain.optim import make_scheduler

    config = Config(lr_scheduler="constant", text_encoder_lr_scheduler="linear", lr_warmup_steps=0)
    text = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [text], "module": "text_encoder"}], lr=1e-6)
    scheduler = make_scheduler(config, optimizer, 100)
    for _ in range(50):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-7)


# ---- d) save_ckpt_dir null ------------------------------------------------------------------------

def test_save_ckpt_dir_null_means_the_working_folder(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"save_ckpt_dir": None}))
    assert translated(str(path)).save_ckpt_dir == "."
    assert translated("--save_ckpt_dir", "out").save_ckpt_dir == "out"


@pytest.mark.usefixtures("one_thread")
def test_without_save_ckpt_dir_the_single_file_lands_in_the_working_folder_and_is_never_overwritten(
        tiny_sd15, tmp_path, monkeypatch):
    from difftrain.cli import main
    from difftrain.exports import write_single_file

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "train.json").write_text(json.dumps({"save_ckpt_dir": None, "project_name": "cat"}))
    assert main(["--config", "train.json", "--resume_ckpt", str(tiny_sd15), "--data_root",
                 str(_images(tmp_path / "data", count=2)), "--resolution", "64", "--max_epochs", "1",
                 "--batch_size", "2", "--sample_steps", "0", "--tracker", "none"]) == 0
    (final,) = (work / "logs").glob("*/ckpts/last-cat-*")
    single = work / f"{final.name}.safetensors"
    assert sorted(path.name for path in work.glob("*.safetensors")) == [single.name]
    from safetensors.torch import load_file

    assert any(key.startswith("model.diffusion_model.") for key in load_file(str(single)))  # A1111 layout
    single.write_bytes(b"the user's own file")
    assert write_single_file(final, single, full_precision=False) is False
    assert single.read_bytes() == b"the user's own file"
