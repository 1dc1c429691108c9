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
